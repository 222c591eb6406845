"""Bad input that used to give a traceback (or be accepted) gives one `error:` line naming the key or file.

Issue 12, items 9 and 10: read-only stores and mounts, a file where a directory should be, damaged
array metadata, damaged sweep manifests, unusable `-o` files and devices, absurd sizes (refused by an
estimate before anything is allocated, gentrace.task.budget) and numbers outside float32 or torch's seed
range. Every case runs the real CLI in a subprocess and checks the exit code (2 bad input, 1 a
damaged store), exactly one `error: ...` line on stderr that contains every expected name, and an
empty stdout. The subprocesses run up front, a few at a time.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from conftest import ENV, TINY, concurrently, gentrace_cmd, one_error_line, run_cli, tiny_config

from gentrace.cli.errors import file_error
from gentrace.core import config
from gentrace.core.config import RunConfig
from gentrace.task import budget

Make = Callable[[Path, Path], None]  # (path to create, the finished reference store)
HAS_CUDA = Path("/dev/nvidiactl").exists()
RAM = budget.physical_memory() or 2**40
# absurd on any machine: 10 x RAM in parameters (model.hidden), 10^11 recorded steps, 10^12 grid points
HUGE_WIDTH = max(10**8, RAM // 4)
# more of the smallest stores than fit the free disk where the tests run
STORES_BEYOND_DISK = (budget.free_disk(Path(tempfile.gettempdir())) or 2**50) // (
    budget.MIN_STORE_FILES * budget.BLOCK
) + 1


def _copy(path: Path, finished: Path) -> None:
    shutil.copytree(finished, path)


def _garbage_meta(text: str) -> Make:
    def make(path: Path, finished: Path) -> None:
        shutil.copytree(finished, path)
        (path / "params" / "0.weight" / "zarr.json").write_text(text)

    return make


def _sweep(manifest: str | bytes) -> Make:
    """A sweep directory holding one finished store and the manifest `manifest`."""

    def make(path: Path, finished: Path) -> None:
        path.mkdir()
        shutil.copytree(finished, path / "data.seed=0.zarr")
        data = manifest if isinstance(manifest, bytes) else manifest.encode()
        (path / "sweep.json").write_bytes(data)

    return make


def _file(path: Path, finished: Path) -> None:
    path.write_text("not a directory\n")


@dataclass(frozen=True)
class Case:
    """`gentrace ARGS` exits with `code`, its one error line containing every `names` entry.

    In args and names: `{cfg}` a valid tiny config, `{tmp}` a scratch directory, `{target}` what
    `make` creates before the run, `{ro}` a read-only directory holding `done.zarr` (complete) and
    `killed.zarr` (interrupted, resumable) (cases that need it are skipped where none can be made).
    """

    id: str
    args: tuple[str, ...]
    names: tuple[str, ...]
    code: int = 2
    make: Make | None = None
    needs: str = ""  # "ro": a read-only directory; "no-gpu": skipped on a machine with a GPU; "proc": /proc


RECORD = ("record", "{cfg}", "--out", "{tmp}/new.zarr", "--quiet")
FLOAT32 = "float32"
CASES = [
    # read-only store or mount
    Case(
        "ro-resume", ("record", "--resume", "--out", "{ro}/killed.zarr", "--quiet"), ("{ro}/killed.zarr",), needs="ro"
    ),
    Case("ro-compact", ("compact", "{ro}/done.zarr", "--quiet"), ("{ro}/done.zarr", "not writable"), needs="ro"),
    Case(
        "ro-overwrite",
        ("record", "{cfg}", "--overwrite", "--out", "{ro}/done.zarr", "--quiet"),
        ("{ro}/done.zarr", "not writable"),
        needs="ro",
    ),
    Case("ro-new-store", ("record", "{cfg}", "--out", "{ro}/new.zarr", "--quiet"), ("{ro}/new.zarr",), needs="ro"),
    Case(
        "ro-new-sweep",
        ("sweep", "{cfg}", "--grid", "data.seed=0,1", "--out", "{ro}/sweep"),
        ("{ro}/sweep",),
        needs="ro",
    ),
    Case("ro-analysis-out", ("analyze", "gsnr", "{ro}/done.zarr", "-o", "{ro}/g.csv"), ("{ro}/g.csv",), needs="ro"),
    # a file where a directory should be, a file system that takes no directories
    Case(
        "out-under-a-file",
        ("record", "{cfg}", "--out", "{target}/x.zarr", "--quiet"),
        ("{target}", "a file"),
        make=_file,
    ),
    Case(
        "sweep-under-a-file",
        ("sweep", "{cfg}", "--grid", "data.seed=0,1", "--out", "{target}/s"),
        ("{target}",),
        make=_file,
    ),
    Case("out-in-proc", ("record", "{cfg}", "--out", "/proc/x.zarr", "--quiet"), ("/proc/x.zarr",), needs="proc"),
    Case(
        "analysis-out-in-proc", ("analyze", "gsnr", "{target}", "-o", "/proc/g.csv"), ("/proc/g.csv",), 2, _copy, "proc"
    ),
    # garbage in an array's zarr.json: a damaged store (exit 1), named with the array
    *(
        Case(f"garbage-meta-{cmd}-{kind}", (*args, "{target}", *extra), ("params/0.weight",), 1, _garbage_meta(text))
        for kind, text, cmd, args, extra in (
            ("text", "garbage{", "info", ("info",), ()),
            ("text", "garbage{", "lipschitz", ("analyze", "lipschitz"), ("--device", "cpu", "--where", "train")),
            ("text", "garbage{", "compact", ("compact",), ()),  # with its progress bar: on a pipe it prints nothing
            ("empty-object", "{}", "info", ("info",), ()),
            ("list", "[]", "compact", ("compact",), ()),
        )
    ),
    # a damaged sweep manifest
    *(
        Case(
            f"sweep-manifest-{kind}", ("analyze", "trajectory", "{target}"), ("{target}/sweep.json",), make=_sweep(text)
        )
        for kind, text in (
            ("bad-json", '{"points": ['),
            ("no-points", "{}"),
            ("no-store", '{"points": [{"values": {}}]}'),
            ("store-outside", '{"points": [{"store": "../elsewhere.zarr"}]}'),
            ("not-utf8", b"\xff\xfe{}"),
        )
    ),
    # unusable output files
    Case(
        "analysis-out-is-a-dir", ("analyze", "gsnr", "{target}", "-o", "{tmp}"), ("-o {tmp}", "directory"), make=_copy
    ),
    Case("plot-out-is-a-dir", ("plot", "gsnr", "{target}", "-o", "{tmp}"), ("-o {tmp}", "directory"), make=_copy),
    Case(
        "plot-unknown-extension",
        ("plot", "gsnr", "{target}", "-o", "{tmp}/x.nosuchext"),
        (".nosuchext", ".png"),
        make=_copy,
    ),
    # devices
    Case(
        "lipschitz-cuda-without-gpu",
        ("analyze", "lipschitz", "{target}", "--device", "cuda"),
        ("--device cuda", "GPU"),
        make=_copy,
        needs="no-gpu",
    ),
    Case(
        "paths-cuda-without-gpu",
        ("analyze", "paths", "{target}", "--device", "cuda"),
        ("--device cuda", "GPU"),
        make=_copy,
        needs="no-gpu",
    ),
    Case(
        "lipschitz-no-such-device",
        ("analyze", "lipschitz", "{target}", "--device", "nosuch"),
        ("--device 'nosuch'",),
        make=_copy,
    ),
    Case(
        "paths-no-such-device",
        ("analyze", "paths", "{target}", "--device", "nosuch"),
        ("--device 'nosuch'",),
        make=_copy,
    ),
    Case(
        "plot-paths-no-such-device",
        ("plot", "paths", "{target}", "-o", "{tmp}/p.png", "--device", "nosuch"),
        ("--device 'nosuch'",),
        make=_copy,
    ),
    # absurd sizes, refused by an estimate before anything is allocated
    Case("epochs-1e8", (*RECORD, "--set", "train.epochs=100000000"), ("train.epochs = 100000000",), needs="small"),
    Case("epochs-1e10", (*RECORD, "--set", "train.epochs=10000000000"), ("train.epochs = 10000000000",)),
    Case("epochs-1e30", (*RECORD, "--set", f"train.epochs={10**30}"), (f"train.epochs = {10**30}",)),
    Case(
        "hidden-huge", (*RECORD, "--set", f"model.hidden=[{HUGE_WIDTH}]"), (f"model.hidden = [{HUGE_WIDTH}]", "memory")
    ),
    Case("replicates-huge", (*RECORD, "--set", f"train.replicates={RAM}"), (f"train.replicates = {RAM}",)),
    Case("n-train-huge", (*RECORD, "--set", f"data.n_train={RAM}"), (f"data.n_train = {RAM}",)),
    Case("dim-huge", (*RECORD, "--set", f"data.dim={RAM}"), (f"data.dim = {RAM}",)),
    Case(
        "cnn-channels-huge",
        (*RECORD, "--set", "data.name=digits", "--set", "model.arch=cnn", "--set", f"model.channels={HUGE_WIDTH}"),
        (f"model.channels = {HUGE_WIDTH}",),
    ),
    Case(
        "sweep-grid-1e8",
        ("sweep", "{cfg}", "--grid", "data.seed=0..100000000", "--out", "{tmp}/s"),
        ("--grid data.seed=0..100000000",),
        needs="small",
    ),
    Case(
        "sweep-grid-1e12",
        ("sweep", "{cfg}", "--grid", f"data.seed=0..{10**12}", "--out", "{tmp}/s"),
        (f"--grid data.seed=0..{10**12}",),
    ),
    Case(
        "sweep-grid-beyond-the-disk",
        ("sweep", "{cfg}", "--grid", f"data.seed=0..{STORES_BEYOND_DISK}", "--out", "{tmp}/s"),
        ("--grid data.seed=",),
    ),
    Case(
        "sweep-grids-multiply",
        ("sweep", "{cfg}", "--grid", "data.seed=0..1000000", "--grid", "model.seed=0..1000000", "--out", "{tmp}/s"),
        ("--grid", "1000002000001 points"),
    ),
    # numbers beyond float32 or torch's seed range; non-finite numbers
    Case("lr-above-float32", (*RECORD, "--set", "train.lr=1e39"), ("train.lr = 1e+39", FLOAT32)),
    Case(
        "weight-decay-above-float32",
        (*RECORD, "--set", "train.weight_decay=1e39"),
        ("train.weight_decay = 1e+39", FLOAT32),
    ),
    Case(
        "decay-factor-above-float32",
        (*RECORD, "--set", "train.lr_decay.factor=1e39"),
        ("train.lr_decay.factor = 1e+39", FLOAT32),
    ),
    Case(
        "decayed-lr-above-float32",
        (*RECORD, "--set", "train.lr_decay={{every_epochs = 1, factor = 1e20}}"),
        ("train.lr_decay.factor = 1e+20", FLOAT32),
    ),
    Case("lr-beyond-float64", (*RECORD, "--set", f"train.lr={10**400}"), ("train.lr", "not a finite number")),
    Case("model-seed-2-64", (*RECORD, "--set", f"model.seed={2**64}"), (f"model.seed = {2**64}", "2**64")),
    Case("lr-inf", (*RECORD, "--set", "train.lr=inf"), ("train.lr = inf", "finite")),
    Case("weight-decay-inf", (*RECORD, "--set", "train.weight_decay=inf"), ("train.weight_decay = inf", "finite")),
    Case(
        "decay-factor-inf", (*RECORD, "--set", "train.lr_decay.factor=inf"), ("train.lr_decay.factor = inf", "finite")
    ),
    Case("freq-inf", (*RECORD, "--set", "data.freq=inf"), ("data.freq = inf", "finite")),
    Case("freq-nan", (*RECORD, "--set", "data.freq=nan"), ("data.freq = nan", "finite")),
    Case("checkpoint-every-s-inf", (*RECORD, "--set", "record.checkpoint_every_s=inf"), ("record.checkpoint_every_s",)),
]


def _skip_reason(case: Case, ro: ReadOnly | None) -> str | None:
    if case.needs == "ro" and ro is None:
        return "no read-only directory can be made here (root, and no mount namespace)"
    if case.needs == "no-gpu" and HAS_CUDA:
        return "this machine has a GPU"
    if case.needs == "proc" and not Path("/proc/self").exists():
        return "no /proc here"
    if case.needs == "small" and not _refused_here(case):
        return "the issue's literal size fits this (very large) machine; the larger cases cover it"
    return None


def _refused_here(case: Case) -> bool:
    """Whether the budget refuses the case's config (or grid) on this machine: then the CLI must too."""
    if case.args[0] == "sweep":
        try:
            budget.check_points(100_000_001, "data.seed")
        except config.ConfigError:
            return True
        return False
    raw = json.loads(json.dumps(TINY))
    for i, arg in enumerate(case.args):
        if arg == "--set":
            config.apply_override(raw, case.args[i + 1])
    try:
        budget.check(config.from_dict(raw), Path(tempfile.gettempdir()) / "x.zarr")
    except config.ConfigError:
        return True
    return False


# As root, permissions bind nobody: the command runs in its own mount namespace, where the directory is
# bind-mounted read-only onto itself (EROFS); the mount ends with the command. Other users: no write bits.
READ_ONLY_MOUNT = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'


@dataclass(frozen=True)
class ReadOnly:
    """A directory holding `done.zarr` (complete) and `killed.zarr` (interrupted) that commands see read-only."""

    path: Path
    namespace: bool  # True: read-only inside `unshare --mount` only (root); False: the directories lost their w bits

    def cli(self, *args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        cmd = gentrace_cmd(*args)
        if self.namespace:
            cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", READ_ONLY_MOUNT, str(self.path), *cmd]
        return subprocess.run(cmd, env=ENV, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def _namespaces_work(directory: Path) -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = f'! touch "{directory}/probe" 2>/dev/null'
    cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", READ_ONLY_MOUNT, str(directory)]
    done = subprocess.run([*cmd, "sh", "-c", probe], capture_output=True, check=False, timeout=60)
    return done.returncode == 0 and not (directory / "probe").exists()


def _directories(root: Path) -> list[Path]:
    return [root, *(p for p in root.rglob("*") if p.is_dir())]


@pytest.fixture(scope="module")
def read_only(tmp_path_factory: pytest.TempPathFactory, reference_store: Path) -> Iterator[ReadOnly | None]:
    """The read-only directory of the `ro` cases; None where none can be made (root without mount namespaces)."""
    ro = tmp_path_factory.mktemp("read-only")
    shutil.copytree(reference_store, ro / "done.zarr")
    shutil.copytree(reference_store, ro / "killed.zarr")
    meta = ro / "killed.zarr" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["status"] = "interrupted"
    meta.write_text(json.dumps(doc))
    if os.geteuid() == 0:
        yield ReadOnly(ro, namespace=True) if _namespaces_work(ro) else None
        return
    for directory in _directories(ro):
        directory.chmod(0o555)
    try:
        yield ReadOnly(ro, namespace=False)
    finally:
        for directory in _directories(ro):
            directory.chmod(0o755)


@dataclass
class Outcome:
    done: subprocess.CompletedProcess[str]
    fill: dict[str, str]


def run_case(case: Case, tmp: Path, cfg: Path, finished: Path, ro: ReadOnly | None) -> Outcome:
    scratch = tmp / case.id
    scratch.mkdir()
    fill = {"cfg": str(cfg), "tmp": str(scratch), "target": str(scratch / "target"), "ro": str(ro and ro.path)}
    if case.make is not None:
        case.make(scratch / "target", finished)
    args = [a.format(**fill) for a in case.args]
    if case.needs == "ro":
        assert ro is not None
        return Outcome(ro.cli(*args, cwd=scratch), fill)
    return Outcome(run_cli(*args, cwd=scratch), fill)


@pytest.fixture(scope="module")
def outcomes(
    tmp_path_factory: pytest.TempPathFactory, reference_store: Path, read_only: ReadOnly | None
) -> dict[str, Future[Outcome]]:
    tmp = tmp_path_factory.mktemp("bad-inputs")
    cfg = tiny_config(tmp)
    jobs = {
        case.id: partial(run_case, case, tmp, cfg, reference_store, read_only)
        for case in CASES
        if _skip_reason(case, read_only) is None
    }
    return concurrently(jobs)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_error_line(
    case: Case, outcomes: dict[str, Future[Outcome]], read_only: ReadOnly | None
) -> None:
    reason = _skip_reason(case, read_only)
    if reason is not None:
        pytest.skip(reason)
    outcome = outcomes[case.id].result()
    line = one_error_line(outcome.done.stderr)
    assert outcome.done.returncode == case.code, outcome.done.stderr
    assert outcome.done.stdout == ""
    for name in case.names:
        assert name.format(**outcome.fill) in line, line


def test_read_only_stores_are_left_as_they_were(
    outcomes: dict[str, Future[Outcome]], read_only: ReadOnly | None
) -> None:
    if read_only is None:
        pytest.skip("no read-only directory can be made here")
    for case in CASES:
        if case.needs == "ro":
            outcomes[case.id].result()
    assert sorted(p.name for p in read_only.path.iterdir()) == ["done.zarr", "killed.zarr"]
    status = json.loads((read_only.path / "killed.zarr" / "zarr.json").read_text())["attributes"]["status"]
    assert status == "interrupted"


def test_read_only_stores_can_still_be_read(read_only: ReadOnly | None) -> None:
    if read_only is None:
        pytest.skip("no read-only directory can be made here")
    store = read_only.path / "done.zarr"
    resumed = read_only.cli("record", "--resume", "--out", store, "--quiet")  # complete: nothing to write
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.strip() == str(store)
    info = read_only.cli("info", store)
    assert info.returncode == 0, info.stderr
    assert "complete" in info.stdout


# -- the pieces, without a subprocess ------------------------------------------------------------
ARCHS = [
    ("mlp", "sinusoid", {"hidden": (7, 5)}),
    ("mlp-dropout", "digits", {"hidden": (6,), "dropout": 0.5}),
    ("mlp-no-hidden", "cos2d", {"hidden": ()}),
    ("cnn", "digits", {"channels": 3, "hidden": (9,)}),
    ("cnn-dropout", "digits", {"channels": 2, "hidden": (4,), "dropout": 0.1}),
    ("resnet18", "digits", {}),
    ("vgg11", "digits", {"hidden": (16, 8)}),
    ("alexnet", "digits", {"hidden": (16, 8)}),
    ("alexnet-no-hidden", "digits", {"hidden": ()}),
]


@pytest.mark.parametrize(("arch", "data", "options"), ARCHS, ids=[a[0] for a in ARCHS])
def test_parameter_sizes_equal_the_built_model(arch: str, data: str, options: dict[str, Any]) -> None:
    from gentrace.task.losses import output_dim, resolve_loss
    from gentrace.task.models import build_model

    cfg = config.from_dict({"data": {"name": data, "n_train": 10, "n_test": 10}, "model": {"arch": arch.split("-")[0]}})
    cfg = replace(cfg, model=replace(cfg.model, **options))
    num_classes = 0 if data == "cos2d" else (2 if data == "sinusoid" else 10)
    model = build_model(cfg.model, budget.input_shape(cfg), output_dim(resolve_loss("auto", num_classes), num_classes))
    real = {name: p.numel() for name, p in model.named_parameters()}
    sizes = budget.parameter_sizes(cfg)
    assert sum(sizes.values()) == sum(real.values())
    assert {k: v for k, v in sizes.items() if k != "<backbone>"}.items() <= real.items()


SAMPLES = sorted((Path(__file__).parent.parent / "sample_configs").glob("*.toml"))


@pytest.mark.parametrize("path", SAMPLES, ids=[p.stem for p in SAMPLES])
def test_sample_configs_fit(path: Path, tmp_path: Path) -> None:
    cfg = config.load(path)
    budget.check(cfg, tmp_path / "x.zarr")
    budget.check(cfg, tmp_path / "x.zarr", gpu=True)


def test_store_estimate_is_below_the_real_store(reference_store: Path) -> None:
    from gentrace.store.reader import StoreReader

    cfg: RunConfig = config.from_dict(StoreReader(reference_store).config)
    estimate = sum(part.nbytes for part in budget.store_parts(cfg))
    on_disk = sum(f.stat().st_blocks * 512 for f in reference_store.rglob("*") if f.is_file())
    assert 0.1 * on_disk < estimate <= on_disk


FILE_ERRORS = [
    (
        "read-only",
        OSError(errno.EROFS, os.strerror(errno.EROFS), "/s/zarr.0123456789abcdef0123456789abcdef.partial"),
        2,
        "cannot write /s/zarr.json: Read-only",
    ),
    (
        "permission",
        PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/s/x"),
        2,
        "cannot use /s/x: Permission denied",
    ),
    ("disk-full", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/s/c/0"), 1, "cannot write /s/c/0: No space left"),
    ("io-error", OSError(errno.EIO, os.strerror(errno.EIO), "/s/c/0"), 1, "cannot use /s/c/0: Input/output error"),
]


@pytest.mark.parametrize(("exc", "code", "message"), [f[1:] for f in FILE_ERRORS], ids=[f[0] for f in FILE_ERRORS])
def test_file_errors_become_one_line(exc: OSError, code: int, message: str) -> None:
    error = file_error(exc)
    assert error is not None
    assert error.exit_code == code
    assert str(error).startswith(message), str(error)


def test_an_os_error_without_a_file_keeps_its_traceback() -> None:
    assert file_error(OSError(errno.EPIPE, "Broken pipe")) is None


def test_permission_denied_is_refused_before_anything(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """What a user without write permission sees (root, who runs the CLI cases above, is never denied)."""
    from gentrace.training import preflight

    (tmp_path / "s.zarr" / "params").mkdir(parents=True)
    monkeypatch.setattr(preflight.os, "access", lambda *_: False)
    with pytest.raises(config.ConfigError, match=r"--out .*new\.zarr: cannot create it in .*Permission denied"):
        preflight.new_store(tmp_path / "new.zarr")
    with pytest.raises(config.ConfigError, match=r"cannot resume .*s\.zarr: it is not writable \(Permission denied\)"):
        preflight.existing_store(tmp_path / "s.zarr", "resume")
