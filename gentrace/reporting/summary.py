"""What `gentrace info` shows: config summary, status, rows per stream, sizes, compression, writer time."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from gentrace.core.errors import GentraceError
from gentrace.store import schema
from gentrace.store.reader import StoreReader, disk_usage


@dataclass(frozen=True)
class StreamSummary:
    """One stream: committed rows, arrays, uncompressed and on-disk bytes, and its step range."""

    name: str
    rows: int
    arrays: int
    raw_bytes: int
    disk_bytes: int
    first_step: int | None
    last_step: int | None


def _tolerant(compacting: bool, read: Callable[[], Any], default: Any) -> Any:
    """`read()`; while a compaction is unfinished an array may be between its two renames: then `default`."""
    if not compacting:
        return read()
    try:
        return read()
    except GentraceError:
        return default


def summarize(reader: StoreReader) -> dict[str, Any]:
    """Everything `info` prints, as plain data (also what `info --json` writes)."""
    attrs = reader.attrs
    compacting = bool(attrs.get(schema.COMPACTING_ATTR))
    streams = []
    for name, paths in reader.streams().items():
        rows = reader.committed(name)
        steps = _tolerant(compacting, partial(reader.array, schema.step_of(name)), None) if rows else None
        streams.append(
            StreamSummary(
                name=name,
                rows=rows,
                arrays=len(paths),
                raw_bytes=sum(_tolerant(compacting, partial(reader.logical_bytes, p), 0) for p in paths),
                disk_bytes=sum(reader.disk_bytes(p) for p in paths),
                first_step=int(steps[0]) if steps is not None else None,
                last_step=int(steps[-1]) if steps is not None else None,
            )
        )
    files, total_disk = disk_usage(reader.path)
    raw = sum(s.raw_bytes for s in streams)
    data = sum(s.disk_bytes for s in streams)
    return {
        "store": str(reader.path),
        "status": "compacting (run `gentrace compact` again to finish it)" if compacting else reader.status,
        "error": attrs.get("error"),
        "created": attrs.get("created"),
        "finished": attrs.get("finished"),
        "config": attrs.get("config", {}),
        "device": attrs.get("device"),
        "processes": attrs.get("processes", 1),
        "threads": attrs.get("threads"),
        "torch_version": attrs.get("torch_version"),
        "gentrace_version": attrs.get("gentrace_version"),
        "total_steps": attrs.get("total_steps"),
        "streams": [s.__dict__ for s in streams],
        "disk_bytes": total_disk,
        "files": files,
        "compacted": attrs.get("compacted"),
        "compression_ratio": raw / data if data else None,
        "writer": attrs.get("writer", {}),
        "writer_mib_per_s": _throughput(attrs.get("writer", {}), "busy_s"),
        "writer_mib_per_cpu_s": _throughput(attrs.get("writer", {}), "cpu_s"),
        "own_loop": attrs.get("own_loop"),
    }


def _throughput(writer: Any, seconds: str) -> float | None:
    """The writer's MiB handed over per second `busy_s` (wall) or `cpu_s`; None before it wrote (or an older store)."""
    if not isinstance(writer, dict):
        return None
    busy, handed = writer.get(seconds), writer.get("bytes")
    if not (isinstance(busy, int | float) and isinstance(handed, int | float)) or busy <= 0 or handed <= 0:
        return None
    return float(handed) / 2**20 / float(busy)


def describe_config(cfg: dict[str, Any]) -> str:
    """One line: data, model, optimizer, epochs, replicates."""
    sections = ("data", "model", "train")  # layout: not a store name (the config's sections)
    d, m, t = (cfg.get(section, {}) for section in sections)
    model = f"{m.get('arch')}"
    if m.get("arch") == "mlp":
        model += f" {m.get('hidden')}"
    noise = f", label_noise {d.get('label_noise')}" if d.get("label_noise") else ""
    return (
        f"{cfg.get('name')}: {d.get('name')}/{d.get('task')} n_train {d.get('n_train')} x {t.get('replicates')} "
        f"replicate(s), n_test {d.get('n_test')}{noise}; {model}; {t.get('optimizer')} lr {t.get('lr')} "
        f"batch {t.get('batch_size')}, {t.get('epochs')} epochs"
    )


def describe_own_loop(own: dict[str, Any]) -> str:
    """One line on a store recorded by a user's own loop: by what, the optimizer, the loss and its reduction."""
    optimizer = own.get("optimizer") or "none (a constant lr)"
    return (
        f"recorded by {own.get('recorded_by')}; optimizer {optimizer}, loss {own.get('loss')} "
        f"({own.get('reduction')} over the batch); data and model given in code"
    )


def human_bytes(n: float) -> str:
    """1234567 -> '1.2 MiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _ranks(processes: int) -> str:
    return f" x {processes} processes (torchrun)" if processes > 1 else ""


def _threads(threads: int | None) -> str:
    return f" ({threads} thread{'s' * (threads != 1)})" if isinstance(threads, int) else ""


def render(summary: dict[str, Any]) -> str:
    """Human-readable text for `gentrace info`."""
    lines = [
        f"store      {summary['store']}",
        f"status     {summary['status']}  (created {summary['created']}, finished {summary['finished'] or '-'})",
        *([f"error      {summary['error']}"] if summary.get("error") else []),
        f"config     {describe_config(summary['config'])}",
        *([f"own loop   {describe_own_loop(summary['own_loop'])}"] if summary.get("own_loop") else []),
        f"recorded   on {summary['device']}{_ranks(summary['processes'])}{_threads(summary.get('threads'))} "
        f"with torch {summary['torch_version']}, "
        f"gentrace {summary['gentrace_version']}; {summary['total_steps']} optimizer steps planned",
        "",
        f"{'stream':<14}{'rows':>8}{'steps':>16}{'arrays':>8}{'raw':>12}{'on disk':>12}{'ratio':>8}",
    ]
    for s in summary["streams"]:
        span = f"{s['first_step']}..{s['last_step']}" if s["rows"] else "-"
        ratio = f"{s['raw_bytes'] / s['disk_bytes']:.2f}" if s["disk_bytes"] else "-"
        lines.append(
            f"{s['name']:<14}{s['rows']:>8}{span:>16}{s['arrays']:>8}"
            f"{human_bytes(s['raw_bytes']):>12}{human_bytes(s['disk_bytes']):>12}{ratio:>8}"
        )
    ratio = summary["compression_ratio"]
    writer = summary["writer"]
    where = f"on disk    {human_bytes(summary['disk_bytes'])} in {summary['files']} files"
    if summary["compacted"]:
        where += " (compacted into shards)"
    busy, handed = float(writer.get("busy_s", 0) or 0), int(writer.get("bytes", 0) or 0)
    rate = f", {summary['writer_mib_per_s']:.0f} MiB/s" if summary.get("writer_mib_per_s") else ""
    per_cpu = summary.get("writer_mib_per_cpu_s")
    cpu = f"; {float(writer['cpu_s']):.2f} s of CPU, {per_cpu:.0f} MiB per CPU second" if per_cpu else ""
    lines += [
        "",
        f"{where}; compression ratio {ratio:.2f}" if ratio else where,
        f"writer     busy {busy:.2f} s over {writer.get('blocks', 0)} blocks "
        f"({human_bytes(handed)} handed over{rate}{cpu})",
    ]
    return "\n".join(lines)
