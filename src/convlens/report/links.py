"""Where the report's pages lie and how one refers to another page or to a picture of the run folder.

Every link is relative, so the site opens from ``file://`` and can be moved together with the run folder (or on its
own, when pictures are copied into ``OUT/assets``).
"""

from __future__ import annotations

import dataclasses
import os
import urllib.parse
from pathlib import Path

from convlens.data.images import resolves_inside
from convlens.report.pages import figure
from convlens.report.run_folder import Group

INDEX_PAGE = "index.html"
UNITS_PAGE = "units.html"
COMPARE_PAGE = "compare.html"
UNIT_PAGES = "units"
COPIED_IMAGES = "assets"


def relative_url(page: Path, target: Path) -> str:
    """The URL of ``target`` relative to the folder of ``page``."""
    return urllib.parse.quote(os.path.relpath(target, page.parent).replace(os.sep, "/"))


@dataclasses.dataclass
class Links:
    """The site's folder and the run folder it shows; with ``copy_images`` pictures are referred to as copies in
    ``OUT/assets`` (collected in ``copies``, for the writer to copy)."""

    out: Path
    run_folder: Path
    copy_images: bool = False
    copies: dict[Path, Path] = dataclasses.field(default_factory=dict)

    @property
    def index(self) -> Path:
        return self.out / INDEX_PAGE

    @property
    def units_index(self) -> Path:
        return self.out / UNITS_PAGE

    @property
    def compare(self) -> Path:
        return self.out / COMPARE_PAGE

    def unit_page(self, group: Group, unit: int) -> Path:
        return self.out / UNIT_PAGES / f"{group.slug}-{unit}.html"

    def page_url(self, page: Path, target: Path) -> str:
        return relative_url(page, target)

    def unit_url(self, page: Path, group: Group, unit: int) -> str:
        return relative_url(page, self.unit_page(group, unit))

    def image_url(self, page: Path, image: Path) -> str:
        """The URL from ``page`` to a picture of the run folder (or to its copy, when pictures are copied); only a
        picture that stays in the run folder with symbolic links resolved is copied."""
        inside_run = self.run_folder in image.parents and resolves_inside(image, self.run_folder)
        inside_out = image == self.out or self.out in image.parents
        if self.copy_images and inside_run and not inside_out:
            copy = self.out / COPIED_IMAGES / image.relative_to(self.run_folder)
            self.copies[image] = copy
            image = copy
        return relative_url(page, image)

    def picture(self, page: Path, image: Path | None, caption: str = "", *, kind: str = "", css: str = "") -> str:
        """A ``<figure>`` of ``image`` with its caption, and a link to the chart's SVG when one lies beside it;
        nothing when there is no image."""
        if image is None:
            return ""
        svg = image.with_suffix(".svg")
        beside = image.suffix == ".png" and svg.is_file() and resolves_inside(svg, self.run_folder)
        vector = self.image_url(page, svg) if beside else None
        return figure(self.image_url(page, image), caption, kind=kind, css=css, vector=vector)

    def navigation(self, page: Path) -> list[tuple[str, str]]:
        return [
            (relative_url(page, self.index), "Overview"),
            (relative_url(page, self.units_index), "Units and latents"),
            (relative_url(page, self.compare), "CNN vs SAE"),
        ]
