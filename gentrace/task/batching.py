"""How many samples one no-grad or input-gradient pass takes at a time, and in which memory layout.

Shared by the probes' evaluations (gentrace.record.evaluator) and the Lipschitz analysis: a pass over
a whole split in fixed 1024-sample batches is memory-bound on a CNN (a 16-channel 28x28 activation of
1024 samples is 51 MB, far beyond the caches), so the batch is sized by input volume instead, and
images go channels_last on the CPU.
"""

from __future__ import annotations

import math

import torch

# Input numbers per pass: ~0.5 MiB of float32 inputs on a CPU (activations a few times that stay in
# cache), 16 MiB on a GPU (enough work per kernel launch).
CHUNK_ELEMENTS = {"cpu": 2**17, "cuda": 2**22}
MAX_CHUNK = 16384


def auto_chunk(x: torch.Tensor) -> int:
    """Points per pass: about CHUNK_ELEMENTS[x's device type] input numbers, at most MAX_CHUNK, at least 1."""
    budget = CHUNK_ELEMENTS.get(x.device.type, CHUNK_ELEMENTS["cpu"])
    return max(1, min(MAX_CHUNK, budget // max(1, math.prod(x.shape[1:]))))


def layout(x: torch.Tensor) -> torch.memory_format:
    """channels_last for images on the CPU, else contiguous.

    oneDNN's NHWC convolutions and max-pools ran the 2-block cnn 1.05x (quiet machine) to 1.6x faster
    than NCHW ones; measured on CPU only, so GPUs keep NCHW. A conv follows its input's format, so the
    model's weights stay as they are.
    """
    return torch.channels_last if x.dim() == 4 and x.device.type == "cpu" else torch.contiguous_format
