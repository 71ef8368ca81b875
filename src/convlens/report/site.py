"""``convlens report``: a static HTML site of a pipeline run folder (``convlens run``), recomputing nothing.

:func:`build_report` reads the run folder with :func:`~convlens.report.reader.read_run` and writes, into
``RUN_DIR/report/`` by default::

    index.html          the overview (see convlens.report.overview): model, layer, data, steps, filter comparison,
                        SAE metrics and curves, the sweep's Pareto frontier, spliced accuracy, concept selectivity,
                        warnings, and notes on the parts the run does not have
    units.html          every CNN unit and SAE latent in one table, sortable and filterable, with thumbnails
    compare.html        the top visualised CNN units beside the top latents of each SAE, one row per rank
                        (paper 001 sec. 9.3), and the least active units of each group
    units/GROUP-N.html  a page per unit or latent: statistics, best concept, and every figure that any visualizer
                        run lists for it, grouped by visualizer
    report.json         what was written (pages, notes); lets a rebuild remove pages that no longer exist

Images are referenced by relative paths into the run folder (or copied into ``assets/`` with ``copy_images``);
the style sheet and script are inlined into every page, no page refers to anything on the network and no page
holds the time of the build, so rebuilding from the same run folder gives the same files. Parts a run does not have
(no sweep, no concepts, a visualizer that did not run) are left out with a note; only a folder without
``pipeline.json`` is an error.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from convlens.core.errors import ConvlensError
from convlens.report.links import UNIT_PAGES, Links
from convlens.report.overview import Overview
from convlens.report.pages import Content, page
from convlens.report.reader import read_run
from convlens.report.run_folder import RunFolder
from convlens.report.unit_pages import UnitPages
from convlens.runtime.locks import holds_files, output_lock

REPORT_RECORD = "report.json"
GENERATOR = "convlens report"


def build_report(run_dir: str | Path, out: str | Path | None = None, *, copy_images: bool = False) -> dict[str, Any]:
    """Write the HTML report of the pipeline run in ``run_dir`` into ``out`` (default ``run_dir/report``) and
    return its summary: paths, page counts per group, and the notes on parts the run does not have."""
    run = read_run(run_dir)
    site = Path(os.path.abspath(out)) if out is not None else run.folder / "report"
    with output_lock(site, command="report"):
        return Site(run, site, copy_images=copy_images).write()


class Site:
    """The pages of one run folder, written into ``out``."""

    def __init__(self, run: RunFolder, out: Path, *, copy_images: bool = False):
        self.run = run
        self.out = out
        self.links = Links(out, run.folder, copy_images)

    def write(self) -> dict[str, Any]:
        """Write every page, the copied pictures and ``report.json``; remove the pages of an earlier build that
        this one does not have. Returns the summary."""
        self.check_out()
        self.out.mkdir(parents=True, exist_ok=True)
        pages = self.render()
        previous = self.previous_pages()
        (self.out / UNIT_PAGES).mkdir(exist_ok=True)
        for path, text in pages.items():
            path.write_text(text, encoding="utf-8")
        self.write_image_copies()
        names = sorted(path.relative_to(self.out).as_posix() for path in pages)
        for stale in sorted(set(previous) - set(names)):
            (self.out / stale).unlink(missing_ok=True)
        groups = self.group_counts()
        record = {"generator": GENERATOR, "pages": names, "notes": list(self.run.notes), "groups": groups}
        (self.out / REPORT_RECORD).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        return {
            "run": str(self.run.folder),
            "out": str(self.out),
            "index": str(self.links.index),
            "title": self.run.title,
            "pages": len(pages),
            "groups": groups,
            "images_copied": len(self.links.copies),
            "notes": list(self.run.notes),
            "warnings": list(self.run.warnings),
        }

    def render(self) -> dict[Path, str]:
        """Every page by its path: a page per unit, the units index, the side-by-side, and the overview."""
        units = UnitPages(self.run, self.links)
        pages: dict[Path, str] = {}
        for group in self.run.groups.values():
            ordered = group.all_units()
            for position, unit in enumerate(ordered):
                before = ordered[position - 1] if position > 0 else None
                after = ordered[position + 1] if position + 1 < len(ordered) else None
                path = self.links.unit_page(group, unit)
                pages[path] = self.frame(path, units.unit_page(group, unit, before, after))
        pages[self.links.units_index] = self.frame(self.links.units_index, units.units_index())
        pages[self.links.compare] = self.frame(self.links.compare, units.compare())
        pages[self.links.index] = self.frame(self.links.index, Overview(self.run, self.links).render())
        return pages

    def frame(self, path: Path, content: Content) -> str:
        """``content`` as a whole HTML document at ``path``, with the navigation bar and the footer."""
        return page(
            content.title,
            content.body,
            nav=self.links.navigation(path),
            subtitle=content.subtitle,
            footer=f"convlens report of {self.run.title}",
            script=content.script,
        )

    def write_image_copies(self) -> None:
        """Copy the pictures the pages refer to into ``OUT/assets`` (only those that changed), when asked to."""
        for source, copy in sorted(self.links.copies.items()):
            copy.parent.mkdir(parents=True, exist_ok=True)
            if copy.is_symlink():  # never write through a link to a file outside the site
                copy.unlink()
            if not copy.is_file() or copy.read_bytes() != source.read_bytes():
                shutil.copyfile(source, copy)

    def group_counts(self) -> dict[str, dict[str, Any]]:
        return {
            group.label: {
                "kind": group.kind,
                "pages": len(group.all_units()),
                "visualised": len(group.visualised),
                "figures": sum(len(run.figures) for run in group.runs),
            }
            for group in self.run.groups.values()
        }

    def check_out(self) -> None:
        if self.out.is_file():
            raise ConvlensError(f"--out {self.out} is a file; pass a folder")
        if holds_files(self.out) and not (self.out / REPORT_RECORD).is_file():
            raise ConvlensError(
                f"{self.out} holds other files and no {REPORT_RECORD} of an earlier report; choose a new or empty --out"
            )
        if self.out == self.run.folder:
            raise ConvlensError("--out must not be the run folder itself; the default is RUN_DIR/report")

    def previous_pages(self) -> list[str]:
        """The pages an earlier build listed in ``report.json`` (only plain relative ``.html`` names)."""
        try:
            record = json.loads((self.out / REPORT_RECORD).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return []
        if not isinstance(record, dict) or record.get("generator") != GENERATOR:
            return []
        pages = record.get("pages")
        return [
            name
            for name in (pages if isinstance(pages, list) else [])
            if isinstance(name, str)
            and name.endswith(".html")
            and ".." not in Path(name).parts
            and not Path(name).is_absolute()
        ]
