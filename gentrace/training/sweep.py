"""Sweeps: one store per point of a config grid, and analyses over several stores (SPEC section 1).

`gentrace sweep CONFIG --grid data.freq=0.25,0.5 --grid data.seed=0..4 --out DIR` records the
cartesian product of the grids, one point after the other, into DIR/<key=value,...>.zarr, and keeps
DIR/sweep.json (MANIFEST) listing every point and its store. Every grid value goes through the same
parser as `--set` (config.parse_override), and every point's config is validated before the first
one is recorded. Rerunning the command skips complete stores, resumes killed or interrupted ones and
records the missing ones, so a sweep cut short by a job time limit is continued by running it again.

`over_stores` runs an analysis on several stores (or a sweep directory) and concatenates its
tables, with a `store` column and one column per config key that differs between the stores in
front. torch is imported only when a point is recorded.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from gentrace.core import config as config_mod
from gentrace.core.errors import ConfigError, StoreError
from gentrace.core.varying import cell, flatten, varying_keys
from gentrace.store import schema
from gentrace.store.reader import StoreReader, check_gentrace_store
from gentrace.task import budget
from gentrace.training import preflight

if TYPE_CHECKING:
    import pandas as pd

    from gentrace.analyses.registry import Analysis
    from gentrace.core.config import RunConfig

MANIFEST = "sweep.json"
RANGE = re.compile(r"^\s*(-?\d+)\s*\.\.\s*(-?\d+)\s*$")
UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]")
Grid = list[tuple[str, list[Any]]]
Table: TypeAlias = "pd.DataFrame | Iterable[pd.DataFrame]"


# -- grids --------------------------------------------------------------------------------------
def parse_grid(items: Sequence[str]) -> Grid:
    """`KEY=V1,V2,...` or `KEY=A..B` (integers A to B inclusive) per item -> [(key, values)], in order.

    Values are read as `--set` values (TOML, else a string). A key given twice is an error.
    """
    grid: Grid = []
    points_so_far, widest = 1, (0, "")
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or not text.strip():
            raise ConfigError(f"--grid {item!r}: expected KEY=V1,V2,... or KEY=A..B, e.g. --grid data.seed=0..4")
        if key in (k for k, _ in grid):
            raise ConfigError(f"--grid {key} is given twice; list all its values in one --grid")
        span = RANGE.match(text)
        if span:
            low, high = int(span.group(1)), int(span.group(2))
            if high < low:
                raise ConfigError(f"--grid {item!r}: the range {low}..{high} is empty")
            count = high - low + 1
        else:
            count = text.count(",") + 1
        # the size of the whole sweep is known before a value is built: refuse one that cannot fit in memory
        points_so_far, widest = points_so_far * count, max(widest, (count, item.strip()))
        budget.check_points(points_so_far, widest[1])
        if span:
            values: list[Any] = list(range(low, high + 1))
        else:
            values = [config_mod.parse_override(f"{key}={part}")[1] for part in text.split(",")]
        grid.append((key, values))
    return grid


def points(grid: Grid) -> list[dict[str, Any]]:
    """The cartesian product of the grid, last key varying fastest: [{key: value}]."""
    keys = [key for key, _ in grid]
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(values for _, values in grid))]


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":")) if isinstance(value, list | dict) else str(value)


def point_name(point: Mapping[str, Any]) -> str:
    """Store directory name of a point, e.g. `data.freq=0.25,data.seed=0.zarr` (unsafe characters -> _)."""
    return UNSAFE.sub("_", ",".join(f"{key}={_text(value)}" for key, value in point.items())) + ".zarr"


def overrides_of(point: Mapping[str, Any]) -> list[str]:
    """`--set` items of a point (values written back as TOML so they parse to the same value)."""
    out = []
    for key, value in point.items():
        text = json.dumps(value) if isinstance(value, str) else _toml(value)
        out.append(f"{key}={text}")
    return out


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) if not isinstance(v, str) else json.dumps(v) for v in value) + "]"
    return repr(value) if isinstance(value, float) else str(value)


def configs(config: Path | None, overrides: Sequence[str], grid: Grid) -> list[tuple[dict[str, Any], RunConfig]]:
    """Every point with its validated config; a bad key or value raises ConfigError before anything runs."""
    if not grid:
        raise ConfigError("give at least one --grid KEY=V1,V2,...")
    out = []
    for point in points(grid):
        try:
            out.append((point, config_mod.load(config, [*overrides, *overrides_of(point)])))
        except ConfigError as exc:
            raise ConfigError(f"--grid {', '.join(f'{k}={_text(v)}' for k, v in point.items())}: {exc}") from None
    names = [point_name(point) for point, _ in out]
    if len(set(names)) != len(names):
        raise ConfigError("two grid points map to the same store name; give distinct values")
    return out


# -- recording ----------------------------------------------------------------------------------
def _state(path: Path) -> str:
    """'missing', 'torn' (a directory that is not a store: killed while creating it), or the store status."""
    if not path.exists():
        return "missing"
    try:
        check_gentrace_store(path)
    except StoreError:
        return "torn" if path.is_dir() and not (path / "zarr.json").exists() else "foreign"
    return StoreReader(path).status


def _write_manifest(out: Path, config: Path | None, grid: Grid, entries: list[dict[str, Any]]) -> None:
    manifest = {
        "config": str(config) if config is not None else None,
        "grid": {key: values for key, values in grid},
        "points": entries,
    }
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    tmp.replace(out / MANIFEST)


def record_sweep(
    config: Path | None,
    grid: Grid,
    out: Path,
    overrides: Sequence[str] = (),
    device: str = "auto",
    say: Callable[[str], None] = lambda _: None,
) -> list[Path]:
    """Record every grid point into `out` sequentially (resumable); returns the store paths in grid order.

    Complete stores and diverged ones (rerunning would diverge again) are skipped; killed,
    interrupted and failed ones are resumed from their last checkpoint; a directory left by a kill
    during store creation is recorded afresh.
    """
    out = Path(out)
    if grid:  # a new sweep's size alone may not fit: refused before each point's config is validated
        widest = max(grid, key=lambda item: len(item[1]))
        values = ",".join(_text(v) for v in widest[1][:3]) + (",..." if len(widest[1]) > 3 else "")
        count = math.prod(len(v) for _, v in grid)
        budget.check_points(count, f"{widest[0]}={values}", None if out.exists() else out)
    todo = configs(config, overrides, grid)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory for the sweep's stores")
    preflight.sweep_dir(out)
    fresh = []
    for point, cfg in todo:
        state = _state(out / point_name(point))
        if state == "foreign":
            raise StoreError(f"{out / point_name(point)} is not a gentrace store; move it out of --out {out}")
        if state == "running":
            raise StoreError(f"{out / point_name(point)} is being recorded by another process")
        if state in ("missing", "torn"):
            fresh.append(cfg)
    preflight.fits(fresh, out, device)  # every new store must fit, before the first is recorded
    out.mkdir(parents=True, exist_ok=True)
    from gentrace.training import run  # torch is imported only once every point's config is known to be good

    entries = [
        {"values": point, "store": point_name(point), "status": _state(out / point_name(point))} for point, _ in todo
    ]
    _write_manifest(out, config, grid, entries)
    paths = []
    for i, (point, cfg) in enumerate(todo):
        path = out / point_name(point)
        state = _state(path)
        head = f"[{i + 1}/{len(todo)}] {path.name}"
        if state in ("complete", "diverged"):
            say(f"{head}: {state}, skipped")
        elif state in ("missing", "torn"):
            say(f"{head}: recording")
            run.record(cfg, path, device=device, overwrite=state == "torn")
        else:
            say(f"{head}: {state}, resuming")
            run.record(cfg, path, device=device, resume=True)
        entries[i]["status"] = _state(path)
        _write_manifest(out, config, grid, entries)
        paths.append(path)
    return paths


# -- several stores per analysis -----------------------------------------------------------------
def expand_stores(paths: Sequence[Path]) -> list[Path]:
    """Stores named directly, and the stores inside a sweep directory (manifest order, else by name)."""
    found: list[Path] = []
    for path in map(Path, paths):
        if (path / "zarr.json").exists() or not path.is_dir() or _lost_its_root(path):
            found.append(path)  # StoreReader says what is wrong with a path that is not a store
            continue
        manifest = path / MANIFEST
        if manifest.exists():
            inside = [path / name for name in manifest_stores(manifest) if (path / name / "zarr.json").exists()]
        else:
            inside = sorted(p for p in path.iterdir() if (p / "zarr.json").exists())
        if not inside:
            raise StoreError(f"{path} is neither a gentrace store nor a sweep directory holding stores")
        found.extend(inside)
    return found


def _lost_its_root(path: Path) -> bool:
    """A store whose root zarr.json is gone (its `data` group is still there), not a sweep directory."""
    return (path / schema.DATA.name / "zarr.json").exists() or (path / schema.CHECKPOINT_GROUP).is_dir()


def manifest_stores(manifest: Path) -> list[str]:
    """The store names a sweep's `sweep.json` lists, in grid order.

    Raises:
        StoreError: the manifest is not JSON, lacks `points` or a point's `store`, or names a path outside
            its sweep directory; the message says how to repair it.
    """
    fix = f"run the same `gentrace sweep` again to rewrite it, or delete it to analyze every store in {manifest.parent}"
    try:
        doc = json.loads(manifest.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise StoreError(f"{manifest} is damaged ({exc}); {fix}") from None
    points = doc.get("points") if isinstance(doc, dict) else None
    if not isinstance(points, list):
        raise StoreError(f"{manifest} is damaged (no list of `points`); {fix}")
    names = []
    for i, entry in enumerate(points):
        name = entry.get("store") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
            raise StoreError(f"{manifest} is damaged (point {i} names no store directory inside the sweep); {fix}")
        names.append(name)
    return names


def over_stores(paths: Sequence[Path], analysis: Callable[[StoreReader], Table]) -> Table:
    """Run `analysis` on each store; with several, prefix every row with `store` and the varying config keys."""
    readers = [StoreReader(path) for path in expand_stores(paths)]
    if len(readers) == 1:
        return analysis(readers[0])
    return _labelled(readers, analysis)


def analysis_table(entry: Analysis, paths: Sequence[Path], options: Mapping[str, Any]) -> Table:
    """The table `gentrace analyze NAME` prints for `paths` (stores and sweep directories).

    Several stores of an analysis with an `across` table (osgr: lhs vs rhs across sweep points) give
    that table; otherwise each store's rows, labelled by `over_stores`. `gentrace.analyze` is the same call.
    """
    if entry.across and len(found := expand_stores(paths)) > 1:
        table = entry.across_table([StoreReader(path) for path in found], options)
        if table is not None:
            return table
    return over_stores(paths, lambda reader: entry.tables(reader, options))


def _labelled(readers: list[StoreReader], analysis: Callable[[StoreReader], Table]) -> Iterator[pd.DataFrame]:
    import pandas as pd  # here, not at the top: `gentrace --help` does not pay for pandas

    trees = [reader.config for reader in readers]
    keys = varying_keys(trees)
    for reader, tree in zip(readers, trees, strict=True):
        flat = flatten(tree)
        labels = {"store": str(reader.path), **{key: cell(flat.get(key)) for key in keys}}
        table = analysis(reader)
        for piece in [table] if isinstance(table, pd.DataFrame) else table:
            front = pd.DataFrame({name: [value] * len(piece) for name, value in labels.items()}, index=piece.index)
            yield pd.concat([front, piece.drop(columns=[c for c in labels if c in piece.columns])], axis=1)
