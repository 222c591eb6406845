"""The `gentrace` command line (typer): parse -> call the library -> print.

Exit codes (SPEC section 1): 0 success, 1 runtime failure (diverged, writer failure), 2 bad
usage or bad input, 130 interrupted. A GentraceError becomes one `error: ...` line on stderr;
any other exception keeps its traceback (it is a bug).

Stdout holds a command's data; a command whose product is a file (record's store, sweep's
directory, compact's store, plot's figure, `analyze -o FILE`) prints that path as the one stdout
line instead. Progress, summaries and next-step hints (gentrace.cli.hints: they run as printed) go
to stderr.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer

from gentrace.analyses.registry import REGISTRY
from gentrace.cli.analyze import analyze_app, plot_app
from gentrace.cli.errors import error_line as _err
from gentrace.cli.errors import torchrun_worker, usage_message, user_errors
from gentrace.cli.hints import quote, runnable
from gentrace.core import config as config_mod
from gentrace.store.reader import StoreReader

app = typer.Typer(
    name="gentrace",
    help="Record a training run into a crash-safe Zarr store; diagnose its generalization offline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _usage_error_types() -> tuple[type[Exception], ...]:
    """Click's usage errors: vendored as typer._click in typer >= 0.20, plain click before."""
    found: list[type[Exception]] = []
    typer_base = getattr(typer, "exceptions", None)
    if typer_base is not None and hasattr(typer_base, "TyperException"):
        found.append(typer_base.TyperException)
    try:
        import click

        found.append(click.ClickException)
    except ImportError:
        pass
    return tuple(found)


SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override a config key, e.g. --set train.lr=0.1 (repeatable).")
]
DeviceOpt = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")]


@app.command()
@user_errors
def record(
    config: Annotated[
        Path | None, typer.Argument(help="Run config (TOML). Without one, the built-in quick start runs.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Store path [default: runs/<config name>-<timestamp>.zarr]")
    ] = None,
    set_: SetOpt = None,
    device: DeviceOpt = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="Continue the killed or interrupted run in --out.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing store at --out.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Train a model and stream its training dynamics into a Zarr store."""
    if torchrun_worker():  # under torchrun rank 0 alone shows progress, warnings and the store path
        quiet = True
        warnings.simplefilter("ignore")
    overrides = list(set_ or [])
    if resume and config is None and overrides:
        raise config_mod.ConfigError("--resume continues the stored config; --set cannot change it")
    cfg = None if resume and config is None else config_mod.load(config, overrides)

    from gentrace.cli.progress import IMPORTING_TORCH, TrainingProgress, preparing
    from gentrace.training import preflight

    progress = None if quiet else TrainingProgress()
    with preparing(progress, IMPORTING_TORCH):  # seconds on a cold start, before any other phase can be told
        if not torchrun_worker():  # rank 0 speaks for all: the store path need not exist on the other nodes
            preflight.record(cfg, out, device=device, resume=resume, overwrite=overwrite)
        from gentrace.training import run  # torch is imported only once the config is known to be good

    # A scheduler's SIGTERM (job time limit, preemption) ends the run like Ctrl-C: flushed, resumable.
    signal.signal(signal.SIGTERM, _terminated)
    from gentrace.core.schedules import timeline

    shown = cfg
    if shown is None and out is not None and resume and not quiet:
        shown = config_mod.from_dict(StoreReader(out).config)
    observers: list[Any] = []
    if progress is not None and shown is not None:
        tl = timeline(shown.data.n_train, shown.train.batch_size, shown.train.epochs)
        batch = min(shown.train.batch_size or shown.data.n_train, shown.data.n_train)
        progress.plan(tl.total_steps, tl.epochs, batch * shown.train.replicates)
        observers.append(progress)
    try:
        if progress is not None and observers:
            with progress:
                path = run.record(
                    cfg,
                    out,
                    device=device,
                    resume=resume,
                    overwrite=overwrite,
                    observers=observers,
                    phase=progress.on_phase,
                )
        else:
            path = run.record(cfg, out, device=device, resume=resume, overwrite=overwrite, observers=observers)
    except run.Interrupted as exc:
        _quiet_exit()
        _err(str(exc))
        raise typer.Exit(130) from None
    except KeyboardInterrupt:  # before the store existed: run.record turns every later one into Interrupted
        _quiet_exit()
        if not (_TERMINATED and int(os.environ.get("WORLD_SIZE", "1")) > 1):  # torchrun stopping it: a peer said why
            _err("interrupted before recording started; no store was written" if not resume else "interrupted")
        raise typer.Exit(130) from None
    if not torchrun_worker():
        _after_record(path, quiet)


@app.command()
@user_errors
def check(
    config: Annotated[
        Path | None, typer.Argument(help="Run config (TOML). Without one, the built-in quick start is checked.")
    ] = None,
    set_: SetOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Dry run, no store written: per stream what `record` would write (CSV), the estimated run time and size."""
    overrides = list(set_ or [])
    cfg = config_mod.load(config, overrides)
    from gentrace.cli.output import write
    from gentrace.training import check as check_mod  # torch is imported only once the config is known to be good

    table, summary = check_mod.check(cfg, device=device)
    write(table, "csv")
    args = [shlex.quote(str(config))] if config is not None else []
    args += [f"--set {shlex.quote(item)}" for item in overrides]
    args += [f"--device {shlex.quote(device)}"] if device != "auto" else []
    record_it = runnable(f"gentrace record {' '.join(args)}".rstrip())
    lines = [*check_mod.summary_lines(summary), "next, record it:", f"  {record_it}"]
    typer.echo("\n".join(lines), err=True)


_TERMINATED: list[int] = []


def _terminated(signum: int, frame: Any) -> None:
    """SIGTERM (a scheduler's time limit, torchrun stopping the ranks of a failed run): end like Ctrl-C."""
    _TERMINATED.append(signum)
    raise KeyboardInterrupt


def _quiet_exit() -> None:
    """Ignore further Ctrl-C: the process is on its way out (a second one would print an atexit traceback)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _after_record(path: Path, quiet: bool) -> None:
    """The store's path, the one line on stdout; on stderr the next commands, as they run (gentrace.cli.hints)."""
    if not quiet:
        lines = [f"store written: {path}", "next, try:", f"  {runnable(f'gentrace info {quote(path)}')}"]
        lines += [f"  {runnable(command)}" for command in suggestions(StoreReader(path))]
        typer.echo("\n".join(lines), err=True)
    typer.echo(str(path))


def suggestions(reader: StoreReader) -> list[str]:
    """The `analyze` and `plot` commands that this store can answer (each registry entry's), then a look inside.

    Written `gentrace ...` and `python ...`; `_after_record` prints them as this process can run them.
    """
    entries = sorted(REGISTRY.values(), key=lambda entry: entry.hint_order)  # stable: ties keep the registry's order
    out = [line for entry in entries for line in entry.suggestions(reader)]
    tree = f'import zarr; print(zarr.open_group({json.dumps(str(reader.path))}, mode="r").tree())'
    out.append(f"python -c {quote(tree)}")
    return out


@app.command()
@user_errors
def info(
    store: Annotated[Path, typer.Argument(help="A store written by `gentrace record`.")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show what a store holds: config, status, rows per stream, sizes, compression, writer time."""
    from gentrace.reporting.summary import render, summarize

    summary = summarize(StoreReader(store, compacting_ok=True))
    typer.echo(json.dumps(summary, indent=2) if as_json else render(summary))


@app.command()
@user_errors
def sweep(
    config: Annotated[Path, typer.Argument(help="Run config (TOML) shared by every grid point.")],
    grid: Annotated[
        list[str],
        typer.Option("--grid", help="KEY=V1,V2,... or KEY=A..B (integers, inclusive); repeatable, cartesian product."),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory of the sweep's stores and sweep.json.")],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config key for every point, e.g. --set train.epochs=5 (repeatable)."),
    ] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No per-point messages.")] = False,
) -> None:
    """Record one store per grid point, one after another; rerun to skip finished points and resume the rest."""
    from gentrace.training import run
    from gentrace.training import sweep as sweep_mod

    parsed = sweep_mod.parse_grid(grid)
    # A scheduler's SIGTERM ends the current point like Ctrl-C: flushed, resumed by the next `gentrace sweep`.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    say = (lambda _: None) if quiet else (lambda line: typer.echo(line, err=True))
    try:
        stores = sweep_mod.record_sweep(config, parsed, out, list(set_ or []), device=device, say=say)
    except run.Interrupted as exc:
        _err(f"{exc}; run the same `gentrace sweep` again to continue")
        raise typer.Exit(130) from None
    if not quiet:
        typer.echo(f"sweep written: {out} ({len(stores)} stores); next, try:", err=True)
        for command in sweep_suggestions(out, StoreReader(stores[0])) if stores else []:
            typer.echo(f"  {runnable(command)}", err=True)
    typer.echo(str(out))


def sweep_suggestions(out: Path, first: StoreReader) -> list[str]:
    """The `analyze` and `plot` commands over the sweep directory that its stores can answer (as the first can)."""
    entries = sorted(REGISTRY.values(), key=lambda entry: entry.hint_order)
    return [line.format(path=quote(out)) for entry in entries if entry.suggestions(first) for line in entry.suggest]


@app.command()
@user_errors
def compact(
    store: Annotated[Path, typer.Argument(help="A finished store written by `gentrace record`.")],
    shard_mb: Annotated[float, typer.Option("--shard-mb", help="Uncompressed MiB per shard file at most.")] = 64.0,
    final: Annotated[
        bool, typer.Option("--final", help="Also compact an interrupted or killed run (it can no longer be resumed).")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")] = False,
) -> None:
    """Rewrite a finished run's per-row chunk files into multi-row shards (far fewer files; same data)."""
    from gentrace.cli.progress import CountProgress
    from gentrace.store import compact as compact_mod

    if not (math.isfinite(shard_mb) and shard_mb * 2**20 >= 1):
        raise config_mod.ConfigError(f"--shard-mb must be a positive number of MiB (got {shard_mb})")
    from gentrace.training import preflight

    preflight.compact(store)
    total = compact_mod.array_count(store)
    with CountProgress("compacting", total, quiet=quiet) as bar:
        report = compact_mod.compact(store, shard_bytes=int(shard_mb * 2**20), final=final, on_array=bar.advance)
    if not quiet:
        mib = 2**20
        typer.echo(
            f"compacted {report.arrays} arrays in {report.seconds:.1f} s: files {report.files_before} -> "
            f"{report.files_after}, disk {report.bytes_before / mib:.1f} -> {report.bytes_after / mib:.1f} MiB",
            err=True,
        )
    typer.echo(str(store))


@app.command()
@user_errors
def verify(
    store: Annotated[Path, typer.Argument(help="A store written by `gentrace record`.")],
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Read every committed chunk and checkpoint of a store; exit 1 and list the damaged rows if any."""
    from gentrace.cli.progress import CountProgress
    from gentrace.core.errors import DamagedStoreError
    from gentrace.store.verify import verify as verify_store

    total = sum(
        len(paths) for paths in StoreReader(store, compacting_ok=True, check_checkpoint=False).streams().values()
    )
    with CountProgress("verifying", total, quiet=quiet) as bar:
        reports = verify_store(store, on_array=bar.advance)
    lines = ["stream,arrays,rows,chunks_read,mib_read,status"]
    damaged = []
    for r in reports:
        lines.append(
            f"{r.stream},{r.arrays},{r.rows},{r.chunks},{r.bytes / 2**20:.2f},{'ok' if r.sound else 'damaged'}"
        )
        damaged += [f"damaged: {d}" for d in r.damaged]
    typer.echo("\n".join(lines))
    if damaged:
        typer.echo("\n".join(damaged), err=True)
        raise DamagedStoreError(
            f"{store}: {len(damaged)} damaged pieces (listed above); the rows before them are sound"
        )


app.add_typer(analyze_app, name="analyze")
app.add_typer(plot_app, name="plot")


def main() -> None:
    """Console-script entry point: click usage errors become one line too."""
    try:
        code = app(standalone_mode=False)
    except _usage_error_types() as exc:
        _err(usage_message(exc))
        sys.exit(getattr(exc, "exit_code", 2))
    except KeyboardInterrupt:
        _quiet_exit()
        _err("interrupted")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
