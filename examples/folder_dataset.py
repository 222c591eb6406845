"""A gentrace data factory that reads an image folder of PNGs through torchvision's ImageFolder, and a model.

`data.name = "folder_dataset.py:image_folder"`, `data.options = { root = "...", size = 16 }`: the folder
holds `train/<class>/*.png` and `test/<class>/*.png` (ImageFolder's layout: one subfolder per class,
classes numbered in sorted order). Images are converted to one grey channel, resized to `size` x
`size` and scaled to [0, 1] by ToTensor. The factory returns the two ImageFolder data sets; gentrace
reads their (image, class) items and draws the training subsets and the test set from them.

`model.arch = "folder_dataset.py:small_cnn"`: two conv-ReLU-pool blocks and a linear head, width
`model.options.channels`.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn
from torchvision import datasets, transforms


def image_folder(root: str, size: int = 16) -> tuple[datasets.ImageFolder, datasets.ImageFolder]:
    """Gentrace's data factory signature: `(**data.options) -> (train, test)`."""
    folder = Path(root).expanduser()
    if not (folder / "train").is_dir() or not (folder / "test").is_dir():
        raise FileNotFoundError(f"{folder} needs train/ and test/ subfolders with one folder of PNGs per class")
    prepare = transforms.Compose([transforms.Grayscale(), transforms.Resize((size, size)), transforms.ToTensor()])
    return (
        datasets.ImageFolder(str(folder / "train"), transform=prepare),
        datasets.ImageFolder(str(folder / "test"), transform=prepare),
    )


def small_cnn(input_shape: tuple[int, ...], num_outputs: int, channels: int = 8) -> nn.Module:
    """Gentrace's model factory signature: `(input_shape, num_outputs, **model.options) -> nn.Module`."""
    c, h, w = input_shape
    return nn.Sequential(
        nn.Conv2d(c, channels, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(channels, channels, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(channels * (h // 4) * (w // 4), num_outputs),
    )
