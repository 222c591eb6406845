"""Record your own training loop with gentrace.Run: a small CNN on scikit-learn's 8x8 digits.

    python examples/own_loop.py runs/own.zarr
    gentrace analyze gsnr runs/own.zarr
    gentrace analyze lipschitz runs/own.zarr      # the factory below lets the CLI rebuild the network

The loop is ordinary PyTorch: its own optimizer and lr schedule, random crop and flip augmentation,
bfloat16 autocast on the CPU, a checkpoint of its own every epoch. gentrace only needs the `with`
block and one `run.step(loss, y)` after each `optimizer.step()`; `run.state_dict()` goes into the
checkpoint, so `--resume` continues the store where the checkpoint left it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

import gentrace

EPOCHS, BATCH = 3, 50


def small_cnn(input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """Conv 3x3 (8 channels) -> ReLU -> 2x2 max pool -> linear (a factory: gentrace can rebuild it)."""
    channels, height, width = input_shape
    return nn.Sequential(
        nn.Conv2d(channels, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * (height // 2) * (width // 2), num_outputs),
    )


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop (pad 1, crop 8x8) and random horizontal flip of a batch [B, 1, 8, 8]."""
    padded = nn.functional.pad(x, (1, 1, 1, 1))
    dx, dy = torch.randint(0, 3, (2,), generator=gen).tolist()
    out = padded[:, :, dy : dy + 8, dx : dx + 8]
    return out.flip(3) if torch.rand((), generator=gen) < 0.5 else out


def main() -> None:
    """Train EPOCHS epochs (or continue from the checkpoint with --resume), recording into STORE."""
    parser = argparse.ArgumentParser()
    parser.add_argument("store", nargs="?", type=Path, default=Path("runs/own.zarr"))
    parser.add_argument("--resume", action="store_true", help="continue from STORE's checkpoint (STORE.pt)")
    args = parser.parse_args()
    checkpoint = args.store.with_suffix(".pt")

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)[:, None]
    y = torch.from_numpy(bunch.target.astype(np.int64))
    train, test = (x[:500], y[:500]), (x[500:800], y[500:800])

    torch.manual_seed(0)
    model = small_cnn((1, 8, 8), 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    steps = len(train[0]) // BATCH
    run = gentrace.Run(
        args.store,
        model,
        train=train,  # what the probes evaluate: the un-augmented sets
        test=test,
        loss="cross_entropy",
        record={"checkpoint_every_s": 0, "lipschitz_fine": {"every_steps": 5}, "inputs": True},
        epochs=EPOCHS,
        steps_per_epoch=steps,
        optimizer=opt,
        factory=f"{Path(__file__).resolve()}:small_cnn",
        resume=args.resume,
        overwrite=not args.resume,
    )
    first = 0
    if args.resume:
        saved = torch.load(checkpoint, weights_only=True)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["sched"])
        run.load_state_dict(saved["gentrace"])
        first = saved["epoch"] + 1
    gen = torch.Generator().manual_seed(1)
    with run:
        for epoch in range(first, EPOCHS):
            gen.manual_seed(epoch)
            order = torch.randperm(len(train[0]), generator=gen)
            for i in range(steps):
                idx = order[i * BATCH : (i + 1) * BATCH]
                xb, yb = augment(train[0][idx], gen), train[1][idx]
                opt.zero_grad()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = nn.functional.cross_entropy(model(xb), yb)
                loss.backward()
                opt.step()
                run.step(loss, yb)
            sched.step()
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "sched": sched.state_dict()}
            torch.save(state | {"epoch": epoch, "gentrace": run.state_dict()}, checkpoint)
    print(args.store)


if __name__ == "__main__":
    main()
