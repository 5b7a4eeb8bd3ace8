"""Real image datasets that ship inside packages, used to train and judge teachers.

Two sources are supported, both converted to 32x32 RGB so that the same small ViTs serve both:

* ``fashion-mnist``: the gzipped IDX files of Debian's ``dataset-fashion-mnist`` package
  (60k train / 10k test), or any directory holding the same four files.
* ``fashion-mnist-scattered``: the same items shrunk to 45-60% of the side and placed anywhere on
  the dark canvas (one fixed placement per image and split). As in ImageNet-like data, the object
  covers a minority of the patches (about 23%) at a varying position, so a classifier must find it:
  the setting SMI's foreground stopping assumes.
* ``digits``: scikit-learn's bundled handwritten digits (1797 images, 8x8), split once into a
  fixed, stratified train / held-out partition.

Any other evaluation data comes in through ``load_eval_data``: an image folder (one sub-folder per
class, as torchvision's ``ImageFolder``) or a ``datasets.save_to_disk`` directory with ``image`` and
``label`` columns, resized to the teacher's input size.

Train and held-out splits are never mixed: teachers are trained on ``train`` and every accuracy
this project reports is measured on ``test``.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

FASHION_MNIST_ENV = "SMI_FASHION_MNIST_DIR"
FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
DIGITS_CLASSES = tuple(str(d) for d in range(10))
DATASETS = ("fashion-mnist", "fashion-mnist-scattered", "digits")
SPLITS = ("train", "test")
IMAGE_SIZE = 32
_DIGITS_TEST_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 0
_SCATTER_SCALE = (0.45, 0.6)
_SCATTER_SEEDS = {"train": 0, "test": 1}


@dataclass(frozen=True)
class ImageSplit:
    """One split of a real dataset, held compactly as uint8.

    Attributes:
        name: dataset name (``"fashion-mnist"``, ``"digits"``, or the path given to ``load_eval_data``).
        split: ``"train"`` or ``"test"``.
        pixels: ``(N, C, H, W)`` uint8 images; the packaged datasets are ``(N, 1, 32, 32)`` grayscale.
        labels: ``(N,)`` int64 class indices.
        class_names: one name per class.
    """

    name: str
    split: str
    pixels: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return self.labels.numel()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def images(self, index: torch.Tensor | slice | None = None) -> torch.Tensor:
        """Float images in [0, 1], shape ``(n, C, H, W)``; one-channel pixels are replicated to RGB."""
        selected = self.pixels if index is None else self.pixels[index]
        if selected.shape[1] == 1:
            selected = selected.expand(-1, 3, -1, -1)
        return selected.float().div_(255.0).contiguous()

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(images in [0, 1], labels)`` in order, for evaluation."""
        for start in range(0, len(self), batch_size):
            window = slice(start, start + batch_size)
            yield self.images(window), self.labels[window]

    def subset(self, keep: torch.Tensor) -> "ImageSplit":
        """The rows where ``keep`` (bool ``(N,)``) holds; class names unchanged."""
        return ImageSplit(self.name, self.split, self.pixels[keep], self.labels[keep], self.class_names)

    def first(self, count: int | None) -> "ImageSplit":
        """The first ``count`` images (all of them when ``count`` is None, 0 or at least the split's length)."""
        if not count or count >= len(self):
            return self
        return ImageSplit(self.name, self.split, self.pixels[:count], self.labels[:count], self.class_names)

    def channel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std of the split in [0, 1] pixel units (grayscale: repeated over RGB)."""
        values = self.pixels.float().div(255.0)
        if values.shape[1] == 1:
            mean, std = values.mean().item(), values.std().item()
            return (mean,) * 3, (std,) * 3
        per_channel = values.transpose(0, 1).flatten(1)
        return tuple(per_channel.mean(1).tolist()), tuple(per_channel.std(1).tolist())


class DatasetNotFoundError(FileNotFoundError):
    """Raised when a dataset's files are missing, with the command that installs them."""


def load_split(name: str, split: str, data_dir: str | os.PathLike | None = None) -> ImageSplit:
    """Load one split of a real dataset at 32x32.

    Args:
        name: one of ``DATASETS``.
        split: ``"train"`` or ``"test"``.
        data_dir: for Fashion-MNIST, a directory holding the four IDX ``.gz`` files; defaults to
            ``$SMI_FASHION_MNIST_DIR`` or Debian's ``/usr/share/datasets/fashion-mnist``.

    Example:
        >>> test = load_split("digits", "test")
        >>> images, labels = next(test.batches(64))
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    if name == "fashion-mnist":
        return _load_fashion_mnist(split, data_dir)
    if name == "fashion-mnist-scattered":
        items = _load_fashion_mnist(split, data_dir)
        generator = torch.Generator().manual_seed(_SCATTER_SEEDS[split])
        return ImageSplit(name, split, scatter_objects(items.pixels, generator), items.labels, items.class_names)
    if name == "digits":
        return _load_digits(split)
    raise ValueError(f"unknown dataset {name!r}; use one of {DATASETS}")


def _resize_to_32(pixels: torch.Tensor) -> torch.Tensor:
    """Bilinear (antialiased) resize of ``(N, 1, h, w)`` uint8 images to 32x32 uint8."""
    resized = F.interpolate(pixels.float(), size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear",
                            align_corners=False, antialias=True)
    return resized.round_().clamp_(0, 255).to(torch.uint8)


def scatter_objects(pixels: torch.Tensor, generator: torch.Generator,
                    scale: tuple[float, float] = _SCATTER_SCALE) -> torch.Tensor:
    """Shrink each ``(N, 1, H, W)`` uint8 image by a random factor in ``scale`` and place it at a
    uniformly random position that keeps it whole on a black canvas of the same size."""
    n = pixels.shape[0]
    factor = scale[0] + torch.rand(n, generator=generator) * (scale[1] - scale[0])
    # grid_sample maps output to input coordinates (both in [-1, 1]): x_in = x_out / factor + shift,
    # and the item stays inside the canvas while |shift| <= 1 / factor - 1.
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (1 / factor - 1).unsqueeze(1)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / factor
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    placed = F.grid_sample(pixels.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return placed.round_().clamp_(0, 255).to(torch.uint8)


def _fashion_mnist_dir(data_dir: str | os.PathLike | None) -> Path:
    if data_dir is not None:
        return Path(data_dir)
    if os.environ.get(FASHION_MNIST_ENV):
        return Path(os.environ[FASHION_MNIST_ENV])
    return FASHION_MNIST_DEBIAN_DIR


def _read_idx(path: Path) -> torch.Tensor:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    array = torch.frombuffer(bytearray(data[4 + 4 * ndim:]), dtype=torch.uint8)
    return array.reshape(shape)


def _load_fashion_mnist(split: str, data_dir: str | os.PathLike | None) -> ImageSplit:
    root = _fashion_mnist_dir(data_dir)
    prefix = "train" if split == "train" else "t10k"
    images_path = root / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = root / f"{prefix}-labels-idx1-ubyte.gz"
    missing = [str(p) for p in (images_path, labels_path) if not p.is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"Fashion-MNIST files not found: {', '.join(missing)}. Install Debian's package with "
            "`sudo apt-get update && sudo apt-get install dataset-fashion-mnist`, or point "
            f"${FASHION_MNIST_ENV} (or data_dir=) at a directory holding "
            "train-/t10k-images-idx3-ubyte.gz and train-/t10k-labels-idx1-ubyte.gz."
        )
    pixels = _read_idx(images_path).unsqueeze(1)
    labels = _read_idx(labels_path).long()
    if pixels.shape[0] != labels.shape[0]:
        raise ValueError(f"{images_path} holds {pixels.shape[0]} images but {labels_path} "
                         f"holds {labels.shape[0]} labels")
    return ImageSplit("fashion-mnist", split, _resize_to_32(pixels), labels, FASHION_MNIST_CLASSES)


def _load_digits(split: str) -> ImageSplit:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # sklearn's digits are 0..16 intensities; stretch to the full uint8 range.
    pixels = torch.from_numpy(digits.images).float().mul(255.0 / 16.0).round().to(torch.uint8)
    labels = torch.from_numpy(digits.target).long()
    indices = torch.arange(labels.numel()).numpy()
    train_idx, test_idx = train_test_split(indices, test_size=_DIGITS_TEST_FRACTION,
                                           random_state=_DIGITS_SPLIT_SEED, stratify=labels.numpy())
    chosen = torch.from_numpy(train_idx if split == "train" else test_idx).sort().values
    return ImageSplit("digits", split, _resize_to_32(pixels[chosen].unsqueeze(1)), labels[chosen],
                      DIGITS_CLASSES)


class EvalDataError(ValueError):
    """Evaluation data that cannot be used (missing, empty, wrong columns, too many classes), and why."""


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def load_eval_data(path: str | os.PathLike, image_size: int | tuple[int, int], channels: int = 3,
                   num_classes: int | None = None) -> ImageSplit:
    """Real labelled images from disk, at a teacher's input size, for evaluation.

    Args:
        path: an image folder (``path/CLASS/*.png``: one sub-folder per class, classes in sorted order
            as torchvision's ``ImageFolder`` and ``datasets``' imagefolder), or a directory written by
            ``datasets``' ``save_to_disk`` with ``image`` and ``label`` columns (a ``DatasetDict`` is
            read from its ``test``, ``validation`` or only split).
        image_size: the teacher's input ``(height, width)`` (or one side); images are resized to it
            directly (no crop), bilinear with antialiasing.
        channels: the teacher's input channels (3: RGB, 1: grayscale).
        num_classes: the teacher's classifier size; more classes in the data is an error.

    Returns:
        An ``ImageSplit`` named after ``path`` (split ``"test"``), pixels ``(N, channels, H, W)`` uint8.

    Example:
        >>> split = load_eval_data("my_val/", (224, 224))
        >>> images, labels = next(split.batches(64))
    """
    root = Path(path)
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if not root.exists():
        raise EvalDataError(f"{root} not found; pass an image folder (one sub-folder per class) or a "
                            "datasets.save_to_disk directory")
    if not root.is_dir():
        raise EvalDataError(f"{root} is a file; pass an image folder (one sub-folder per class) or a "
                            "datasets.save_to_disk directory")
    if any((root / marker).is_file() for marker in ("state.json", "dataset_dict.json", "dataset_info.json")):
        images, labels, class_names = _read_saved_dataset(root)
    else:
        images, labels, class_names = _read_image_folder(root)
    if num_classes is not None and len(class_names) > num_classes:
        raise EvalDataError(f"{root} has {len(class_names)} classes but the model has {num_classes} outputs; "
                            "evaluate a model with as many classes, or keep only the first "
                            f"{num_classes} class folders")
    # Decoded one at a time into the uint8 result at the teacher's size: the source images (memory-mapped
    # Arrow rows, or files) are never all held decoded.
    pixels = torch.empty(len(labels), channels, *size, dtype=torch.uint8)
    for row, image in enumerate(images):
        pixels[row] = _to_tensor(image, size, channels)
    return ImageSplit(str(root), "test", pixels, torch.tensor(labels, dtype=torch.long), tuple(class_names))


def _to_tensor(image, size: tuple[int, int], channels: int) -> torch.Tensor:
    """A PIL image as ``(channels, H, W)`` uint8 at ``size``."""
    import numpy as np

    image = image.convert("L" if channels == 1 else "RGB")
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    array = array.unsqueeze(0) if array.ndim == 2 else array.permute(2, 0, 1)
    if tuple(array.shape[1:]) != size:
        # Torch's antialiased bilinear, the same resize the packaged datasets get.
        array = F.interpolate(array.unsqueeze(0).float(), size=size, mode="bilinear", align_corners=False,
                              antialias=True).squeeze(0).round_().clamp_(0, 255).to(torch.uint8)
    return array


def _read_image_folder(root: Path) -> tuple[Iterator, list[int], list[str]]:
    """torchvision's ``DatasetFolder`` over ``root``: class folders in sorted order (hidden ones skipped),
    images found recursively in each; the images are opened lazily, as the result iterates."""
    from PIL import Image, UnidentifiedImageError
    from torchvision.datasets import DatasetFolder

    class ClassFolders(DatasetFolder):
        def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
            classes = sorted(p.name for p in Path(directory).iterdir() if p.is_dir() and not p.name.startswith("."))
            if not classes:
                raise EvalDataError(f"{root} has no class sub-folders; lay images out as {root}/CLASS_NAME/IMAGE.png "
                                    "(one sub-folder per class), or pass a datasets.save_to_disk directory")
            return classes, {name: index for index, name in enumerate(classes)}

    def load(file: str):
        try:
            with Image.open(file) as image:
                image.load()
                return image.copy()
        except (UnidentifiedImageError, OSError) as err:
            raise EvalDataError(f"{file} is not a readable image ({err}); remove or replace it") from err

    folder = ClassFolders(str(root), loader=load, extensions=IMAGE_EXTENSIONS, allow_empty=True)
    if not folder.samples:
        raise EvalDataError(f"{root} has class folders {folder.classes[:5]} but no images in them "
                            f"(looked for {', '.join(IMAGE_EXTENSIONS)})")
    return (folder[index][0] for index in range(len(folder))), list(folder.targets), list(folder.classes)


def _read_saved_dataset(root: Path) -> tuple[Iterator, list[int], list[str]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(root))
    except Exception as err:  # datasets raises FileNotFoundError, ValueError or pyarrow errors
        raise EvalDataError(f"{root} looks like a saved dataset but cannot be loaded ({err})") from err
    if isinstance(loaded, datasets.DatasetDict):
        split = next((s for s in ("test", "validation", "valid", "val") if s in loaded), None)
        if split is None and len(loaded) == 1:
            split = next(iter(loaded))
        if split is None:
            raise EvalDataError(f"{root} holds splits {sorted(loaded)}; save the held-out split alone or name "
                                "it test or validation")
        loaded = loaded[split]
    missing = [c for c in ("image", "label") if c not in loaded.column_names]
    if missing:
        raise EvalDataError(f"{root} has columns {loaded.column_names} but needs 'image' and 'label'; rename "
                            "them with dataset.rename_column(OLD, NEW) before save_to_disk")
    if len(loaded) == 0:
        raise EvalDataError(f"{root} holds no rows")
    feature = loaded.features["label"]
    labels = [int(v) for v in loaded["label"]]
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
    else:
        names = [str(i) for i in range(max(labels) + 1)]
    if min(labels) < 0:
        raise EvalDataError(f"{root} has negative labels; every row needs a class index")
    if not isinstance(loaded.features["image"], datasets.Image):
        loaded = loaded.cast_column("image", datasets.Image())
    # Row by row from the memory-mapped table: each image is decoded when the caller reaches it.
    return (row["image"] for row in loaded.select_columns(["image"])), labels, names
