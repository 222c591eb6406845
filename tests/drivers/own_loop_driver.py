"""A user's own training loop recorded with gentrace.Run, the way the README shows it, for the tests.

    python own_loop_driver.py STORE CKPT [--kill-at STEP] [--resume] [--epochs E]

Trains the tiny sinusoid MLP of tests/conftest.py (TINY) with its own SGD loop and data order,
saving a checkpoint of its own (model, optimizer, epoch, `run.state_dict()`) at the end of every
epoch. `--kill-at STEP`: at that step (after its `run.step`) the loop makes the store commit every
row so far (run.state_dict(), not saved), then SIGKILLs itself: the store then holds rows past the
last checkpoint that a resume must drop. `--resume`: continue from the checkpoint CKPT.
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

import numpy as np
import torch

import gentrace
from gentrace.core import config
from gentrace.task.data import build_data
from gentrace.task.models import build_model

SETS = [
    "data.name=sinusoid",
    "data.dim=10",
    "data.n_train=100",
    "data.n_test=100",
    "model.hidden=[16]",
    "train.replicates=1",
]
RECORD = {
    "checkpoint_every_s": 0,
    "eval_every_steps": 1,
    "lipschitz_fine": {"every_steps": 3},
    "grad_moments": {"source": "train-batches", "every_epochs": 2},
    "predictions": {"every_steps": 4},
}
BATCH = 20


def main() -> None:
    """Train, checkpoint each epoch, maybe kill or resume."""
    parser = argparse.ArgumentParser()
    parser.add_argument("store", type=Path)
    parser.add_argument("ckpt", type=Path)
    parser.add_argument("--kill-at", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = config.load(None, SETS)
    data = build_data(cfg.data, 1)
    model = build_model(cfg.model, data.input_shape, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = data.x_train[0], data.y_train[0]
    steps = len(x) // BATCH
    run = gentrace.Run(
        args.store,
        model,
        train=(x, y),
        test=(data.x_test, data.y_test),
        record=RECORD,
        epochs=args.epochs,
        steps_per_epoch=steps,
        optimizer=opt,
        resume=args.resume,
        overwrite=not args.resume,
    )
    first = 0
    if args.resume:
        saved = torch.load(args.ckpt, weights_only=True)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        run.load_state_dict(saved["gentrace"])
        first = int(saved["epoch"]) + 1
    with run:
        for epoch in range(first, args.epochs):
            order = torch.from_numpy(np.random.default_rng(epoch).permutation(len(x)))
            for i in range(steps):
                idx = order[i * BATCH : (i + 1) * BATCH]
                xb, yb = x[idx], y[idx]
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(xb), yb)
                loss.backward()
                opt.step()
                run.step(loss, yb)
                if run.step_count == args.kill_at:
                    run.state_dict()  # every row so far committed, then the kill
                    os.kill(os.getpid(), signal.SIGKILL)
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch}
            state["gentrace"] = run.state_dict()
            torch.save(state, args.ckpt.with_suffix(".tmp"))
            os.replace(args.ckpt.with_suffix(".tmp"), args.ckpt)


if __name__ == "__main__":
    main()
