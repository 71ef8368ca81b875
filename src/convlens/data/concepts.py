"""Ground-truth concepts of a dataset, read from its ``concepts.json`` (written by ``convlens data shapes``).

Each image record names one concept per category (e.g. shape, colour, texture) and a foreground mask. A
category's ``region`` says where its concept lies in the image: ``foreground`` (inside the mask),
``background`` (outside it) or ``image`` (everywhere). The per-pixel mask of a concept in an image is the
region of the category the concept belongs to, and empty for concepts the image does not show.

An ImageFolder's class labels are a concept category too, ``class`` (``CLASS_CATEGORY``): the unit statistics
score it on any ImageFolder, with or without a ``concepts.json``, unless the file already has a category that
groups the images as their classes do (:func:`repeats_the_classes`; the shapes' ``shape``, Fashion-MNIST's
``class``). Class labels have no pixel masks, so what needs masks (dissection, foreground precision) still needs
the file.

Every path the file names stays inside the dataset: the image and mask folders inside its root, each image and mask
inside its folder, with symbolic links resolved; a path that leads out is refused with an error naming it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from convlens.core.errors import ConvlensError
from convlens.data.images import resolves_inside, shown

if TYPE_CHECKING:
    from convlens.data.images import ImageIndex

REGIONS = ("foreground", "background", "image")
CLASS_CATEGORY = "class"  # the concept category of an ImageFolder's class labels


@dataclasses.dataclass(frozen=True)
class ConceptSet:
    root: Path
    categories: dict[str, tuple[str, ...]]
    regions: dict[str, str]
    images: tuple[dict[str, Any], ...]
    image_root: str = "images"
    mask_root: str = "masks"

    @property
    def concepts(self) -> list[tuple[str, str]]:
        """Every (category, concept) pair."""
        return [(category, name) for category, names in self.categories.items() for name in names]

    def image_path(self, position: int) -> Path:
        return self._inside(self.image_root, self.images[position]["file"])

    def foreground(self, position: int) -> np.ndarray:
        """The foreground mask of image ``position`` as a bool array ``[H, W]``."""
        from PIL import Image

        path = self._inside(self.mask_root, self.images[position]["mask"])
        try:
            with Image.open(path) as mask:
                return np.asarray(mask.convert("L")) >= 128
        except OSError as exc:
            raise ConvlensError(f"cannot read mask {path}: {exc}") from None

    def _inside(self, folder: str, name: str) -> Path:
        """``root/folder/name``, refused when it resolves (symbolic links included) outside ``root/folder``."""
        path = self.root / folder / name
        if not resolves_inside(path, self.root / folder):
            raise ConvlensError(f"{shown(path)} lies outside {shown(self.root / folder)} (a symbolic link?); refused")
        return path

    def positions_in(self, index: ImageIndex) -> dict[int, int]:
        """Image index position -> concept record position, matched by the file's path under the image folder."""
        by_file = {record["file"]: number for number, record in enumerate(self.images)}
        image_folder = (self.root / self.image_root).resolve()
        matched = {}
        for position, path in enumerate(index.paths):
            try:
                key = path.resolve().relative_to(image_folder).as_posix()
            except ValueError:
                continue
            if key in by_file:
                matched[position] = by_file[key]
        return matched

    def masks(self, position: int) -> dict[tuple[str, str], np.ndarray]:
        """Per-pixel masks ``{(category, concept): bool [H, W]}`` of the concepts image ``position`` shows."""
        record = self.images[position]
        foreground = self.foreground(position)
        regions = {"foreground": foreground, "background": ~foreground, "image": np.ones_like(foreground)}
        return {
            (category, record[category]): regions[self.regions[category]]
            for category in self.categories
            if record.get(category) is not None
        }


def load_concepts(root: str | Path) -> ConceptSet:
    """The concepts of the dataset at ``root``; a missing or malformed file is one clear error."""
    root = Path(root)
    path = root / "concepts.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConvlensError(f"{root} has no concepts.json (make one with `convlens data shapes`)") from None
    except json.JSONDecodeError as exc:
        raise ConvlensError(f"cannot read {path}: {exc}") from None
    try:
        categories = {name: tuple(values) for name, values in data["categories"].items()}
        regions = dict(data["regions"])
        images = tuple(data["images"])
    except (KeyError, TypeError, AttributeError) as exc:
        raise ConvlensError(f"{path} lacks 'categories', 'regions' or 'images' ({exc})") from None
    bad = {category: region for category, region in regions.items() if region not in REGIONS}
    if bad or set(regions) != set(categories):
        raise ConvlensError(f"{path}: every category needs a region among {', '.join(REGIONS)}; got {regions}")
    folders = {key: data.get(key, default) for key, default in (("image_root", "images"), ("mask_root", "masks"))}
    for key, folder in folders.items():
        if not isinstance(folder, str) or not resolves_inside(root / folder, root):
            raise ConvlensError(f"{shown(path)}: {key} {folder!r} lies outside {shown(root)}; refused")
    _check_record_paths(path, images, folders)
    return ConceptSet(root, categories, regions, images, folders["image_root"], folders["mask_root"])


def _check_record_paths(path: Path, images: tuple[Any, ...], folders: dict[str, str]) -> None:
    """Every image's ``file`` and ``mask`` name a path inside their folder (spelling only; links are resolved on
    use)."""
    for number, record in enumerate(images):
        for key, folder in (("file", folders["image_root"]), ("mask", folders["mask_root"])):
            name = record.get(key) if isinstance(record, dict) else None
            if isinstance(name, str) and (os.path.isabs(name) or os.path.normpath(name).split(os.sep)[0] == ".."):
                raise ConvlensError(f"{shown(path)}: {key} {name!r} of image {number} lies outside {folder}; refused")


def repeats_the_classes(values: Sequence[Hashable | None], classes: Sequence[Hashable]) -> bool:
    """Whether a category's value per image (None: unknown) groups the images exactly as their ``classes`` do:
    every class has one value and every value one class."""
    pairs = {(value, name) for value, name in zip(values, classes) if value is not None}
    return bool(pairs) and len(pairs) == len({value for value, _ in pairs}) == len({name for _, name in pairs})
