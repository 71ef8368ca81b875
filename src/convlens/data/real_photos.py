"""``convlens data photos``: a folder of the photographs that installed packages ship, with their provenance.

Every source is optional; a missing one is skipped and named, with how to get it:

- foolbox (the ``real`` extra): 20 ImageNet validation photos, labelled by the class index in their file names
- scikit-image (the ``real`` extra): its public-domain and CC0 colour photographs
- scikit-learn: ``china.jpg`` and ``flower.jpg`` (CC BY 2.0)
- matplotlib: ``grace_hopper.jpg`` (public domain)
- Debian's ``opencv-doc``: the natural photographs among OpenCV's sample data (no drawings, charts, calibration
  boards, paintings or text)

Python packages are found with :func:`importlib.util.find_spec`, without importing them. Layout written by
:func:`write_photos`::

    DIR/<source>_<file name>    each photo byte for byte (foolbox's with the ImageNet class in the name)
    DIR/photos.json             per file: source, original path, licence, sha256, ImageNet index and class if known

The folder is flat on purpose: convlens reads it as unlabelled images. Class sub-folders would be numbered 0, 1, ...
and a gradient filter would take those numbers for ImageNet class indices; unlabelled images are explained for the
model's own prediction, and ``photos.json`` keeps the true ImageNet labels.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import re
from pathlib import Path
from typing import Any

from convlens.core.errors import ConvlensError
from convlens.data.dataset_folders import claim_folder, copy_exact, recorded_files, remove_stale
from convlens.runtime.run_records import write_json_atomic

PHOTOS_FILE = "photos.json"
FORMAT = "convlens-photos/1"
REAL_EXTRA = 'pip install -e ".[real]"'
FOOLBOX_NAME = re.compile(r"imagenet_(\d+)_(\d+)\.jpg")
OPENCV_LICENCE = (
    "OpenCV sample data: Debian lists it under 'Files: *', Apache-2.0 AND BSD-3-Clause "
    "(/usr/share/doc/opencv-doc/copyright); the photograph's own origin is not recorded"
)


@dataclasses.dataclass(frozen=True)
class PhotoSource:
    """Where a source's photos lie: ``folder`` inside the Python package ``module``, or the absolute ``folder``
    when ``module`` is None; ``photos`` lists (file name, licence), ``pattern`` finds foolbox's labelled files."""

    name: str
    install: str
    folder: str
    module: str | None = None
    photos: tuple[tuple[str, str], ...] = ()
    pattern: str = ""
    pattern_licence: str = ""


SOURCES = (
    PhotoSource(
        "foolbox",
        REAL_EXTRA,
        "data",
        module="foolbox",
        pattern="imagenet_*.jpg",
        pattern_licence="ImageNet validation image via foolbox (research use, ImageNet terms of access)",
    ),
    PhotoSource(
        "scikit-image",
        REAL_EXTRA,
        "data",
        module="skimage",
        photos=(
            ("astronaut.png", "public domain (NASA photograph of Eileen Collins; skimage.data.astronaut)"),
            ("chelsea.png", "CC0 (photographer Stefan van der Walt; skimage.data.chelsea)"),
            ("coffee.png", "CC0 (photographer Rachel Michetti; skimage.data.coffee)"),
            (
                "motorcycle_left.png",
                "Middlebury 2014 stereo dataset (Scharstein et al.); scikit-image states no licence",
            ),
            ("rocket.jpg", "public domain (SpaceX photograph of DSCOVR on Falcon 9; skimage.data.rocket)"),
        ),
    ),
    PhotoSource(
        "scikit-learn",
        "pip install scikit-learn",
        "datasets/images",
        module="sklearn",
        photos=(
            ("china.jpg", "CC BY 2.0, Flickr user danielbuechele (sklearn/datasets/images/README.txt)"),
            ("flower.jpg", "CC BY 2.0, Flickr user vultilion (sklearn/datasets/images/README.txt)"),
        ),
    ),
    PhotoSource(
        "matplotlib",
        "pip install matplotlib",
        "mpl-data/sample_data",
        module="matplotlib",
        photos=(("grace_hopper.jpg", "public domain (US Navy photograph of Grace Hopper)"),),
    ),
    PhotoSource(
        "opencv-doc",
        "apt-get install opencv-doc",
        "/usr/share/doc/opencv-doc/examples/data",
        photos=tuple(
            (name, OPENCV_LICENCE)
            for name in (
                "aero1.jpg",
                "aloeL.jpg",
                "apple.jpg",
                "baboon.jpg",
                "board.jpg",
                "building.jpg",
                "butterfly.jpg",
                "fruits.jpg",
                "home.jpg",
                "leuvenA.jpg",
                "orange.jpg",
                "rubberwhale1.png",
                "smarties.png",
                "squirrel_cls.jpg",
                "stuff.jpg",
            )
        ),
    ),
)


@dataclasses.dataclass(frozen=True)
class Photo:
    source: str
    path: Path
    original: str  # package-relative for Python packages, absolute otherwise
    licence: str
    imagenet_index: int | None = None


def source_folder(source: PhotoSource) -> Path | None:
    """The folder holding ``source``'s photos, or None when it is not installed."""
    if source.module is None:
        folder = Path(source.folder)
    else:
        try:
            spec = importlib.util.find_spec(source.module)
        except (ImportError, ValueError):
            spec = None
        if spec is None or spec.origin is None:
            return None
        folder = Path(spec.origin).parent / source.folder
    return folder if folder.is_dir() else None


def source_photos(source: PhotoSource, folder: Path) -> tuple[list[Photo], list[str]]:
    """The photos of ``source`` found in ``folder``, and the listed ones that are missing."""
    base = f"{source.module}/{source.folder}" if source.module else source.folder
    if source.pattern:
        found = [(path.name, source.pattern_licence) for path in sorted(folder.glob(source.pattern))]
    else:
        found = [(name, licence) for name, licence in source.photos if (folder / name).is_file()]
    missing = [name for name, _ in source.photos if not (folder / name).is_file()]
    photos = [
        Photo(source.name, folder / name, f"{base}/{name}", licence, _imagenet_index(source, name))
        for name, licence in found
    ]
    return photos, missing


def _imagenet_index(source: PhotoSource, name: str) -> int | None:
    match = FOOLBOX_NAME.fullmatch(name) if source.pattern else None
    return int(match[2]) if match and int(match[2]) < 1000 else None


def find_photos(sources: tuple[PhotoSource, ...] = SOURCES) -> tuple[list[Photo], list[dict[str, Any]], list[dict]]:
    """Every photo of the installed sources, a summary per source found, and the sources skipped (with why)."""
    photos, found, skipped = [], [], []
    for source in sources:
        folder = source_folder(source)
        if folder is None:
            skipped.append({"source": source.name, "reason": "not installed", "install": source.install})
            continue
        these, missing = source_photos(source, folder)
        if not these:
            skipped.append({"source": source.name, "reason": f"no photos in {folder}", "install": source.install})
            continue
        photos += these
        found.append({"source": source.name, "version": _version(source), "photos": len(these), "missing": missing})
    return photos, found, skipped


def _version(source: PhotoSource) -> str | None:
    if source.module is None:
        return None
    try:
        return importlib.metadata.version(source.name)
    except importlib.metadata.PackageNotFoundError:
        return None


def imagenet_categories() -> list[str]:
    """The 1000 ImageNet class names in index order (torchvision's, offline)."""
    from torchvision.models import ResNet18_Weights

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def file_name(photo: Photo, categories: list[str]) -> str:
    """``<source>_<file name>``, with the ImageNet class name before the suffix when known."""
    if photo.imagenet_index is None:
        return f"{photo.source}_{photo.path.name}"
    slug = re.sub(r"[^a-z0-9]+", "_", categories[photo.imagenet_index].lower()).strip("_")
    return f"{photo.source}_{photo.path.stem}_{slug}{photo.path.suffix}"


def photo_record(photo: Photo, name: str, categories: list[str]) -> dict[str, Any]:
    record: dict[str, Any] = {
        "file": name,
        "source": photo.source,
        "original": photo.original,
        "licence": photo.licence,
        "sha256": hashlib.sha256(photo.path.read_bytes()).hexdigest(),
    }
    if photo.imagenet_index is not None:
        record["imagenet_index"] = photo.imagenet_index
        record["imagenet_class"] = categories[photo.imagenet_index]
    return record


def write_photos(out: str | Path, sources: tuple[PhotoSource, ...] = SOURCES) -> dict[str, Any]:
    """Copy the photos of every installed source into ``out`` (layout in the module docstring); returns a summary.

    A later run writes over an earlier one (removing the files it no longer writes); a folder holding anything
    else is refused. Raises when no source is installed.
    """
    out = Path(out)
    previous = claim_folder(out, PHOTOS_FILE, "photos")
    photos, found, skipped = find_photos(sources)
    if not photos:
        hints = "; ".join(f"{item['source']}: {item['install']}" for item in skipped)
        raise ConvlensError(f"no photo source is installed ({hints})")
    categories = imagenet_categories() if any(p.imagenet_index is not None for p in photos) else []
    records = []
    for photo in photos:
        name = file_name(photo, categories)
        copy_exact(photo.path, out / name)
        records.append(photo_record(photo, name, categories))
    remove_stale(out, recorded_files(previous, {"file": "."}), {record["file"] for record in records})
    write_json_atomic(
        out / PHOTOS_FILE,
        {"format": FORMAT, "generator": {"name": "photos"}, "sources": found, "skipped": skipped, "images": records},
    )
    return {
        "out": str(out),
        "images": len(records),
        "imagenet_labelled": sum("imagenet_index" in record for record in records),
        "sources": {item["source"]: item["photos"] for item in found},
        "skipped": skipped,
    }
