"""``convlens data fashion-mnist``: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` as an ImageFolder tree.

The gzipped idx files are read with :func:`read_idx` (numpy and gzip; magic number and sizes checked). ``n``
images are drawn class-balanced (``n // 10`` per class, one more for the first ``n % 10`` classes), per class a
seeded random choice, written in the order of the source file. Layout written by :func:`write_fashion_mnist`::

    DIR/concepts.json                       the class of each image (a foreground concept), its index in the split
    DIR/images/<k>_<class>/<index>.png      grey 28 x 28 images, the pixels of the idx file
    DIR/masks/<k>_<class>/<index>.png       foreground masks: 255 where the item's pixel is non-zero, else 0

Class folders start with the Fashion-MNIST label ``k``, so that convlens numbers the classes as the dataset does;
with the masks, ``compare-filters`` scores the filters' foreground precision on the data.
"""

from __future__ import annotations

import gzip
import math
import os
import re
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from convlens.core.errors import ConvlensError
from convlens.data.dataset_folders import claim_folder, recorded_files, remove_stale
from convlens.data.images import save_png, shown
from convlens.runtime.run_records import write_json_atomic

DEBIAN_FOLDER = Path("/usr/share/datasets/fashion-mnist")
SOURCE_ENV = "CONVLENS_FASHION_MNIST"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
FORMAT = "convlens-concepts/1"


class IdxError(ConvlensError):
    """A file that is not a well-formed (gzipped) idx file."""


def class_folder(label: int) -> str:
    """E.g. ``0_T-shirt_top``: the label first, then the class name with every unsafe character as ``_``."""
    return f"{label}_{re.sub(r'[^A-Za-z0-9-]+', '_', CLASSES[label])}"


def read_idx(path: str | Path) -> np.ndarray:
    """The array of an idx file (gzipped when its name ends in ``.gz``); :class:`IdxError` says what is wrong."""
    path = Path(path)
    try:
        with gzip.open(path) if path.suffix == ".gz" else open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise IdxError(f"{shown(path)}: file not found") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise IdxError(f"{shown(path)}: corrupt gzip file ({exc})") from None
    except OSError as exc:
        raise IdxError(f"{shown(path)}: cannot read ({exc.strerror or exc})") from None
    return parse_idx(data, shown(path))


def parse_idx(data: bytes, name: str = "idx data") -> np.ndarray:
    """The array in the bytes of an idx file: 2 zero bytes, a type code, the number of dimensions, the sizes as
    big-endian 32-bit integers, then the values (big-endian)."""
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in IDX_TYPES or data[3] == 0:
        raise IdxError(f"{name}: not an idx file (magic number {data[:4].hex() or 'missing'})")
    dims = data[3]
    header = 4 + 4 * dims
    if len(data) < header:
        raise IdxError(f"{name}: truncated header ({len(data)} bytes, {header} needed for {dims} dimensions)")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    dtype = np.dtype(IDX_TYPES[data[2]])
    expected = math.prod(shape) * dtype.itemsize
    if len(data) - header != expected:
        raise IdxError(
            f"{name}: the header promises {'x'.join(map(str, shape))} values ({expected} bytes) but "
            f"{len(data) - header} bytes follow"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def source_folder(source: str | Path | None = None) -> Path:
    """``source``, else ``$CONVLENS_FASHION_MNIST``, else Debian's folder; one clear error when it is missing."""
    folder = Path(source or os.environ.get(SOURCE_ENV) or DEBIAN_FOLDER)
    if not folder.is_dir():
        raise ConvlensError(_not_found(folder, f"no folder {shown(folder)}"))
    return folder


def _not_found(folder: Path, what: str) -> str:
    hint = "install Debian's package: apt-get install dataset-fashion-mnist" if folder == DEBIAN_FOLDER else ""
    files = ", ".join(name for names in SPLIT_FILES.values() for name in names)
    return (
        f"Fashion-MNIST not found: {what} ({hint}{'; or ' if hint else ''}point --source or ${SOURCE_ENV} at a "
        f"folder holding {files})"
    )


def read_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``uint8 [N, 28, 28]`` and labels ``[N]`` of ``split`` (train or test), checked against each other."""
    image_file, label_file = (folder / name for name in SPLIT_FILES[split])
    missing = [path.name for path in (image_file, label_file) if not path.is_file()]
    if missing:
        raise ConvlensError(_not_found(folder, f"{shown(folder)} lacks {' and '.join(missing)}"))
    images, labels = read_idx(image_file), read_idx(label_file)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise IdxError(f"{shown(image_file)}: expected uint8 images [N, H, W], got {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise IdxError(f"{shown(label_file)}: {labels.shape} labels for {len(images)} images in {shown(image_file)}")
    if labels.size and int(labels.max()) >= len(CLASSES):
        raise IdxError(f"{shown(label_file)}: label {int(labels.max())} is not one of the 10 classes")
    return images, labels


def balanced_choice(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted positions of ``n`` images, ``n // 10`` per class and one more for the first ``n % 10`` classes; per
    class a random choice seeded by (seed, class)."""
    chosen = []
    for label in range(len(CLASSES)):
        wanted = n // len(CLASSES) + int(label < n % len(CLASSES))
        members = np.flatnonzero(labels == label)
        if wanted > len(members):
            raise ConvlensError(
                f"--n {n} asks for {wanted} images of class '{CLASSES[label]}'; the split has {len(members)}"
            )
        chosen.append(np.random.default_rng([seed, label]).permutation(members)[:wanted])
    return np.sort(np.concatenate(chosen))


def write_fashion_mnist(
    out: str | Path,
    *,
    n: int | None = None,
    split: str = "train",
    seed: int = 0,
    source: str | Path | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Write ``n`` images of ``split`` (all when None) into ``out`` (layout in the module docstring); returns a
    summary. A later run writes over an earlier one (removing the files it no longer writes); a folder holding
    anything else is refused."""
    from PIL import Image

    if split not in SPLIT_FILES:
        raise ConvlensError(f"--split must be one of {', '.join(SPLIT_FILES)}; got {split!r}")
    if n is not None and n < len(CLASSES):
        raise ConvlensError(f"--n must be at least {len(CLASSES)}, one image per class")
    out = Path(out)
    folder = source_folder(source)
    previous = claim_folder(out, "concepts.json", "fashion-mnist")
    images, labels = read_split(folder, split)
    positions = np.arange(len(labels)) if n is None else balanced_choice(labels, n, seed)
    records = []
    for position in positions.tolist():
        label = int(labels[position])
        name = f"{class_folder(label)}/{position:05d}.png"
        save_png(Image.fromarray(images[position], "L"), out / "images" / name)
        save_png(Image.fromarray((images[position] > 0).astype(np.uint8) * 255, "L"), out / "masks" / name)
        records.append({"file": name, "mask": name, "class": class_folder(label), "label": label, "index": position})
        if progress is not None:
            progress(1)
    folders = {"file": "images", "mask": "masks"}
    remove_stale(out, recorded_files(previous, folders), recorded_files({"images": records}, folders))
    generator = {"name": "fashion-mnist", "n": n, "split": split, "seed": seed, "source": str(folder)}
    write_json_atomic(out / "concepts.json", _concepts(records, generator))
    return {"out": str(out), "images": len(records), "split": split, "seed": seed, "source": str(folder)}


def _concepts(records: list[dict[str, Any]], generator: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "generator": generator,
        "image_root": "images",
        "mask_root": "masks",
        "class_names": dict(zip(map(class_folder, range(len(CLASSES))), CLASSES)),
        "categories": {"class": [class_folder(label) for label in range(len(CLASSES))]},
        "regions": {"class": "foreground"},
        "images": records,
    }
