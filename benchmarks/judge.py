"""An independent judge of inverted images: a small CNN trained only on the real train split.

No attention and no weights shared with the teacher, so its accuracy on an image measures how much
of the class evidence there is the data's own (shapes on a background), not features only the
teacher responds to. Shared by ``inversion_realism.py`` and ``stopping_premise.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from smi_plugin.data import ImageSplit


def default_epochs(train: ImageSplit) -> int:
    """About 100k images' worth: 2 epochs on Fashion-MNIST, 69 on digits."""
    return max(2, 100_000 // len(train))


def train_judge(train: ImageSplit, epochs: int | None = None, seed: int = 0) -> nn.Module:
    """A two-layer CNN on grayscale real training images (its only data)."""
    torch.manual_seed(seed)
    judge = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.LazyLinear(train.num_classes))
    pixels, labels = train.pixels.float() / 255, train.labels
    judge(pixels[:1])
    optimizer = torch.optim.Adam(judge.parameters(), lr=2e-3)
    for _ in range(epochs or default_epochs(train)):
        for batch in torch.randperm(len(labels)).split(128):
            loss = F.cross_entropy(judge(pixels[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return judge.eval()


@torch.no_grad()
def judge_accuracy(judge: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 of the judge on ``(B, C, H, W)`` images in ``[0, 1]`` (channels averaged to gray)."""
    return (judge(images.mean(1, keepdim=True)).argmax(1) == labels).float().mean().item()


def background_level(train: ImageSplit) -> float:
    """The data's empty-background pixel value: the median over images of their 5% quantile."""
    return train.pixels.flatten(1).float().div(255).quantile(0.05, dim=1).median().item()
