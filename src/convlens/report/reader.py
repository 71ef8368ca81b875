"""The reading half of ``convlens report``: a ``convlens run`` folder as the plain dataclasses of
:mod:`convlens.report.run_folder`, with no HTML.

:func:`read_run` reads ``pipeline.json`` and the JSON, JSONL and safetensors headers of the steps it names, checks
which pictures exist inside the run folder, and returns a :class:`~convlens.report.run_folder.RunFolder`. Parts a run
does not have, or files it cannot read, become notes (``RunFolder.notes``) rather than errors; only a folder without
a readable ``pipeline.json`` raises :class:`~convlens.core.errors.ConvlensError`. A path that resolves (symbolic links
included) outside the run folder is never read or shown: it is left out with a note naming it.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

from convlens.core.errors import ConvlensError
from convlens.data.images import resolves_inside, shown
from convlens.report.run_folder import (
    CNN_GROUP,
    AttributionBench,
    ClassAccuracy,
    Concept,
    Example,
    Figure,
    FilterComparison,
    FilterPrecision,
    FilterSae,
    FilterSaes,
    ForegroundPrecision,
    Group,
    GroupSummary,
    LatentAblation,
    ModelTraining,
    Prediction,
    Predictions,
    RunFolder,
    SaeMetrics,
    SaeRun,
    SanityCheck,
    SpliceEvaluation,
    Statistics,
    Step,
    Sweep,
    SweepConfig,
    TrainingMetrics,
    UnitStatistics,
    VisualRun,
    slug,
)

PIPELINE_FILE = "pipeline.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".svg")
SAE_METADATA_KEY = "convlens_sae"


# -- JSON helpers -------------------------------------------------------------------------------------------------


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


def as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _unit_number(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _text(value: Any) -> str:
    return "" if value is None else str(value)


# -- reading --------------------------------------------------------------------------------------------------------


def read_run(run_dir: str | Path) -> RunFolder:
    """Read the pipeline run in ``run_dir``; raises ConvlensError only when it is not a run folder."""
    return _Reader(Path(os.path.abspath(run_dir))).read()


class _Reader:
    """Reads one run folder, collecting a note for every part that is missing or unreadable."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.notes: list[str] = []
        self.refused: set[str] = set()

    # files and paths

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def path(self, relative: Any) -> Path | None:
        """``relative`` (from pipeline.json) as a path in the run folder, or None when it is not a usable path or
        resolves outside the run folder (noted)."""
        if not isinstance(relative, str) or not relative:
            return None
        path = Path(os.path.normpath(self.folder / relative))
        if not self.contained(path, relative):
            self.refused.add(relative)
            return None
        return path

    def absent(self, relative: Any, text: str) -> None:
        """Note ``text`` for a part the run does not have, unless ``relative`` was refused (which has its note)."""
        if not (isinstance(relative, str) and relative in self.refused):
            self.note(text)

    def inside(self, path: Path) -> bool:
        return path == self.folder or self.folder in path.parents

    def contained(self, path: Path, name: str | None = None) -> bool:
        """Whether ``path`` lies in the run folder with symbolic links resolved; when it does not, notes it by
        ``name`` (as pipeline.json or a record spells it) or its path."""
        if self.inside(path) and resolves_inside(path, self.folder):
            return True
        self.note(f"{shown(name or self.show(path))} lies outside the run folder; left out")
        return False

    def show(self, path: Path) -> str:
        """``path`` relative to the run folder when it lies inside it."""
        return path.relative_to(self.folder).as_posix() if self.inside(path) else str(path)

    def image(self, path: Path | None) -> Path | None:
        """``path`` when it is an existing image inside the run folder; otherwise None."""
        if path is None or not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            return None
        return path if self.contained(path) else None

    def image_in(self, folder: Path, relative: Any) -> Path | None:
        """The image that ``relative`` (from a record in ``folder``) names, if it exists inside the run folder."""
        return self.image(self.path(os.path.join(self.show(folder), str(relative))))

    def read_json(self, path: Path, what: str) -> Any:
        if not path.is_file():
            self.note(f"{what}: {self.show(path)} is missing")
            return None
        if not self.contained(path):
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            self.note(f"{what}: cannot read {self.show(path)} ({exc})")
            return None

    def read_json_if_present(self, path: Path, what: str) -> Any:
        """The JSON in ``path``, or None without a note when the file is not there."""
        return self.read_json(path, what) if path.is_file() else None

    def read_jsonl(self, path: Path, what: str) -> list[dict[str, Any]]:
        if not path.is_file() or not self.contained(path):
            return []
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, ValueError) as exc:
            self.note(f"{what}: cannot read {self.show(path)} ({exc})")
            return []
        rows = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                self.note(f"{what}: line {number} of {self.show(path)} is not JSON; skipped")
                continue
            if isinstance(row, dict):
                rows.append(row)
        return rows

    # the run

    def read(self) -> RunFolder:
        pipeline = self.pipeline()
        run = RunFolder(self.folder, str(pipeline.get("title") or self.folder.name))
        self.describe(run, pipeline)
        run.model = self.model(as_dict(pipeline.get("model")))
        run.comparison = self.comparison(as_dict(pipeline.get("filters")))
        run.saes = self.saes(as_list(pipeline.get("saes")))
        run.sweep = self.sweep(pipeline.get("sweep"))
        run.filter_saes = self.filter_saes(pipeline.get("filter_saes"))
        run.predictions = self.predictions(pipeline.get("predictions"))
        run.sanity = self.sanity(pipeline.get("sanity"))
        run.attribution_bench = self.attribution_bench(pipeline.get("attribution_bench"))
        groups: dict[str, Group] = {}
        run.statistics = self.statistics(pipeline.get("statistics"), groups)
        self.visualizations(as_dict(pipeline.get("visualizations")), groups)
        for label, units in as_dict(pipeline.get("flags")).items():
            group = _group(groups, str(label))
            group.flags = {
                int(unit): [_text(why) for why in as_list(reasons)]
                for unit, reasons in as_dict(units).items()
                if str(unit).isdigit()
            }
        run.groups = groups
        run.notes = self.notes
        return run

    def pipeline(self) -> dict[str, Any]:
        if not self.folder.is_dir():
            raise ConvlensError(f"{self.folder} is not a folder; pass a run folder written by `convlens run`")
        path = self.folder / PIPELINE_FILE
        if not path.is_file():
            raise ConvlensError(
                f"{self.folder} is not a convlens pipeline run: it has no {PIPELINE_FILE} "
                "(make one with `convlens run RECIPE --out DIR`)"
            )
        try:
            pipeline = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConvlensError(f"cannot read {path}: {exc}") from None
        if not isinstance(pipeline, dict):
            raise ConvlensError(f"{path} does not hold a JSON object")
        return pipeline

    @staticmethod
    def describe(run: RunFolder, pipeline: dict[str, Any]) -> None:
        """The facts of ``pipeline.json`` itself: model, layer, data, filters, times, versions, steps, warnings."""
        model, data = as_dict(pipeline.get("model")), as_dict(pipeline.get("data"))
        run.layer = pipeline.get("layer")
        run.model_name, run.model_params = model.get("name"), as_dict(model.get("params"))
        run.data_path, run.data_images, run.data_concepts = data.get("path"), data.get("images"), data.get("concepts")
        run.filter_names = [str(n) for n in as_list(as_dict(pipeline.get("filters")).get("names"))]
        run.started, run.finished = pipeline.get("started"), pipeline.get("finished")
        run.versions = as_dict(pipeline.get("versions"))
        run.steps = [
            Step(
                name=None if step.get("name") is None else str(step["name"]),
                status=str(step.get("status", "unknown")),
                seconds=step.get("seconds"),
                outputs=[str(o) for o in as_list(step.get("outputs"))],
            )
            for step in map(as_dict, as_list(pipeline.get("steps")))
        ]
        run.warnings = [str(w) for w in as_list(pipeline.get("warnings"))]

    # the model, the filters

    def model(self, entry: dict[str, Any]) -> ModelTraining | None:
        folder = self.path(entry.get("run"))
        if folder is None:
            self.absent(
                entry.get("run"), "no trained model in this run (a ready-made model was used): no training curves"
            )
            return None
        if not folder.is_dir():
            self.note(f"model: {self.show(folder)} is missing")
            return None
        self.read_json_if_present(folder / "config.json", "model")  # read for its note only, when it cannot be read
        rows = self.read_jsonl(folder / "metrics.jsonl", "model")
        analysis = as_dict(self.read_json_if_present(folder / "error-analysis.json", "model"))
        final = None
        if rows:
            last = rows[-1]
            final = TrainingMetrics(
                *(last.get(key) for key in ("epoch", "val_top1", "val_top5", "train_top1", "val_loss"))
            )
        hardest = [
            ClassAccuracy(c.get("name"), c.get("accuracy"))
            for c in as_list(analysis.get("worst"))
            if isinstance(c, dict)
        ]
        names = as_list(analysis.get("class_names"))
        return ModelTraining(
            folder,
            final,
            hardest,
            self.image(folder / "curves.png"),
            self.image(folder / "error-analysis.png"),
            len(names) or None,
        )

    def comparison(self, entry: dict[str, Any]) -> FilterComparison | None:
        folder = self.path(entry.get("comparison"))
        if folder is None:
            self.absent(entry.get("comparison"), "no filter comparison in this run")
            return None
        comparison = self.read_json(folder / "comparison.json", "filter comparison")
        if not isinstance(comparison, dict):
            return None
        names = [str(n) for n in as_list(comparison.get("filters"))]
        similarity = {}
        for measure in ("cosine", "spearman"):
            matrix = as_list(as_dict(comparison.get(measure)).get("mean"))
            if matrix and len(matrix) == len(names):
                similarity[measure] = [as_list(line) for line in matrix]
        return FilterComparison(
            layer=comparison.get("layer"),
            images=comparison.get("images"),
            samples_per_image=comparison.get("samples_per_image"),
            filters=names,
            findings=[str(f) for f in as_list(comparison.get("findings"))],
            precision=self.precision(comparison),
            similarity=similarity,
            cosine=self.image(folder / "cosine.png"),
            spearman=self.image(folder / "spearman.png"),
            precision_picture=self.image(folder / "foreground-precision.png"),
            overlays=[self.image_in(folder, o) for o in as_list(comparison.get("overlays"))],
        )

    @staticmethod
    def precision(comparison: dict[str, Any]) -> ForegroundPrecision | None:
        precision = comparison.get("foreground_precision")
        if not isinstance(precision, dict):
            return None
        fallbacks = as_dict(comparison.get("fallbacks"))
        filters = []
        for name, row in as_dict(precision.get("filters")).items():
            row = as_dict(row)
            interval = as_list(row.get("ci95")) + [None, None]
            filters.append(
                FilterPrecision(
                    name=name,
                    sampled=row.get("sampled"),
                    expected=row.get("expected"),
                    difference=row.get("difference"),
                    ci_low=interval[0],
                    ci_high=interval[1],
                    verdict=row.get("verdict", ""),
                    fallback_rate=as_dict(fallbacks.get(name)).get("rate"),
                )
            )
        return ForegroundPrecision(
            precision.get("threshold"), precision.get("images"), precision.get("uniform"), filters
        )

    # the SAEs and the sweep

    def saes(self, entries: list[Any]) -> list[SaeRun]:
        if not entries:
            self.note("no SAE in this run")
        return [self.sae(as_dict(entry), position) for position, entry in enumerate(entries)]

    def sae(self, entry: dict[str, Any], position: int) -> SaeRun:
        label = str(entry.get("label") or entry.get("name") or f"sae-{position}")
        folder = self.path(entry.get("run"))
        sae = SaeRun(label, entry.get("name"), as_dict(entry.get("params")), folder)
        if folder is None or not folder.is_dir():
            self.absent(entry.get("run"), f"SAE '{label}': its run folder {entry.get('run')} is missing")
        else:
            self.sae_folder(sae, entry, folder)
        sae.evaluation = self.evaluation(label, entry.get("evaluation"))
        return sae

    def sae_folder(self, sae: SaeRun, entry: dict[str, Any], folder: Path) -> None:
        """What the SAE's run folder says: its size and steps, its final metrics, its curves."""
        what = f"SAE '{sae.label}'"
        rows = [
            row
            for row in self.read_jsonl(folder / "metrics.jsonl", what)
            if isinstance(row.get("val"), dict) and row["val"]
        ]
        metadata: dict[str, Any] = {}
        if (folder / "sae.safetensors").is_file() and self.contained(folder / "sae.safetensors"):
            try:
                raw_metadata = read_safetensors_metadata(folder / "sae.safetensors").get(SAE_METADATA_KEY)
                metadata = as_dict(json.loads(raw_metadata)) if raw_metadata else {}
            except (OSError, ValueError) as exc:
                self.note(f"{what}: cannot read the metadata of sae.safetensors ({exc})")
        summary = as_dict(self.read_json_if_present(folder / "summary.json", what))
        if "name" not in entry:
            sae.architecture = metadata.get("sae")
        sae.input_dim = metadata.get("input_dim", summary.get("input_dim"))
        sae.latent_dim = metadata.get("latent_dim", summary.get("latent_dim"))
        sae.steps = metadata.get("steps", summary.get("steps"))
        sae.curves = self.image(folder / "curves.png")
        if rows:
            values, sae.metrics_source = rows[-1]["val"], f"metrics.jsonl, step {rows[-1].get('step')}"
        elif as_dict(metadata.get("metrics")):
            values, sae.metrics_source = metadata["metrics"], "sae.safetensors metadata"
        else:
            self.note(f"{what}: no validation metrics (metrics.jsonl and sae.safetensors lack them)")
            return
        sae.metrics = SaeMetrics(
            *(values.get(name) for name in ("mse", "fve", "l0", "dead_fraction", "dense_fraction", "compression"))
        )

    def evaluation(self, label: str, relative: Any) -> SpliceEvaluation | None:
        path = self.path(relative)
        if path is None:
            self.absent(relative, f"SAE '{label}': not spliced into the model (no evaluation in this run)")
            return None
        value = self.read_json(path, f"SAE '{label}' evaluation")
        if not isinstance(value, dict) or not value:
            return None
        top1 = as_dict(value.get("top1"))
        ablations = [
            LatentAblation(
                a.get("latent"),
                a.get("images_active"),
                [(c.get("class"), c.get("change")) for c in as_list(a.get("most_lowered")) if isinstance(c, dict)],
            )
            for a in as_list(value.get("ablation"))
            if isinstance(a, dict)
        ]
        return SpliceEvaluation(
            images=value.get("images"),
            top1_model=top1.get("model"),
            top1_sae=top1.get("sae"),
            top1_zero=top1.get("zero"),
            top1_drop=value.get("top1_drop"),
            prediction_agreement=value.get("prediction_agreement"),
            kl_sae=value.get("kl_sae"),
            kl_zero_ablation=value.get("kl_zero_ablation"),
            kl_recovered=value.get("kl_recovered"),
            layer_fve=value.get("layer_fve"),
            layer_l0=value.get("layer_l0"),
            ablations=ablations,
        )

    def sweep(self, relative: Any) -> Sweep | None:
        folder = self.path(relative)
        if folder is None:
            self.absent(relative, "no sweep in this run: no Pareto frontier")
            return None
        sweep = self.read_json(folder / "sweep.json", "sweep")
        if not isinstance(sweep, dict):
            return None
        frontier = {label for labels in as_dict(sweep.get("frontier")).values() for label in as_list(labels)}
        configs = []
        for row in map(as_dict, as_list(sweep.get("configs"))):
            label = str(row.get("label", "?"))
            configs.append(
                SweepConfig(
                    label=label,
                    sae=row.get("sae", "?"),
                    group=row.get("group", ""),
                    on_frontier=label in frontier,
                    l0=row.get("l0"),
                    fve=row.get("fve"),
                    mse=row.get("mse"),
                    dead_fraction=row.get("dead_fraction"),
                    compression=row.get("compression"),
                    failed=_text(row.get("failed") or ""),
                )
            )
        return Sweep(
            sweep.get("steps"), configs, self.image(folder / "pareto.png"), self.image(folder / "ablations.png")
        )

    def filter_saes(self, relative: Any) -> FilterSaes | None:
        """The SAEs trained per filter's store, when the run has them (no note otherwise: an optional part)."""
        folder = self.path(relative) if relative else None
        if folder is None:
            return None
        summary = self.read_json(folder / "summary.json", "SAEs per filter")
        if not isinstance(summary, dict):
            return None
        rows = [
            FilterSae(
                filter=_text(row.get("filter", "?")),
                train_samples=row.get("train_samples"),
                steps=row.get("steps"),
                final_train_mse=row.get("final_train_mse"),
                final_val_mse=row.get("final_val_mse"),
                below_baseline=row.get("below_baseline"),
            )
            for row in map(as_dict, as_list(summary.get("filters")))
        ]
        return FilterSaes(
            validated_on=_text(summary.get("validated_on", "?")),
            baseline=_text(summary.get("baseline", "?")),
            sigma=summary.get("sigma"),
            filters=rows,
            figure=self.image_in(folder, summary.get("figure") or ""),
        )

    def predictions(self, relative: Any) -> Predictions | None:
        path = self.path(relative) if relative else None
        record = self.read_json(path, "predictions") if path is not None else None
        if not isinstance(record, dict):
            return None
        rows = []
        for row in map(as_dict, as_list(record.get("rows"))):
            top = [
                (_text(entry.get("name", "?")), entry.get("probability"))
                for entry in map(as_dict, as_list(row.get("top")))
            ]
            rows.append(
                Prediction(
                    image=_text(row.get("image", "?")),
                    top=top,
                    label=_text(row["label_name"]) if row.get("label_name") is not None else None,
                    top1_hit=row.get("top1_hit"),
                    top5_hit=row.get("top5_hit"),
                    overlay=self.image_in(path.parent, row.get("overlay")),
                )
            )
        return Predictions(
            record.get("method"),
            record.get("layer"),
            record.get("labelled"),
            record.get("top1_hits"),
            record.get("top5_hits"),
            rows,
            record.get("classes") if isinstance(record.get("classes"), int) else None,
        )

    def sanity(self, relative: Any) -> SanityCheck | None:
        path = self.path(relative) if relative else None
        record = self.read_json(path, "sanity check") if path is not None else None
        if not isinstance(record, dict):
            return None
        spearman: dict[str, list[Any]] = {}
        for row in map(as_dict, as_list(record.get("table"))):
            spearman.setdefault(_text(row.get("method", "?")), []).append(row.get("spearman_mean"))
        figures = as_dict(record.get("figures"))
        cascades = [self.image_in(path.parent, name) for key, name in figures.items() if key != "spearman"]
        return SanityCheck(
            layer=record.get("layer"),
            images=len(as_list(record.get("images"))),
            steps=[_text(step) for step in as_list(record.get("steps"))],
            spearman=spearman,
            chart=self.image_in(path.parent, figures.get("spearman")),
            cascades=[picture for picture in cascades if picture is not None],
        )

    def attribution_bench(self, relative: Any) -> AttributionBench | None:
        path = self.path(relative) if relative else None
        record = self.read_json(path, "attribution benchmark") if path is not None else None
        if not isinstance(record, dict) or not all(
            isinstance(record.get(key), list) for key in ("methods", "metrics", "results")
        ):
            return None
        record["methods"] = [row for row in record["methods"] if isinstance(row, dict) and "method" in row]
        record["metrics"] = [row for row in record["metrics"] if isinstance(row, dict) and "name" in row]
        record["results"] = [row for row in record["results"] if isinstance(row, dict)]
        figures = as_dict(record.get("figures"))
        page = path.parent / "index.html"
        return AttributionBench(
            record=record,
            chart=self.image_in(path.parent, figures.get("chart")),
            maps=self.image_in(path.parent, figures.get("maps")),
            page=page if page.is_file() else None,
        )

    # units: statistics and visualizer runs

    def statistics(self, relative: Any, groups: dict[str, Group]) -> Statistics | None:
        folder = self.path(relative)
        if folder is None:
            self.absent(relative, "no unit statistics in this run: unit pages only for visualised units")
            return None
        statistics = self.read_json(folder / "statistics.json", "unit statistics")
        if not isinstance(statistics, dict):
            return None
        for label, values in as_dict(statistics.get("groups")).items():
            values = as_dict(values)
            group = _group(groups, str(label), values.get("kind"))
            group.summary = _group_summary(as_dict(values.get("summary")))
            for entry in as_list(values.get("units")):
                if isinstance(entry, dict) and isinstance(entry.get("unit"), int):
                    group.units[entry["unit"]] = _unit_statistics(entry)
        if statistics.get("concepts") is None:
            self.note("the data has no concepts: no best concept or selectivity per unit")
        return Statistics(statistics.get("concepts") is not None, statistics.get("selective_auroc"))

    def visualizations(self, visualizations: dict[str, Any], groups: dict[str, Group]) -> None:
        if not visualizations:
            self.note("no visualizer runs in this run: unit pages show statistics only")
        for label, entry in visualizations.items():
            entry = as_dict(entry)
            group = _group(groups, str(label))
            group.visualised = [u for u in as_list(entry.get("units")) if _unit_number(u) is not None]
            group.reasons = {
                int(unit): [_text(r) for r in as_list(reasons)]
                for unit, reasons in as_dict(entry.get("reasons")).items()
                if str(unit).isdigit()
            }
            for name, folder_name in as_dict(entry.get("runs")).items():
                run = self.visual_run(group, str(name), folder_name)
                if run is None:
                    continue
                group.runs.append(run)
                if not group.visualised:
                    group.visualised = list(dict.fromkeys(f.unit for f in run.figures if f.unit is not None))

    def visual_run(self, group: Group, name: str, folder_name: Any) -> VisualRun | None:
        folder = self.path(folder_name)
        if folder is None or not folder.is_dir():
            self.absent(folder_name, f"{group.short}: visualizer run '{name}' ({folder_name}) is missing")
            return None
        what = f"{group.short} visualizer run '{name}'"
        record = self.record(folder, what)
        run = VisualRun(name, self.show(folder), None, [])
        if record is not None:
            run.summary = str(record["summary"]) if record.get("summary") else None
            run.figures = self.figures(record, folder, what, name)
            run.examples = _examples(record)
            run.on_top_images = isinstance(record.get("runs"), dict) and record.get("target") == "units"
            command = record.get("pipeline_command")
            if isinstance(command, list) and all(isinstance(word, str) for word in command):
                run.command = command
        return run

    def record(self, folder: Path, what: str) -> dict[str, Any] | None:
        """A visualizer run's ``record.json``; else the one JSON file in it that is a visualizer record."""
        if (folder / "record.json").is_file():
            value = self.read_json(folder / "record.json", what)
            return value if isinstance(value, dict) else None
        for candidate in sorted(folder.glob("*.json")):
            if candidate.name == "config.json" or not self.contained(candidate):
                continue
            try:
                value = json.loads(candidate.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(value, dict) and "visualizer" in value:
                self.note(f"{what}: no record.json; read {self.show(candidate)} instead")
                return value
        self.note(f"{what}: {self.show(folder / 'record.json')} is missing")
        return None

    def figures(self, record: dict[str, Any], folder: Path, what: str, run: str) -> list[Figure]:
        if not isinstance(record.get("figures"), list):
            self.note(f"{what}: its record lists no figures")
            return []
        figures, missing = [], 0
        for entry in map(as_dict, record["figures"]):
            path = self.image_in(folder, entry.get("path") or "")
            if path is None:
                missing += 1
                continue
            figures.append(
                Figure(
                    _unit_number(entry.get("unit")),
                    path,
                    str(entry.get("kind") or "figure"),
                    str(entry.get("caption") or ""),
                    run,
                    small=entry.get("small") is True,
                    thumbnail=entry.get("thumbnail") is True,
                    top_example=entry.get("top_example") is True,
                )
            )
        if missing:
            self.note(f"{what}: {missing} listed figure(s) missing or not an image inside the run folder; left out")
        return figures


def _group(groups: dict[str, Group], label: str, kind: Any = None) -> Group:
    """The group called ``label``, added with a page-name slug of its own when it is new."""
    if label not in groups:
        taken = {g.slug for g in groups.values()}
        name, number = slug(label), 2
        while name in taken:
            name, number = f"{slug(label)}-{number}", number + 1
        default = "channel" if label == CNN_GROUP else "latent"
        groups[label] = Group(label, str(kind or default), name)
    return groups[label]


def _group_summary(summary: dict[str, Any]) -> GroupSummary | None:
    if not summary:
        return None
    return GroupSummary(
        summary.get("units"),
        summary.get("dead"),
        summary.get("selective"),
        as_dict(summary.get("selective_by_attribute")),
    )


def _unit_statistics(entry: dict[str, Any]) -> UnitStatistics:
    best = as_dict(entry.get("best_concept"))
    dead = entry.get("dead")
    return UnitStatistics(
        unit=entry["unit"],
        rank=entry.get("rank"),
        frequency=entry.get("frequency"),
        image_frequency=entry.get("image_frequency"),
        mean=entry.get("mean"),
        max=entry.get("max"),
        mean_image_max=entry.get("mean_image_max"),
        share=entry.get("share"),
        dead=None if dead is None else bool(dead),
        best=Concept(best.get("attribute"), best.get("value"), best.get("auroc")) if best else None,
        selective=_text(entry.get("selective") or ""),
    )


def _examples(record: dict[str, Any]) -> dict[int, list[Example]]:
    """Per unit, the top and bottom images with their values and peak cells, when the record's ``units`` list them
    (from the first entry of a unit that has any)."""
    found: dict[int, list[Example]] = {}
    for entry in map(as_dict, as_list(record.get("units"))):
        unit = _unit_number(entry.get("unit"))
        if unit is None or unit in found:
            continue
        examples = [
            _example(side, rank, as_dict(example))
            for side in ("top", "bottom")
            for rank, example in enumerate(as_list(entry.get(side)), 1)
        ]
        if examples:
            found[unit] = examples
    return found


def _example(side: str, rank: int, example: dict[str, Any]) -> Example:
    return Example(side, rank, _text(example.get("image", "")), example.get("value"), as_list(example.get("peak")))
