#!/usr/bin/env bash
# The GPU check of issue 16, as one prepared script for a machine with an NVIDIA GPU:
# record_overhead.py on the quick start and on the CNN config (MNIST-format files it writes itself),
# on CUDA, with each stream's cost beside its floor. Target: on / off <= 1.05 for the CNN config at its
# cadence, minus the probes' own arithmetic (the per-stream floors printed).
#   bash benchmarks/gpu_overhead.sh            (from the repository root, gentrace installed)
set -euo pipefail
python=${PYTHON:-python}
"$python" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU here'; print(torch.cuda.get_device_name())"
"$python" benchmarks/record_overhead.py --device cuda --repeats 3 --streams
"$python" benchmarks/record_overhead.py --device cuda --repeats 3 --streams --no-plain --preset cnn
