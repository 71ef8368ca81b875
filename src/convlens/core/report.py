"""``convlens report``: a static HTML site of a pipeline run folder (``convlens run``), recomputing nothing.

The report reads what the run folder holds (``pipeline.json`` and the JSON, JSONL and PNG files of the steps it
names) and writes, into ``RUN_DIR/report/`` by default::

    index.html          the overview: model, layer, data, steps, filter comparison with foreground precision
                        (paper 001 Figures 8-9), SAE metrics and curves, the sweep's Pareto frontier, spliced
                        accuracy, how many CNN channels and SAE latents are selective for one concept, warnings
    units.html          every CNN unit and SAE latent in one table, sortable and filterable, with thumbnails
    compare.html        the top visualised CNN units beside the top latents of each SAE, one row per rank
                        (paper 001 sec. 9.3), and the least active units of each group
    units/GROUP-N.html  a page per unit or latent: statistics, best concept, and every figure that any visualizer
                        run lists for it, grouped by visualizer
    report.json         what was written (pages, notes); lets a rebuild remove pages that no longer exist

Images are referenced by relative paths into the run folder (or copied into ``assets/`` with ``copy_images``);
no page refers to anything on the network and no page holds the time of the build, so rebuilding from the same
run folder gives the same files. Parts a run does not have (no sweep, no concepts, a visualizer that did not
run) are left out with a note; only a folder without ``pipeline.json`` is an error.

The numbers the paper's workflow is judged by carry ``data-metric`` attributes (with ``data-value``, the exact
JSON value, and ``data-filter`` / ``data-sae`` / ``data-group`` / ``data-attribute`` / ``data-unit`` naming what
they belong to), so that tests and scripts can read them back from the HTML.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import struct
import urllib.parse
from pathlib import Path
from typing import Any

from .errors import ConvlensError
from .report_pages import attrs, cell, esc, facts, figure, fmt, metric, note, page, raw, table

PIPELINE_FILE = "pipeline.json"
REPORT_RECORD = "report.json"
GENERATOR = "convlens report"
CNN_GROUP = "cnn"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".svg")
SMALL_KINDS = ("feature-viz", "top", "bottom", "crop", "overlay")
SAE_METADATA_KEY = "convlens_sae"
OVERLAYS_SHOWN = 4
EXAMPLES_SHOWN = 3
LEAST_SHOWN = 5
STATISTIC_COLUMNS = (  # key in statistics.json, column title, data-metric name, format
    ("frequency", "frequency", "frequency", "pct"),
    ("image_frequency", "image freq.", "image-frequency", "pct"),
    ("mean", "mean", "mean", "num"),
    ("max", "max", "max", "num"),
    ("mean_image_max", "mean image max", "mean-image-max", "num"),
    ("share", "share", "share", "pct"),
)


@dataclasses.dataclass
class Figure:
    """One picture a visualizer run lists: its unit (None: the run as a whole), file, kind and caption."""

    unit: int | None
    path: Path
    kind: str
    caption: str
    run: str


@dataclasses.dataclass
class VisualRun:
    """One visualizer run on a group's top units (``units/<visualizer>`` or ``latents/<label>/<visualizer>``)."""

    name: str
    folder: str
    record: dict[str, Any] | None
    figures: list[Figure]


@dataclasses.dataclass
class Group:
    """The CNN's channels (label ``cnn``) or one SAE's latents: statistics, visualised units and their runs."""

    label: str
    kind: str
    slug: str
    summary: dict[str, Any] | None = None
    units: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)
    visualised: list[int] = dataclasses.field(default_factory=list)
    runs: list[VisualRun] = dataclasses.field(default_factory=list)

    @property
    def title(self) -> str:
        return "CNN channels" if self.label == CNN_GROUP else f"SAE '{self.label}' latents"

    @property
    def short(self) -> str:
        return "CNN" if self.label == CNN_GROUP else f"SAE {self.label}"

    def unit_title(self, unit: int) -> str:
        return f"CNN channel {unit}" if self.label == CNN_GROUP else f"{self.label} latent {unit}"

    def all_units(self) -> list[int]:
        listed = set(self.units) | set(self.visualised)
        listed |= {f.unit for run in self.runs for f in run.figures if f.unit is not None}
        return sorted(listed)

    def figures_of(self, unit: int) -> list[tuple[VisualRun, list[Figure]]]:
        return [(run, [f for f in run.figures if f.unit == unit]) for run in self.runs
                if any(f.unit == unit for f in run.figures)]

    def first_figure(self, unit: int, kinds: tuple[str, ...]) -> Figure | None:
        for wanted in kinds:
            for run in self.runs:
                for found in run.figures:
                    if found.unit == unit and found.kind == wanted:
                        return found
        return None


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, read from its JSON header (no torch needed)."""
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise ValueError("too short for a safetensors file")
        (length,) = struct.unpack("<Q", prefix)
        if length > 100_000_000:
            raise ValueError(f"implausible header length {length}")
        header = json.loads(handle.read(length).decode("utf-8"))
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else {}


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text) or "group"


class Report:
    """The site of one run folder: :meth:`load` reads it, :meth:`write` writes the pages."""

    def __init__(self, run_dir: str | Path, out: str | Path | None = None, *, copy_images: bool = False):
        self.run_dir = Path(os.path.abspath(run_dir))
        self.out = Path(os.path.abspath(out)) if out is not None else self.run_dir / "report"
        self.copy_images = copy_images
        self.notes: list[str] = []
        self.copies: dict[Path, Path] = {}
        self.pipeline: dict[str, Any] = {}
        self.groups: dict[str, Group] = {}
        self.model: dict[str, Any] = {}
        self.comparison: dict[str, Any] | None = None
        self.filters_dir: Path | None = None
        self.saes: list[dict[str, Any]] = []
        self.sweep: dict[str, Any] | None = None
        self.sweep_dir: Path | None = None
        self.statistics: dict[str, Any] | None = None

    # -- reading ------------------------------------------------------------------------------------------------

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def _path(self, relative: Any) -> Path | None:
        """``relative`` (from pipeline.json) as a path in the run folder, or None when it is not a usable path."""
        if not isinstance(relative, str) or not relative:
            return None
        return Path(os.path.normpath(self.run_dir / relative))

    def _inside(self, path: Path) -> bool:
        return path == self.run_dir or self.run_dir in path.parents

    def _json(self, path: Path, what: str) -> Any:
        if not path.is_file():
            self.note(f"{what}: {self._show(path)} is missing")
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            self.note(f"{what}: cannot read {self._show(path)} ({exc})")
            return None

    def _jsonl(self, path: Path, what: str) -> list[dict[str, Any]]:
        if not path.is_file():
            return []
        rows = []
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, ValueError) as exc:
            self.note(f"{what}: cannot read {self._show(path)} ({exc})")
            return []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                self.note(f"{what}: line {number} of {self._show(path)} is not JSON; skipped")
                continue
            if isinstance(row, dict):
                rows.append(row)
        return rows

    def _show(self, path: Path) -> str:
        """``path`` relative to the run folder when it lies inside it."""
        return path.relative_to(self.run_dir).as_posix() if self._inside(path) else str(path)

    def _image(self, path: Path | None) -> Path | None:
        """``path`` when it is an existing image inside the run folder; otherwise None."""
        if path is None or not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            return None
        return path if self._inside(path) else None

    def load(self) -> Report:
        if not self.run_dir.is_dir():
            raise ConvlensError(f"{self.run_dir} is not a folder; pass a run folder written by `convlens run`")
        pipeline_path = self.run_dir / PIPELINE_FILE
        if not pipeline_path.is_file():
            raise ConvlensError(f"{self.run_dir} is not a convlens pipeline run: it has no {PIPELINE_FILE} "
                                "(make one with `convlens run RECIPE --out DIR`)")
        try:
            pipeline = json.loads(pipeline_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConvlensError(f"cannot read {pipeline_path}: {exc}") from None
        if not isinstance(pipeline, dict):
            raise ConvlensError(f"{pipeline_path} does not hold a JSON object")
        self.pipeline = pipeline
        self._load_model()
        self._load_filters()
        self._load_saes()
        self._load_sweep()
        self._load_statistics()
        self._load_visualizations()
        return self

    def _load_model(self) -> None:
        folder = self._path(_dict(self.pipeline.get("model")).get("run"))
        if folder is None:
            self.note("no trained model in this run (a ready-made model was used): no training curves")
            return
        if not folder.is_dir():
            self.note(f"model: {self._show(folder)} is missing")
            return
        config = self._json(folder / "config.json", "model") if (folder / "config.json").is_file() else None
        rows = self._jsonl(folder / "metrics.jsonl", "model")
        analysis = (self._json(folder / "error-analysis.json", "model")
                    if (folder / "error-analysis.json").is_file() else None)
        self.model = {"folder": folder, "config": _dict(config), "rows": rows, "analysis": _dict(analysis)}

    def _load_filters(self) -> None:
        folder = self._path(_dict(self.pipeline.get("filters")).get("comparison"))
        if folder is None:
            self.note("no filter comparison in this run")
            return
        comparison = self._json(folder / "comparison.json", "filter comparison")
        if isinstance(comparison, dict):
            self.comparison, self.filters_dir = comparison, folder

    def _load_saes(self) -> None:
        entries = _list(self.pipeline.get("saes"))
        if not entries:
            self.note("no SAE in this run")
        for position, entry in enumerate(entries):
            entry = _dict(entry)
            label = str(entry.get("label") or entry.get("name") or f"sae-{position}")
            folder = self._path(entry.get("run"))
            info: dict[str, Any] = {"label": label, "entry": entry, "folder": folder, "metrics": None,
                                    "source": None, "metadata": {}, "summary": {}, "evaluation": None}
            if folder is None or not folder.is_dir():
                self.note(f"SAE '{label}': its run folder {entry.get('run')} is missing")
            else:
                rows = [row for row in self._jsonl(folder / "metrics.jsonl", f"SAE '{label}'")
                        if isinstance(row.get("val"), dict) and row["val"]]
                if (folder / "sae.safetensors").is_file():
                    try:
                        raw_metadata = read_safetensors_metadata(folder / "sae.safetensors").get(SAE_METADATA_KEY)
                        info["metadata"] = _dict(json.loads(raw_metadata)) if raw_metadata else {}
                    except (OSError, ValueError) as exc:
                        self.note(f"SAE '{label}': cannot read the metadata of sae.safetensors ({exc})")
                if (folder / "summary.json").is_file():
                    info["summary"] = _dict(self._json(folder / "summary.json", f"SAE '{label}'"))
                if rows:
                    info["metrics"], info["source"] = rows[-1]["val"], f"metrics.jsonl, step {rows[-1].get('step')}"
                elif _dict(info["metadata"].get("metrics")):
                    info["metrics"], info["source"] = info["metadata"]["metrics"], "sae.safetensors metadata"
                else:
                    self.note(f"SAE '{label}': no validation metrics (metrics.jsonl and sae.safetensors lack them)")
            evaluation = self._path(entry.get("evaluation"))
            if evaluation is None:
                self.note(f"SAE '{label}': not spliced into the model (no evaluation in this run)")
            else:
                value = self._json(evaluation, f"SAE '{label}' evaluation")
                info["evaluation"] = value if isinstance(value, dict) else None
            self.saes.append(info)

    def _load_sweep(self) -> None:
        folder = self._path(self.pipeline.get("sweep"))
        if folder is None:
            self.note("no sweep in this run: no Pareto frontier")
            return
        sweep = self._json(folder / "sweep.json", "sweep")
        if isinstance(sweep, dict):
            self.sweep, self.sweep_dir = sweep, folder

    def _load_statistics(self) -> None:
        folder = self._path(self.pipeline.get("statistics"))
        if folder is None:
            self.note("no unit statistics in this run: unit pages only for visualised units")
            return
        statistics = self._json(folder / "statistics.json", "unit statistics")
        if not isinstance(statistics, dict):
            return
        self.statistics = statistics
        for label, values in _dict(statistics.get("groups")).items():
            values = _dict(values)
            group = self._group(str(label), values.get("kind"))
            group.summary = _dict(values.get("summary")) or None
            for entry in _list(values.get("units")):
                if isinstance(entry, dict) and isinstance(entry.get("unit"), int):
                    group.units[entry["unit"]] = entry
        if statistics.get("concepts") is None:
            self.note("the data has no concepts: no best concept or selectivity per unit")

    def _group(self, label: str, kind: Any = None) -> Group:
        if label not in self.groups:
            taken = {g.slug for g in self.groups.values()}
            slug, number = _slug(label), 2
            while slug in taken:
                slug, number = f"{_slug(label)}-{number}", number + 1
            default = "channel" if label == CNN_GROUP else "latent"
            self.groups[label] = Group(label, str(kind or default), slug)
        return self.groups[label]

    def _load_visualizations(self) -> None:
        visualizations = _dict(self.pipeline.get("visualizations"))
        if not visualizations:
            self.note("no visualizer runs in this run: unit pages show statistics only")
        for label, entry in visualizations.items():
            entry = _dict(entry)
            group = self._group(str(label))
            group.visualised = [u for u in _list(entry.get("units")) if isinstance(u, int) and not isinstance(u, bool)]
            for name, folder_name in _dict(entry.get("runs")).items():
                folder = self._path(folder_name)
                if folder is None or not folder.is_dir():
                    self.note(f"{group.short}: visualizer run '{name}' ({folder_name}) is missing")
                    continue
                record = self._record(folder, f"{group.short} visualizer run '{name}'")
                run = VisualRun(str(name), self._show(folder), record, [])
                if record is not None:
                    run.figures = self._figures(record, folder, group, run.name)
                group.runs.append(run)
                if not group.visualised:
                    group.visualised = list(dict.fromkeys(f.unit for f in run.figures if f.unit is not None))

    def _record(self, folder: Path, what: str) -> dict[str, Any] | None:
        """A visualizer run's ``record.json``; else the one JSON file in it that is a visualizer record."""
        if (folder / "record.json").is_file():
            value = self._json(folder / "record.json", what)
            return value if isinstance(value, dict) else None
        for candidate in sorted(folder.glob("*.json")):
            if candidate.name == "config.json":
                continue
            try:
                value = json.loads(candidate.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(value, dict) and "visualizer" in value:
                self.note(f"{what}: no record.json; read {self._show(candidate)} instead")
                return value
        self.note(f"{what}: {self._show(folder / 'record.json')} is missing")
        return None

    def _figures(self, record: dict[str, Any], folder: Path, group: Group, run: str) -> list[Figure]:
        if not isinstance(record.get("figures"), list):
            self.note(f"{group.short} visualizer run '{run}': its record lists no figures")
            return []
        figures, missing = [], 0
        for entry in record["figures"]:
            entry = _dict(entry)
            unit = entry.get("unit")
            unit = unit if isinstance(unit, int) and not isinstance(unit, bool) else None
            path = self._image(self._path(os.path.join(self._show(folder), str(entry.get("path") or ""))))
            if path is None:
                missing += 1
                continue
            figures.append(Figure(unit, path, str(entry.get("kind") or "figure"), str(entry.get("caption") or ""),
                                  run))
        if missing:
            self.note(f"{group.short} visualizer run '{run}': {missing} listed figure(s) missing or not an image "
                      "inside the run folder; left out")
        return figures

    # -- links --------------------------------------------------------------------------------------------------

    def url(self, page_path: Path, target: Path) -> str:
        """The relative URL from ``page_path`` to ``target`` (an image of the run folder, copied when asked)."""
        if self.copy_images and self._inside(target) and not (target == self.out or self.out in target.parents):
            copy = self.out / "assets" / target.relative_to(self.run_dir)
            self.copies[target] = copy
            target = copy
        relative = os.path.relpath(target, page_path.parent).replace(os.sep, "/")
        return urllib.parse.quote(relative)

    def page_path(self, group: Group, unit: int) -> Path:
        return self.out / "units" / f"{group.slug}-{unit}.html"

    def link(self, page_path: Path, target: Path) -> str:
        return urllib.parse.quote(os.path.relpath(target, page_path.parent).replace(os.sep, "/"))

    def img(self, page_path: Path, path: Path | None, caption: str = "", *, kind: str = "", css: str = "",
            link: str | None = None) -> str:
        if path is None:
            return ""
        return figure(self.url(page_path, path), caption, kind=kind, css=css, link=link)

    # -- writing ------------------------------------------------------------------------------------------------

    def write(self) -> dict[str, Any]:
        self._check_out()
        self.out.mkdir(parents=True, exist_ok=True)
        pages: dict[Path, str] = {}
        index, units, compare = self.out / "index.html", self.out / "units.html", self.out / "compare.html"
        for group in self.groups.values():
            ordered = group.all_units()
            for position, unit in enumerate(ordered):
                before = ordered[position - 1] if position > 0 else None
                after = ordered[position + 1] if position + 1 < len(ordered) else None
                path = self.page_path(group, unit)
                pages[path] = self._unit_page(path, group, unit, before, after)
        pages[units] = self._units_page(units)
        pages[compare] = self._compare_page(compare)
        pages[index] = self._overview(index)  # last: it lists every note
        previous = self._previous_pages()
        (self.out / "units").mkdir(exist_ok=True)
        for path, text in pages.items():
            path.write_text(text, encoding="utf-8")
        for source, copy in sorted(self.copies.items()):
            copy.parent.mkdir(parents=True, exist_ok=True)
            if not copy.is_file() or copy.read_bytes() != source.read_bytes():
                shutil.copyfile(source, copy)
        names = sorted(path.relative_to(self.out).as_posix() for path in pages)
        for stale in sorted(set(previous) - set(names)):
            (self.out / stale).unlink(missing_ok=True)
        groups = {group.label: {"kind": group.kind, "pages": len(group.all_units()),
                                "visualised": len(group.visualised),
                                "figures": sum(len(run.figures) for run in group.runs)}
                  for group in self.groups.values()}
        summary = {"run": str(self.run_dir), "out": str(self.out), "index": str(index),
                   "title": str(self.pipeline.get("title") or self.run_dir.name), "pages": len(pages),
                   "groups": groups, "images_copied": len(self.copies), "notes": list(self.notes),
                   "warnings": [str(w) for w in _list(self.pipeline.get("warnings"))]}
        record = {"generator": GENERATOR, "pages": names, "notes": summary["notes"], "groups": groups}
        (self.out / REPORT_RECORD).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        return summary

    def _check_out(self) -> None:
        if self.out.is_file():
            raise ConvlensError(f"--out {self.out} is a file; pass a folder")
        if self.out.is_dir() and any(self.out.iterdir()) and not (self.out / REPORT_RECORD).is_file():
            raise ConvlensError(f"{self.out} holds other files and no {REPORT_RECORD} of an earlier report; "
                                "choose a new or empty --out")
        if self.out == self.run_dir:
            raise ConvlensError("--out must not be the run folder itself; the default is RUN_DIR/report")

    def _previous_pages(self) -> list[str]:
        try:
            record = json.loads((self.out / REPORT_RECORD).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return []
        if not isinstance(record, dict) or record.get("generator") != GENERATOR:
            return []
        return [name for name in _list(record.get("pages")) if isinstance(name, str) and name.endswith(".html")
                and ".." not in Path(name).parts and not Path(name).is_absolute()]

    def _nav(self, page_path: Path) -> list[tuple[str, str]]:
        return [(self.link(page_path, self.out / "index.html"), "Overview"),
                (self.link(page_path, self.out / "units.html"), "Units and latents"),
                (self.link(page_path, self.out / "compare.html"), "CNN vs SAE")]

    def _frame(self, page_path: Path, title: str, body: str, *, subtitle: str = "", script: bool = False) -> str:
        footer = f"convlens report of {self.pipeline.get('title') or self.run_dir.name}"
        return page(title, body, nav=self._nav(page_path), subtitle=subtitle, footer=footer, script=script)

    # -- the overview -------------------------------------------------------------------------------------------

    def _overview(self, path: Path) -> str:
        title = str(self.pipeline.get("title") or self.run_dir.name)
        sections = [
            ("run", "Run", self._run_section(path)),
            ("steps", "Steps", self._steps_section()),
            ("warnings", "Warnings", self._warnings_section()),
            ("model", "Model", self._model_section(path)),
            ("filters", "Activation filters", self._filters_section(path)),
            ("saes", "Sparse autoencoders", self._saes_section(path)),
            ("sweep", "Pareto frontier", self._sweep_section(path)),
            ("splice", "Spliced accuracy", self._splice_section(path)),
            ("selectivity", "Concept selectivity", self._selectivity_section()),
            ("units", "Units and latents", self._units_section(path)),
        ]
        notes = ("<ul class=\"compact\">" + "".join(f"<li>{esc(n)}</li>" for n in self.notes) + "</ul>"
                 if self.notes else "<p class=\"muted\">None: every part the run names was found.</p>")
        sections.append(("notes", "Notes on this report", notes))
        contents = " &middot; ".join(f'<a href="#{key}">{esc(name)}</a>' for key, name, _ in sections)
        body = f"<p>{contents}</p>\n" + "\n".join(
            f'<section id="{key}">\n<h2>{esc(name)}</h2>\n{html}\n</section>' for key, name, html in sections)
        model = _dict(self.pipeline.get("model"))
        subtitle = f"{model.get('name', 'model')} at layer {self.pipeline.get('layer', '?')}"
        return self._frame(path, title, body, subtitle=subtitle)

    def _run_section(self, path: Path) -> str:
        p = self.pipeline
        model, data = _dict(p.get("model")), _dict(p.get("data"))
        params = _dict(model.get("params"))
        versions = _dict(p.get("versions"))
        items = [
            ("model", f"<code>{esc(model.get('name', 'n/a'))}</code>"
             + (f" ({esc(', '.join(f'{k}={v}' for k, v in params.items()))})" if params else "")),
            ("layer", f"<code>{esc(p.get('layer', 'n/a'))}</code>"),
            ("data", f"<code>{esc(data.get('path', 'n/a'))}</code>, "
             f"<span data-metric=\"images\" data-value=\"{esc(raw(data.get('images')))}\">"
             f"{esc(fmt(data.get('images'), 'int'))}</span> images"
             + ("" if data.get("concepts") is None else
                ", with concept labels" if data.get("concepts") else ", no concept labels")),
            ("filters", esc(", ".join(str(n) for n in _list(_dict(p.get("filters")).get("names"))) or "n/a")),
            ("SAEs", esc(", ".join(s["label"] for s in self.saes) or "none")),
            ("started", esc(p.get("started", "n/a"))),
            ("finished", esc(p.get("finished") or "not finished")),
        ]
        if versions:
            items.append(("versions", esc(", ".join(f"{k} {v}" for k, v in versions.items()))))
        links = (f'<p>Browse <a href="units.html">every unit and latent</a> '
                 f'({sum(len(g.all_units()) for g in self.groups.values())} pages) or '
                 f'<a href="compare.html">the CNN units beside the SAE latents</a>.</p>')
        return facts(items) + links

    def _steps_section(self) -> str:
        steps = [_dict(s) for s in _list(self.pipeline.get("steps"))]
        if not steps:
            return note("pipeline.json lists no steps")
        rows = []
        for step in steps:
            status = str(step.get("status", "unknown"))
            rows.append([f"<td>{esc(step.get('name', '?'))}</td>",
                         f'<td class="status-{esc(_slug(status))}" data-step="{esc(step.get("name", ""))}">'
                         f"{esc(status)}</td>",
                         cell(step.get("seconds"), "sec"),
                         f"<td>{esc(', '.join(str(o) for o in _list(step.get('outputs'))))}</td>"])
        total = sum(_number(s.get("seconds")) or 0.0 for s in steps)
        counts: dict[str, int] = {}
        for step in steps:
            counts[str(step.get("status", "unknown"))] = counts.get(str(step.get("status", "unknown")), 0) + 1
        line = ", ".join(f"{count} {status}" for status, count in counts.items())
        return (table(["step", "status", "seconds", "outputs"], rows, numeric=[2], id="steps-table")
                + f"<p class=\"muted\">{esc(line)}; {esc(fmt(total, 'sec'))} in all.</p>")

    def _warnings_section(self) -> str:
        warnings = [str(w) for w in _list(self.pipeline.get("warnings"))]
        if not warnings:
            return '<p class="muted">The run reported no warnings.</p>'
        return '<ul class="compact" id="run-warnings">' + "".join(f"<li>{esc(w)}</li>" for w in warnings) + "</ul>"

    def _model_section(self, path: Path) -> str:
        if not self.model:
            return note("No model training in this run.")
        folder, rows = self.model["folder"], self.model["rows"]
        parts = []
        if rows:
            last = rows[-1]
            parts.append(facts([
                ("epochs", esc(fmt(last.get("epoch"), "int"))),
                ("validation top-1", metric(last.get("val_top1"), "model-val-top1", "pct", tag="span")),
                ("validation top-5", metric(last.get("val_top5"), "model-val-top5", "pct", tag="span")),
                ("training top-1", metric(last.get("train_top1"), "model-train-top1", "pct", tag="span")),
                ("validation loss", metric(last.get("val_loss"), "model-val-loss", tag="span")),
            ]))
        else:
            parts.append(note("model/metrics.jsonl is missing or empty"))
        analysis = self.model["analysis"]
        worst = [c for c in _list(analysis.get("worst")) if isinstance(c, dict)]
        if worst:
            parts.append("<p>Hardest classes: " + esc(", ".join(
                f"{c.get('name')} {fmt(c.get('accuracy'), 'pct')}" for c in worst[:5])) + ".</p>")
        figures = [self.img(path, self._image(folder / "curves.png"), "training curves (loss and accuracy per epoch)",
                            css="wide"),
                   self.img(path, self._image(folder / "error-analysis.png"),
                            "classes with the least and most error, most-confused pairs", css="wide")]
        parts.append('<div class="figures">' + "".join(figures) + "</div>")
        return "\n".join(parts)

    def _filters_section(self, path: Path) -> str:
        if self.comparison is None or self.filters_dir is None:
            return note("No filter comparison in this run.")
        c, folder = self.comparison, self.filters_dir
        names = [str(n) for n in _list(c.get("filters"))]
        parts = [f"<p>Filters compared at <code>{esc(c.get('layer', '?'))}</code> on "
                 f"{esc(fmt(c.get('images'), 'int'))} images, {esc(fmt(c.get('samples_per_image'), 'int'))} samples "
                 "per image (paper sec. 7.3-7.4).</p>"]
        findings = [str(f) for f in _list(c.get("findings"))]
        if findings:
            parts.append('<ul class="compact">' + "".join(f"<li>{esc(f)}</li>" for f in findings) + "</ul>")
        precision = c.get("foreground_precision")
        if isinstance(precision, dict):
            parts.append("<h3>Foreground precision</h3>")
            parts.append(f"<p>The share of sampled patches that lie mostly (at least "
                         f"{esc(fmt(precision.get('threshold'), 'pct'))} of their pixels) on the object, over "
                         f"{esc(fmt(precision.get('images'), 'int'))} images with masks; the interval is the 95 % "
                         "interval of the per-image difference between the filter's expected precision and "
                         "uniform sampling's.</p>")
            fallbacks = _dict(c.get("fallbacks"))
            rows = [["<td>uniform (baseline)</td>",
                     metric(precision.get("uniform"), "foreground-precision-uniform"),
                     metric(precision.get("uniform"), "foreground-precision-expected", filter="uniform"),
                     "<td></td>", "<td></td>", "<td></td>", "<td>baseline</td>", "<td></td>"]]
            for name, row in _dict(precision.get("filters")).items():
                row = _dict(row)
                interval = _list(row.get("ci95")) + [None, None]
                rows.append([f"<td>{esc(name)}</td>",
                             metric(row.get("sampled"), "foreground-precision", filter=name),
                             metric(row.get("expected"), "foreground-precision-expected", filter=name),
                             metric(row.get("difference"), "foreground-precision-difference", "signed", filter=name),
                             metric(interval[0], "foreground-precision-ci-low", "signed", filter=name),
                             metric(interval[1], "foreground-precision-ci-high", "signed", filter=name),
                             f"<td>{esc(row.get('verdict', ''))}</td>",
                             metric(_dict(fallbacks.get(name)).get("rate"), "fallback-rate", "pct", filter=name)])
            parts.append(table(["filter", "sampled precision", "expected precision", "difference to uniform",
                                "95 % CI low", "95 % CI high", "verdict", "uniform fallbacks"], rows,
                               numeric=[1, 2, 3, 4, 5, 7], id="foreground-precision-table"))
        else:
            parts.append(note("Foreground precision was not scored (the data has no masks)."))
        for kind, label in (("cosine", "cosine similarity"), ("spearman", "Spearman rank correlation")):
            matrix = _list(_dict(c.get(kind)).get("mean"))
            if matrix and len(matrix) == len(names):
                rows = [[f"<th>{esc(name)}</th>"] + [metric(value, kind, first=name, second=other)
                                                       for other, value in zip(names, _list(line))]
                        for name, line in zip(names, matrix)]
                parts.append(f"<h3>Mean {esc(label)} of the filters' patch weights</h3>")
                parts.append(table([""] + names, rows, numeric=list(range(1, len(names) + 1)), id=f"{kind}-table"))
        figures = [self.img(path, self._image(folder / "cosine.png"), "cosine similarity (Figure 9, left)"),
                   self.img(path, self._image(folder / "spearman.png"), "Spearman rank correlation (Figure 9, right)"),
                   self.img(path, self._image(folder / "foreground-precision.png"),
                            "foreground precision of sampled patches against uniform sampling")]
        parts.append('<div class="figures">' + "".join(figures) + "</div>")
        overlays = [self._image(self._path(os.path.join(self._show(folder), str(o))))
                    for o in _list(c.get("overlays"))[:OVERLAYS_SHOWN]]
        overlays = [o for o in overlays if o is not None]
        if overlays:
            parts.append("<h3>Patch weights and ranks per filter (Figure 8)</h3>")
            parts.append('<div class="figures">' + "".join(
                self.img(path, o, o.name, css="overlay") for o in overlays) + "</div>")
        return "\n".join(parts)

    def _saes_section(self, path: Path) -> str:
        if not self.saes:
            return note("No SAE in this run.")
        rows, figures = [], []
        for info in self.saes:
            label, metrics = info["label"], _dict(info["metrics"])
            metadata, summary = info["metadata"], info["summary"]
            latents = metadata.get("latent_dim", summary.get("latent_dim"))
            inputs = metadata.get("input_dim", summary.get("input_dim"))
            params = _dict(info["entry"].get("params"))
            rows.append([
                f"<td>{esc(label)}</td>",
                f"<td><code>{esc(info['entry'].get('name', metadata.get('sae', '?')))}</code>"
                + (f" {esc(', '.join(f'{k}={v}' for k, v in params.items()))}" if params else "") + "</td>",
                metric(inputs, "input-dim", "int", sae=label), metric(latents, "latent-dim", "int", sae=label),
                cell(metadata.get("steps", summary.get("steps")), "int"),
                metric(metrics.get("mse"), "val-mse", sae=label),
                metric(metrics.get("fve"), "fve", "pct", sae=label),
                metric(metrics.get("l0"), "l0", sae=label),
                metric(metrics.get("dead_fraction"), "dead-fraction", "pct", sae=label),
                metric(metrics.get("dense_fraction"), "dense-fraction", "pct", sae=label),
                metric(metrics.get("compression"), "compression", sae=label),
                f"<td class=\"muted\">{esc(info['source'] or 'none')}</td>",
            ])
            folder = info["folder"]
            if folder is not None:
                figures.append(self.img(path, self._image(folder / "curves.png"),
                                        f"{label}: loss and sparsity against steps (Figure 18)", css="wide"))
        text = ("<p>Final validation metrics of each SAE. The compression factor is the mean number of non-zero "
                "input channels per sample divided by the mean number of active latents (L0).</p>")
        return (text + table(["SAE", "architecture", "inputs", "latents", "steps", "validation MSE",
                              "variance explained", "L0", "dead latents", "dense latents", "compression factor",
                              "from"], rows, numeric=list(range(2, 11)), id="sae-table")
                + '<div class="figures">' + "".join(figures) + "</div>")

    def _sweep_section(self, path: Path) -> str:
        if self.sweep is None or self.sweep_dir is None:
            return note("No sweep in this run, so no Pareto frontier of sparsity against reconstruction.")
        sweep, folder = self.sweep, self.sweep_dir
        frontier = {label for labels in _dict(sweep.get("frontier")).values() for label in _list(labels)}
        rows = []
        for row in _list(sweep.get("configs")):
            row = _dict(row)
            label = str(row.get("label", "?"))
            rows.append([f"<td>{esc(label)}</td>", f"<td><code>{esc(row.get('sae', '?'))}</code></td>",
                         f"<td>{esc(row.get('group', ''))}</td>",
                         f"<td>{'yes' if label in frontier else ''}</td>",
                         metric(row.get("l0"), "sweep-l0", config=label),
                         metric(row.get("fve"), "sweep-fve", "pct", config=label),
                         metric(row.get("mse"), "sweep-mse", config=label),
                         metric(row.get("dead_fraction"), "sweep-dead-fraction", "pct", config=label),
                         metric(row.get("compression"), "sweep-compression", config=label),
                         f"<td>{esc(row.get('failed') or '')}</td>"])
        figures = [self.img(path, self._image(folder / "pareto.png"),
                            "L0 against 1 - variance explained, frontier per architecture (Figure 16)", css="wide"),
                   self.img(path, self._image(folder / "ablations.png"),
                            "latent-size and clip ablations (Figure 17)", css="wide")]
        text = (f"<p>{esc(fmt(len(rows), 'int'))} configurations trained side by side for "
                f"{esc(fmt(sweep.get('steps'), 'int'))} steps (paper sec. 8.4).</p>")
        return (text + '<div class="figures">' + "".join(figures) + "</div>"
                + table(["configuration", "SAE", "group", "on frontier", "L0", "variance explained", "MSE",
                         "dead latents", "compression factor", "failed"], rows, numeric=[4, 5, 6, 7, 8],
                        id="sweep-table"))

    def _splice_section(self, path: Path) -> str:
        evaluated = [info for info in self.saes if info["evaluation"]]
        if not evaluated:
            return note("No SAE was spliced into the model in this run.")
        rows, details = [], []
        for info in evaluated:
            label, e = info["label"], info["evaluation"]
            top1 = _dict(e.get("top1"))
            rows.append([f"<td>{esc(label)}</td>", cell(e.get("images"), "int"),
                         metric(top1.get("model"), "top1-model", "pct", sae=label),
                         metric(top1.get("sae"), "top1-sae", "pct", sae=label),
                         metric(top1.get("zero"), "top1-zero", "pct", sae=label),
                         metric(e.get("top1_drop"), "top1-drop", "pct", sae=label),
                         metric(e.get("prediction_agreement"), "prediction-agreement", "pct", sae=label),
                         metric(e.get("kl_sae"), "kl-sae", sae=label),
                         metric(e.get("kl_zero_ablation"), "kl-zero-ablation", sae=label),
                         metric(e.get("kl_recovered"), "kl-recovered", "pct", sae=label),
                         metric(e.get("layer_fve"), "layer-fve", "pct", sae=label),
                         metric(e.get("layer_l0"), "layer-l0", sae=label)])
            ablation = [a for a in _list(e.get("ablation")) if isinstance(a, dict)]
            if ablation:
                items = []
                group = self.groups.get(label)
                for entry in ablation:
                    latent = entry.get("latent")
                    name = f"latent {latent}"
                    if group is not None and isinstance(latent, int) and latent in group.all_units():
                        name = f'<a href="{self.link(path, self.page_path(group, latent))}">{esc(name)}</a>'
                    else:
                        name = esc(name)
                    lowered = ", ".join(f"{c.get('class')} {fmt(c.get('change'), 'signed')}"
                                        for c in _list(entry.get("most_lowered")) if isinstance(c, dict))
                    items.append(f"<li>{name}: active on {esc(fmt(entry.get('images_active'), 'int'))} images; "
                                 f"zeroing it lowers {esc(lowered or 'nothing')}</li>")
                details.append(f"<h3>{esc(label)}: latents zeroed one at a time</h3><ul class=\"compact\">"
                               + "".join(items) + "</ul>")
        text = ("<p>Top-1 accuracy of the model alone, with the layer replaced by the SAE's reconstruction, and with "
                "the layer zeroed; KL divergence of the class distributions from the model's, and the share of the "
                "zero-ablation KL the SAE recovers.</p>")
        return (text + table(["SAE", "images", "top-1 alone", "top-1 with SAE", "top-1 layer zeroed", "top-1 drop",
                              "same prediction", "KL with SAE", "KL layer zeroed", "KL recovered",
                              "layer variance explained", "layer L0"], rows, numeric=list(range(1, 12)),
                             id="splice-table")
                + "".join(details))

    def _selectivity_section(self) -> str:
        if self.statistics is None:
            return note("No unit statistics in this run.")
        if self.statistics.get("concepts") is None:
            return note("The data has no concept labels, so no unit was scored for selectivity.")
        threshold = self.statistics.get("selective_auroc")
        attributes: list[str] = []
        for group in self.groups.values():
            for attribute in _dict((group.summary or {}).get("selective_by_attribute")):
                if attribute not in attributes:
                    attributes.append(attribute)
        focus = "shape" if "shape" in attributes else None
        phrases, rows = [], []
        for group in self.groups.values():
            summary = group.summary
            if not summary:
                continue
            units = summary.get("units")
            by_attribute = _dict(summary.get("selective_by_attribute"))

            def share(count: Any) -> Any:
                return count / units if _number(count) is not None and _number(units) else None

            count = by_attribute.get(focus) if focus else summary.get("selective")
            attribute = focus or "any"
            labels = {"group": group.label, "attribute": attribute}
            phrases.append(
                f"{metric(count, 'selective', 'int', tag='span', **labels)} of "
                f"{metric(units, 'units', 'int', tag='span', group=group.label)} {esc(group.title)} "
                f"({metric(share(count), 'selective-share', 'pct', tag='span', **labels)})")
            row = [f"<td>{esc(group.title)}</td>", metric(units, "units", "int", group=group.label),
                   metric(summary.get("dead"), "dead", "int", group=group.label),
                   metric(summary.get("selective"), "selective", "int", group=group.label, attribute="any"),
                   metric(share(summary.get("selective")), "selective-share", "pct", group=group.label,
                          attribute="any")]
            for name in attributes:
                row += [metric(by_attribute.get(name), "selective", "int", group=group.label, attribute=name),
                        metric(share(by_attribute.get(name)), "selective-share", "pct", group=group.label,
                               attribute=name)]
            rows.append(row)
        if not rows:
            return note("unit statistics hold no group summaries")
        what = "one shape" if focus else "one concept"
        statement = (f'<p class="statement" id="selectivity-statement">Selective for {esc(what)}: '
                     + "; ".join(phrases) + ".</p>")
        explanation = (f"<p>A unit is selective for a concept value (e.g. shape=star) when that value is the only one, "
                       f"across all attributes, whose AUROC (per-image maximum against the images showing the value) "
                       f"reaches {esc(fmt(threshold))}; dead units are never selective.</p>")
        headers = ["group", "units", "dead", "selective (any)", "share"]
        for name in attributes:
            headers += [f"selective: {name}", "share"]
        return statement + explanation + table(headers, rows, numeric=list(range(1, len(headers))),
                                                id="selectivity-table")

    def _units_section(self, path: Path) -> str:
        parts = []
        for group in self.groups.values():
            visualised = ", ".join(f'<a href="{self.link(path, self.page_path(group, u))}">{u}</a>'
                                   for u in group.visualised) or "none"
            parts.append(f"<h3>{esc(group.title)}</h3><p>{esc(fmt(len(group.all_units()), 'int'))} pages; "
                         f"visualised: {visualised}.</p>")
            for run in group.runs:
                record = run.record or {}
                general = [f for f in run.figures if f.unit is None]
                text = f"<code>{esc(run.name)}</code> ({esc(run.folder)}): {esc(fmt(len(run.figures), 'int'))} figures"
                if record.get("summary"):
                    text += f"; {esc(record['summary'])}"
                parts.append(f"<p>{text}</p>")
                if general:
                    parts.append('<div class="figures">' + "".join(
                        self.img(path, f.path, f.caption, kind=f.kind) for f in general) + "</div>")
        if not parts:
            return note("No unit statistics and no visualizer runs in this run.")
        return "\n".join(parts)

    # -- the units index ----------------------------------------------------------------------------------------

    def _units_page(self, path: Path) -> str:
        headers = [("group", "text"), ("unit", "number"), ("rank", "number")]
        headers += [(title, "number") for _, title, _, _ in STATISTIC_COLUMNS]
        headers += [("dead", "text"), ("best concept", "text"), ("AUROC", "number"), ("selective", "text"),
                    ("visualised", "text"), ("picture", None)]
        keys = ["group", "unit", "rank"] + [name for _, _, name, _ in STATISTIC_COLUMNS] + [
            "dead", "best-concept", "auroc", "selective", "visualised", "picture"]
        head = "".join(
            f"<th{attrs({'data-key': key, 'data-type': kind, 'class': 'num' if kind == 'number' else None})}>"
            + (f'<button type="button">{esc(title)}</button>' if kind else esc(title)) + "</th>"
            for key, (title, kind) in zip(keys, headers))
        rows = []
        total = 0
        for group in self.groups.values():
            visualised = set(group.visualised)
            for unit in group.all_units():
                total += 1
                stats = group.units.get(unit, {})
                best = _dict(stats.get("best_concept"))
                concept = f"{best['attribute']}={best['value']}" if best.get("attribute") else ""
                dead = stats.get("dead")
                thumb = group.first_figure(unit, ("feature-viz",))
                picture = (f'<img class="thumb" src="{esc(self.url(path, thumb.path))}" alt="'
                           f'{esc(group.unit_title(unit))}" width="48" height="48">' if thumb else "")
                search = " ".join(str(x) for x in (group.label, group.unit_title(unit), concept,
                                                   stats.get("selective") or "")).lower()
                cells = [f"<td>{esc(group.short)}</td>",
                         f'<td class="num" data-sort="{unit}"><a href="'
                         f'{self.link(path, self.page_path(group, unit))}">{unit}</a></td>',
                         cell(stats.get("rank"), "int")]
                cells += [cell(stats.get(key), style) for key, _, _, style in STATISTIC_COLUMNS]
                cells += [f"<td>{'' if dead is None else ('dead' if dead else 'no')}</td>",
                          f"<td>{esc(concept)}</td>", cell(best.get("auroc")),
                          f"<td>{esc(stats.get('selective') or '')}</td>",
                          f"<td>{'yes' if unit in visualised else ''}</td>",
                          f"<td>{picture}</td>"]
                row_attrs = attrs({"data-group": group.label, "data-unit": unit,
                                   "data-dead": "true" if dead else "false",
                                   "data-visualised": "true" if unit in visualised else "false",
                                   "data-search": search})
                rows.append(f"<tr{row_attrs}>{''.join(cells)}</tr>")
        options = '<option value="">all groups</option>' + "".join(
            f'<option value="{esc(g.label)}">{esc(g.title)}</option>' for g in self.groups.values())
        controls = (
            '<div class="controls">'
            '<label>Filter <input type="search" id="unit-filter" placeholder="unit, concept, e.g. shape=star"></label>'
            f'<label>Group <select id="group-filter">{options}</select></label>'
            '<label><input type="checkbox" id="hide-dead"> hide dead</label>'
            '<label><input type="checkbox" id="visualised-only"> visualised only</label>'
            f'<span id="unit-count" class="muted">{total} of {total} shown</span></div>')
        explanation = ("<p>Click a column title to sort. Frequency: the share of (image, position) cells where the "
                       "unit is above zero; image freq.: the share of images where it fires somewhere; share: its "
                       "part of the group's total |activation| (rank 1 = largest); best concept: the concept value "
                       "whose AUROC is highest.</p>")
        body = (explanation + controls
                + f'<table id="unit-table">\n<thead><tr>{head}</tr></thead>\n<tbody>\n' + "\n".join(rows)
                + "\n</tbody>\n</table>")
        if not rows:
            body += note("No units: the run has neither unit statistics nor visualizer runs.")
        subtitle = f"{total} units and latents of {', '.join(g.short for g in self.groups.values()) or 'no group'}"
        return self._frame(path, "Units and latents", body, subtitle=subtitle, script=True)

    # -- a unit's page ------------------------------------------------------------------------------------------

    def _unit_page(self, path: Path, group: Group, unit: int, before: int | None, after: int | None) -> str:
        stats = group.units.get(unit)
        pager = ['<nav class="pager">']
        pager.append(f'<a href="{self.link(path, self.page_path(group, before))}" rel="prev">&larr; '
                     f'{esc(group.unit_title(before))}</a>' if before is not None else
                     '<span class="muted">first</span>')
        pager.append(f'<a href="{self.link(path, self.out / "units.html")}">index of units</a>')
        pager.append(f'<a href="{self.link(path, self.page_path(group, after))}" rel="next">'
                     f'{esc(group.unit_title(after))} &rarr;</a>' if after is not None else
                     '<span class="muted">last</span>')
        pager.append("</nav>")
        parts = ["".join(pager)]
        if stats is None:
            parts.append(note("No statistics for this unit in statistics/statistics.json."))
        else:
            best = _dict(stats.get("best_concept"))
            count = group.summary.get("units") if group.summary else len(group.units)
            items = [("rank by share", metric(stats.get("rank"), "rank", "int", tag="span", group=group.label,
                                              unit=unit) + f" of {esc(fmt(count, 'int'))}")]
            items += [(title, metric(stats.get(key), name, style, tag="span", group=group.label, unit=unit))
                      for key, title, name, style in STATISTIC_COLUMNS]
            items.append(("dead", "yes, never above zero on these images" if stats.get("dead") else "no"))
            if best:
                items.append(("best concept", f"{esc(best.get('attribute'))}={esc(best.get('value'))}, AUROC "
                              + metric(best.get("auroc"), "best-concept-auroc", tag="span", group=group.label,
                                       unit=unit)))
            items.append(("selective", esc(stats.get("selective") or "no (no single concept value reaches the "
                                                                     "threshold)")))
            parts.append("<h2>Statistics</h2>" + facts(items))
        ablation = self._ablation_of(group, unit)
        if ablation:
            parts.append("<h2>Zeroing this latent in the spliced model</h2><p>" + esc(ablation) + "</p>")
        figures = group.figures_of(unit)
        if unit not in group.visualised and not figures:
            shown = ", ".join(str(u) for u in group.visualised)
            parts.append(note(f"Only the top-ranked {group.title} were visualised ({shown}); this page shows the "
                              "statistics only." if shown else
                              f"No visualizer ran on the {group.title}; this page shows the statistics only."))
        for run, found in figures:
            parts.append(f"<h2>{esc(run.name)}</h2>")
            parts.append('<div class="figures">' + "".join(
                self.img(path, f.path, f.caption, kind=f.kind, css="small" if f.kind in SMALL_KINDS else "")
                for f in found) + "</div>")
            examples = self._examples_table(run, unit)
            if examples:
                parts.append(examples)
        if unit in group.visualised and not figures:
            parts.append(note("This unit was visualised, but no visualizer run lists a figure for it."))
        subtitle = f"{group.title} at layer {self.pipeline.get('layer', '?')}"
        return self._frame(path, group.unit_title(unit), "\n".join(parts), subtitle=subtitle)

    def _ablation_of(self, group: Group, unit: int) -> str:
        for info in self.saes:
            if info["label"] != group.label or not info["evaluation"]:
                continue
            for entry in _list(info["evaluation"].get("ablation")):
                if isinstance(entry, dict) and entry.get("latent") == unit:
                    lowered = ", ".join(f"{c.get('class')} {fmt(c.get('change'), 'signed')}"
                                        for c in _list(entry.get("most_lowered")) if isinstance(c, dict))
                    return (f"Active on {fmt(entry.get('images_active'), 'int')} of the ablation images; zeroing it "
                            f"lowers the class logits most for {lowered or 'no class'} (mean change).")
        return ""

    @staticmethod
    def _examples_table(run: VisualRun, unit: int) -> str:
        """The top and bottom images with their values and peak cells, when the run's record has them (the
        dataset-examples record does)."""
        for entry in _list((run.record or {}).get("units")):
            if not isinstance(entry, dict) or entry.get("unit") != unit:
                continue
            rows = []
            for side in ("top", "bottom"):
                for rank, example in enumerate(_list(entry.get(side)), 1):
                    example = _dict(example)
                    peak = _list(example.get("peak"))
                    rows.append([f"<td>{side}</td>", cell(rank, "int"), f"<td>{esc(example.get('image', ''))}</td>",
                                 cell(example.get("value")),
                                 f"<td>{esc(', '.join(str(p) for p in peak)) if peak else ''}</td>"])
            if rows:
                return table(["side", "#", "image", "activation at the peak", "peak cell (row, column)"], rows,
                             numeric=[1, 3], **{"class": "examples"})
        return ""

    # -- the side-by-side ---------------------------------------------------------------------------------------

    def _compare_page(self, path: Path) -> str:
        groups = [g for g in self.groups.values() if g.visualised]
        parts = ["<p>The top units of the CNN layer beside the top latents of each SAE, ranked by their share of the "
                 "group's activation (paper sec. 9.3.1: the paper picked them on one image by hand; here the whole "
                 "dataset ranks them). Each cell shows the feature visualisation, the top dataset examples, how often "
                 "the unit fires and its best concept.</p>"]
        if not groups:
            parts.append(note("No visualizer runs in this run, so there is nothing to set side by side."))
        else:
            depth = max(len(g.visualised) for g in groups)
            rows = []
            for rank in range(depth):
                row = [f'<td class="num">{rank + 1}</td>']
                for group in groups:
                    row.append(self._compare_cell(path, group, group.visualised[rank])
                               if rank < len(group.visualised) else "<td></td>")
                rows.append(row)
            parts.append(table(["rank"] + [g.title for g in groups], rows, numeric=[0], id="side-by-side",
                               **{"class": "side"}))
        least = self._least_section(path)
        if least:
            parts.append("<h2>Least active units</h2>" + least)
        return self._frame(path, "CNN units and SAE latents side by side", "\n".join(parts),
                           subtitle=f"layer {self.pipeline.get('layer', '?')}")

    def _compare_cell(self, path: Path, group: Group, unit: int) -> str:
        stats = group.units.get(unit, {})
        link = self.link(path, self.page_path(group, unit))
        viz = group.first_figure(unit, ("feature-viz",))
        parts = [f'<a href="{link}"><strong>{esc(group.unit_title(unit))}</strong></a>']
        if viz is not None:
            parts.append(f'<div><a href="{link}"><img src="{esc(self.url(path, viz.path))}" alt="'
                         f'{esc(viz.caption or viz.kind)}" width="96" height="96"></a></div>')
        examples = [f for run, found in group.figures_of(unit) for f in found if f.kind == "top"][:EXAMPLES_SHOWN]
        if examples:
            parts.append('<div class="examples">' + "".join(
                f'<img src="{esc(self.url(path, f.path))}" alt="{esc(f.caption or f.kind)}" title="'
                f'{esc(f.caption)}" width="48" height="48">' for f in examples) + "</div>")
        best = _dict(stats.get("best_concept"))
        facts_line = []
        if stats:
            facts_line.append("fires on " + metric(stats.get("frequency"), "frequency", "pct", tag="span",
                                                    group=group.label, unit=unit) + " of positions")
        if best:
            facts_line.append(f"best concept {esc(best.get('attribute'))}={esc(best.get('value'))} (AUROC "
                              f"{esc(fmt(best.get('auroc')))})")
        if facts_line:
            parts.append("<div>" + "; ".join(facts_line) + "</div>")
        return f'<td data-group="{esc(group.label)}" data-unit="{unit}">' + "".join(parts) + "</td>"

    def _least_section(self, path: Path) -> str:
        """Per group: dead units, the median frequency, and the units with the smallest share (sec. 9.3.2)."""
        groups = [g for g in self.groups.values() if g.units]
        if not groups:
            return ""
        rows, details = [], []
        for group in groups:
            entries = [group.units[u] for u in sorted(group.units)]
            frequencies = sorted(f for f in (_number(e.get("frequency")) for e in entries) if f is not None)
            median = frequencies[len(frequencies) // 2] if frequencies else None
            dead = sum(1 for e in entries if e.get("dead"))
            rare = sum(1 for f in frequencies if f < 0.01)
            rows.append([f"<td>{esc(group.title)}</td>", cell(len(entries), "int"),
                         metric(dead, "dead", "int", group=group.label),
                         metric(dead / len(entries), "dead-share", "pct", group=group.label),
                         metric(rare, "rare", "int", group=group.label),
                         metric(median, "median-frequency", "pct", group=group.label)])
            least = sorted(entries, key=lambda e: (_number(e.get("share")) is None, _number(e.get("share")) or 0.0,
                                                   e["unit"]))[:LEAST_SHOWN]
            items = [f'<a href="{self.link(path, self.page_path(group, e["unit"]))}">{e["unit"]}</a> (share '
                     f"{esc(fmt(e.get('share'), 'pct'))}{', dead' if e.get('dead') else ''})" for e in least]
            details.append(f"<p>{esc(group.title)} with the least activation: " + ", ".join(items) + ".</p>")
        return (table(["group", "units", "dead", "dead share", "firing on < 1 % of positions", "median frequency"],
                      rows, numeric=[1, 2, 3, 4, 5], id="least-table") + "".join(details))


def build_report(run_dir: str | Path, out: str | Path | None = None, *, copy_images: bool = False) -> dict[str, Any]:
    """Write the HTML report of the pipeline run in ``run_dir`` into ``out`` (default ``run_dir/report``) and
    return its summary: paths, page counts per group, and the notes on parts the run does not have."""
    return Report(run_dir, out, copy_images=copy_images).load().write()
