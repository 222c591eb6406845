"""Record two fixed runs and write every analysis' output and the stores' bytes into a directory.

Run it in two checkouts and compare the directories (`diff -r`) to show that a change left the
store bytes and every analysis' CSV as they were:

    python tests/drivers/snapshot_outputs.py /tmp/before     # on the old checkout
    python tests/drivers/snapshot_outputs.py /tmp/after      # on the new one
    diff -r /tmp/before /tmp/after

It calls the CLI only (`python -m gentrace`), so it runs on any layout of the package. Volatile root
attributes (timestamps, writer timings, versions) are left out of the manifest; every other byte of
every file is hashed.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

VOLATILE = {
    "created",
    "finished",
    "writer",
    "writer_process",
    "gentrace_version",
    "torch_version",
    "python_version",
    "cuda_version",
}

RUNS = {
    "quickstart": [],
    "osgr": [
        "--set",
        "train.epochs=3",
        "--set",
        "record.eval_every_steps=1",
        "--set",
        "record.grad_moments.source=train-batches",
        "--set",
        "record.lipschitz_fine.every_steps=5",
    ],
}

ANALYSES = [
    ["gsnr"],
    ["gsnr", "--by", "layer"],
    ["gsnr", "--by", "param"],
    ["gsnr", "--replicate", "1"],
    ["osgr"],
    ["osgr", "--summary"],
    ["paths"],
    ["paths", "--kind", "cross"],
    ["paths", "--kind", "self"],
    ["paths", "--kind", "rank"],
    ["paths", "--kind", "ratio"],
    ["paths", "--kind", "overlap", "--pairs"],
    ["paths", "--kind", "rank", "--pairs"],
    ["mi"],
    ["mi", "--summary"],
    ["mi", "--reference", "fit-linear"],
    ["mi", "--reference", "null"],
    ["mi", "--split", "train"],
    ["mi", "--reference", "cnn2"],
    ["trajectory"],
    ["trajectory", "--by", "epoch"],
    ["trajectory", "--by", "step"],
    ["lipschitz", "--where", "train"],
    ["lipschitz", "--where", "far", "--quantiles", "0.5,1.0"],
    ["lipschitz", "--where", "test", "--jacobian"],
]


def gentrace(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gentrace", *args], capture_output=True, text=True, check=False)


def manifest(store: Path) -> dict[str, object]:
    files: dict[str, object] = {}
    for f in sorted(p for p in store.rglob("*") if p.is_file()):
        rel = f.relative_to(store).as_posix()
        if rel == "zarr.json":
            meta = json.loads(f.read_text())
            attrs = {k: v for k, v in meta["attributes"].items() if k not in VOLATILE}
            files[rel] = {**meta, "attributes": attrs}
        elif rel.startswith("derived/") or rel.endswith(".lock") or rel == ".gentrace.lock":
            continue  # mi reference caches are written by the analyses below
        else:
            files[rel] = hashlib.sha256(f.read_bytes()).hexdigest()
    return files


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for name, overrides in RUNS.items():
        store = out / f"{name}.zarr"
        rec = gentrace("record", "--quiet", "--out", str(store), "--device", "cpu", *overrides)
        if rec.returncode != 0:
            raise SystemExit(f"record {name} failed: {rec.stderr}")
        (out / f"{name}.manifest.json").write_text(json.dumps(manifest(store), indent=1, sort_keys=True))
        for args in ANALYSES:
            result = gentrace("analyze", *args, str(store))
            label = "_".join(a.strip("-") for a in args)
            (out / f"{name}.{label}.csv").write_text(result.stdout)
            (out / f"{name}.{label}.stderr").write_text(f"exit {result.returncode}\n{result.stderr}")
            print(f"{name} {' '.join(args)}: exit {result.returncode}", file=sys.stderr)
        verify = gentrace("verify", "--quiet", str(store))
        (out / f"{name}.verify.csv").write_text(verify.stdout)
        for f in store.rglob("*.lock"):
            f.unlink()


if __name__ == "__main__":
    main()
