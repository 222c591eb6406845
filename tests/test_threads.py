"""`train.threads`: auto takes the cores other processes leave free, and a resume reuses the stored count."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import StopAt, wait_until

from gentrace.core import config
from gentrace.core.errors import ConfigError
from gentrace.store.reader import StoreReader
from gentrace.training import run, threads

TINY = [
    "data.name='sinusoid'",
    "data.dim=10",
    "data.n_train=64",
    "data.n_test=32",
    "model.hidden=[8]",
    "train.batch_size=16",
    "train.epochs=3",
    "record.params.every_epochs=1",
]


def tiny(*overrides: str) -> config.RunConfig:
    return config.load(None, [*TINY, *overrides])


def test_fair_share_is_the_free_cores_rounded_between_one_and_the_ceiling() -> None:
    assert threads.fair_share(2, 0.0, 2) == 2
    assert threads.fair_share(2, 0.4, 2) == 2
    assert threads.fair_share(2, 0.6, 2) == 1
    assert threads.fair_share(2, 1.0, 2) == 1
    assert threads.fair_share(2, 5.0, 2) == 1  # never 0
    assert threads.fair_share(16, 3.0, 8) == 8  # never above torch's default


def test_others_busy_subtracts_this_process() -> None:
    before = threads.Reading(0.0, busy=100, total=400, own=10)
    # 2 CPUs, 100 ticks each elapsed: 150 busy ticks of which 30 are ours -> 1.2 CPUs used by others
    after = threads.Reading(1.0, busy=250, total=600, own=40)
    assert threads.others_busy(before, after, 2) == pytest.approx(1.2)
    assert threads.others_busy(before, before, 2) == 0.0


def test_read_parses_proc_counters_of_the_allowed_cpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "self").mkdir()
    (tmp_path / "stat").write_text(
        "cpu  9 9 9 9 9 9 9 9 0 0\n"
        "cpu0 10 0 5 80 5 0 0 0 0 0\n"
        "cpu1 20 1 4 70 3 1 1 0 0 0\n"
        "cpu2 1000 0 0 0 0 0 0 0 0 0\n"  # not allowed: ignored
        "intr 12345\n"
    )
    (tmp_path / "self" / "stat").write_text("123 (py thon) R 1 2 3 4 5 6 7 8 9 10 7 3 0 0\n")
    monkeypatch.setattr(threads, "_cpus", lambda: {0, 1})
    reading = threads.read(tmp_path)
    assert reading is not None
    assert (reading.total, reading.busy, reading.own) == (100 + 100, 15 + 27, 10)
    assert threads.read(tmp_path / "missing") is None
    (tmp_path / "self" / "stat").write_text("123 (truncated)\n")  # a /proc this parser does not know
    assert threads.read(tmp_path) is None


def test_explicit_counts_win(monkeypatch: pytest.MonkeyPatch) -> None:
    assert threads.choose(3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert threads.choose("auto") == 5
    monkeypatch.delenv("OMP_NUM_THREADS")
    cpus = len(threads._cpus())
    assert threads.choose("auto", local_world=cpus) == 1  # torchrun ranks share the node's cores


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="auto samples Linux's /proc/stat")
def test_auto_leaves_a_busy_process_its_core(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "_IMPORTED", None)  # sample from now, not from an import before the spinner
    cpus = len(threads._cpus())
    spin = subprocess.Popen(
        [sys.executable, "-c", "print('spinning', flush=True)\nwhile True: pass"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert spin.stdout is not None
        wait_until(lambda: spin.stdout is not None and spin.stdout.readline().startswith("spinning"), spin)
        chosen = threads.choose("auto")
    finally:
        spin.kill()
        spin.wait()
    assert 1 <= chosen <= max(1, cpus - 1)


def test_bad_counts_are_refused_naming_the_key() -> None:
    for bad in ("train.threads=0", "train.threads=-2", "train.threads='many'"):
        with pytest.raises(ConfigError, match=r"train\.threads"):
            tiny(bad)


def test_count_is_stored_restored_and_reused_by_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    used: list[int] = []
    real_set = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (used.append(n), real_set(n))[1])
    monkeypatch.setattr(threads, "choose", lambda requested, local_world=1: 1)
    with pytest.raises(run.Interrupted):
        run.record(tiny(), tmp_path / "cut", device="cpu", observers=[StopAt(7)])
    assert StoreReader(tmp_path / "cut").attrs["threads"] == 1
    assert torch.get_num_threads() == before  # a library call leaves the process as it found it
    assert used == [1, before]

    def must_not_choose(requested: object, local_world: int = 1) -> int:
        raise AssertionError("resume must reuse the stored count")

    monkeypatch.setattr(threads, "choose", must_not_choose)
    used.clear()
    run.record(None, tmp_path / "cut", device="cpu", resume=True)
    assert used == [1, before]
    assert StoreReader(tmp_path / "cut").status == "complete"
