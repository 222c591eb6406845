"""Run the gentrace CLI under torchrun with a data error on one rank only (its data files missing on its node).

usage: python -m torch.distributed.run ... rank_fails.py RANK GENTRACE_ARGS...

On global rank RANK, building the data set raises the DataError a missing `data.root` raises; every
other rank builds its data as usual. The gentrace arguments go to `gentrace.cli.main()` unchanged.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from gentrace.cli import app as cli
from gentrace.core.errors import DataError
from gentrace.training import run

failing = int(sys.argv[1])
build_data = run.build_data


def build_data_or_fail(*args: Any, **kwargs: Any) -> Any:
    if int(os.environ["RANK"]) == failing:
        raise DataError("data.root = 'data/mnist' holds no MNIST files on this node")
    return build_data(*args, **kwargs)


run.build_data = build_data_or_fail  # type: ignore[assignment]
sys.argv = ["gentrace", *sys.argv[2:]]
cli.main()
