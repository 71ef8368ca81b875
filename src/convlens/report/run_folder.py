"""What ``convlens report`` shows of a ``convlens run`` folder: plain dataclasses, filled by
:func:`convlens.report.reader.read_run` and rendered by the pages of :mod:`convlens.report.site`.

Values copied from the run's JSON keep their JSON types (numbers, strings, None) so that the pages can show them
exactly; None stands for a value the run does not have. Paths are absolute and lie inside the run folder.

A visualizer's record lists its ``figures``; besides ``unit``, ``path``, ``kind`` and ``caption``, a figure may
declare ``"small": true`` (draw it small: a picture at the scale of the unit's receptive field),
``"thumbnail": true`` (the picture that stands for its unit in indexes and side-by-side views) and
``"top_example": true`` (one of the images the unit responds to most); see :class:`Figure`.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

CNN_GROUP = "cnn"


# -- what a run holds ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Step:
    """One step of the pipeline as ``pipeline.json`` lists it."""

    name: str | None
    status: str
    seconds: Any
    outputs: list[str]


@dataclasses.dataclass
class ClassAccuracy:
    name: Any
    accuracy: Any


@dataclasses.dataclass
class TrainingMetrics:
    """The last row of a model's ``metrics.jsonl``."""

    epoch: Any
    val_top1: Any
    val_top5: Any
    train_top1: Any
    val_loss: Any


@dataclasses.dataclass
class ModelTraining:
    """The model trained by the run: final metrics, hardest classes and the pictures of its folder."""

    folder: Path
    final: TrainingMetrics | None
    hardest: list[ClassAccuracy]
    curves: Path | None
    error_analysis: Path | None
    classes: int | None = None


@dataclasses.dataclass
class FilterPrecision:
    """Foreground precision of one activation filter against uniform sampling."""

    name: str
    sampled: Any
    expected: Any
    difference: Any
    ci_low: Any
    ci_high: Any
    verdict: Any
    fallback_rate: Any


@dataclasses.dataclass
class ForegroundPrecision:
    threshold: Any
    images: Any
    uniform: Any
    filters: list[FilterPrecision]


@dataclasses.dataclass
class FilterComparison:
    """``filters/comparison.json``: settings, findings, foreground precision, mean similarity matrices (by measure,
    only those with one row per filter) and the pictures of the folder."""

    layer: Any
    images: Any
    samples_per_image: Any
    filters: list[str]
    findings: list[str]
    precision: ForegroundPrecision | None
    similarity: dict[str, list[list[Any]]]
    cosine: Path | None
    spearman: Path | None
    precision_picture: Path | None
    overlays: list[Path | None]  # as listed; None where the file is missing or not an image


@dataclasses.dataclass
class SaeMetrics:
    """Validation metrics of an SAE (all None when the run has none)."""

    mse: Any = None
    fve: Any = None
    l0: Any = None
    dead_fraction: Any = None
    dense_fraction: Any = None
    compression: Any = None


@dataclasses.dataclass
class LatentAblation:
    """One latent zeroed in the spliced model: on how many images it was active, which classes lost most."""

    latent: Any
    images_active: Any
    most_lowered: list[tuple[Any, Any]]


@dataclasses.dataclass
class SpliceEvaluation:
    """The model with the layer replaced by an SAE's reconstruction (``evaluate-sae``)."""

    images: Any
    top1_model: Any
    top1_sae: Any
    top1_zero: Any
    top1_drop: Any
    prediction_agreement: Any
    kl_sae: Any
    kl_zero_ablation: Any
    kl_recovered: Any
    layer_fve: Any
    layer_l0: Any
    ablations: list[LatentAblation]


@dataclasses.dataclass
class SaeRun:
    """One SAE of the run: what it is, its final metrics (and where they came from) and its evaluation."""

    label: str
    architecture: Any
    params: dict[str, Any]
    folder: Path | None
    input_dim: Any = None
    latent_dim: Any = None
    steps: Any = None
    metrics: SaeMetrics = dataclasses.field(default_factory=SaeMetrics)
    metrics_source: str | None = None
    curves: Path | None = None
    evaluation: SpliceEvaluation | None = None


@dataclasses.dataclass
class SweepConfig:
    label: str
    sae: Any
    group: Any
    on_frontier: bool
    l0: Any
    fve: Any
    mse: Any
    dead_fraction: Any
    compression: Any
    failed: str


@dataclasses.dataclass
class Sweep:
    steps: Any
    configs: list[SweepConfig]
    pareto: Path | None
    ablations: Path | None


@dataclasses.dataclass
class FilterSae:
    """The SAE trained on one filter's store: its final errors on that store and on the common validation store,
    and the share of logged steps at which its smoothed validation error was below the baseline's."""

    filter: str
    train_samples: Any
    steps: Any
    final_train_mse: Any
    final_val_mse: Any
    below_baseline: Any


@dataclasses.dataclass
class FilterSaes:
    """``filter-saes/summary.json``: one SAE per filter's store, all validated on the ``validated_on`` store
    (paper Figures 10-11), and the figure of their error curves."""

    validated_on: str
    baseline: str
    sigma: Any
    filters: list[FilterSae]
    figure: Path | None

    def final_val_mse(self, label: str) -> float | None:
        return next((finite_number(row.final_val_mse) for row in self.filters if row.filter == label), None)


@dataclasses.dataclass
class Statistics:
    """What ``statistics/statistics.json`` says about the whole run (the per-unit values go to the groups)."""

    has_concepts: bool
    selective_auroc: Any


@dataclasses.dataclass
class Concept:
    """The concept value a unit separates best (highest AUROC)."""

    attribute: Any
    value: Any
    auroc: Any


@dataclasses.dataclass
class UnitStatistics:
    """One unit's entry in ``statistics.json``."""

    unit: int
    rank: Any
    frequency: Any
    image_frequency: Any
    mean: Any
    max: Any
    mean_image_max: Any
    share: Any
    dead: bool | None
    best: Concept | None
    selective: str


@dataclasses.dataclass
class GroupSummary:
    units: Any
    dead: Any
    selective: Any
    selective_by_attribute: dict[str, Any]


@dataclasses.dataclass
class Figure:
    """One picture a visualizer run lists: its unit (None: the run as a whole), file, kind and caption, and whether
    it is drawn small, whether it stands for its unit and whether it is one of the unit's top examples."""

    unit: int | None
    path: Path
    kind: str
    caption: str
    run: str
    small: bool = False
    thumbnail: bool = False
    top_example: bool = False


@dataclasses.dataclass
class Example:
    """A top or bottom dataset image of a unit, as a visualizer's record lists it."""

    side: str
    rank: int
    image: str
    value: Any
    peak: list[Any]


@dataclasses.dataclass
class VisualRun:
    """One visualizer run on a group's top units (``units/<visualizer>`` or ``latents/<label>/<visualizer>``)."""

    name: str
    folder: str
    summary: str | None
    figures: list[Figure]
    examples: dict[int, list[Example]] = dataclasses.field(default_factory=dict)
    #: the ``convlens visualize`` words that render another unit as this run did, ``{unit}`` standing for it
    command: list[str] | None = None
    #: the run explained each unit on that unit's own top images (an attribution visualizer in the workflow)
    on_top_images: bool = False

    def command_for(self, unit: int) -> list[str] | None:
        return None if self.command is None else [word.replace("{unit}", str(unit)) for word in self.command]


@dataclasses.dataclass
class Group:
    """The CNN's channels (label ``cnn``) or one SAE's latents: statistics, visualised units and their runs."""

    label: str
    kind: str
    slug: str
    summary: GroupSummary | None = None
    units: dict[int, UnitStatistics] = dataclasses.field(default_factory=dict)
    visualised: list[int] = dataclasses.field(default_factory=list)
    #: why the workflow pictured each visualised unit: "share", "selective", "frequent"
    reasons: dict[int, list[str]] = dataclasses.field(default_factory=dict)
    #: units whose pictures the run's checks flag as not worth reading, and why
    flags: dict[int, list[str]] = dataclasses.field(default_factory=dict)
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
        """Per visualizer run that lists figures of ``unit``: the run and those figures."""
        return [
            (run, [f for f in run.figures if f.unit == unit])
            for run in self.runs
            if any(f.unit == unit for f in run.figures)
        ]

    def thumbnail(self, unit: int) -> Figure | None:
        """The first figure of ``unit`` that a visualizer declared its thumbnail."""
        return next((f for run in self.runs for f in run.figures if f.unit == unit and f.thumbnail), None)


@dataclasses.dataclass
class Prediction:
    """One image: its top classes (name, probability), its label when known, and the map of its top class."""

    image: str
    top: list[tuple[str, Any]]
    label: str | None
    top1_hit: Any
    top5_hit: Any
    overlay: Path | None


@dataclasses.dataclass
class Predictions:
    method: Any
    layer: Any
    labelled: Any
    top1_hits: Any
    top5_hits: Any
    rows: list[Prediction]
    classes: int | None = None


@dataclasses.dataclass
class AttributionBench:
    """``bench attribution``'s record (bench.json) and its figures and page."""

    record: dict[str, Any]
    chart: Path | None
    maps: Path | None
    page: Path | None


@dataclasses.dataclass
class SanityCheck:
    """Cascading randomisation: the mean Spearman per method and step, and the figures."""

    layer: Any
    images: int
    steps: list[str]
    spearman: dict[str, list[Any]]  # method -> mean Spearman per step
    chart: Path | None
    cascades: list[Path]


@dataclasses.dataclass
class RunFolder:
    """Everything the report shows of one run folder, and the notes on what it lacks."""

    folder: Path
    title: str
    layer: Any = None
    model_name: Any = None
    model_params: dict[str, Any] = dataclasses.field(default_factory=dict)
    data_path: Any = None
    data_images: Any = None
    data_concepts: Any = None
    filter_names: list[str] = dataclasses.field(default_factory=list)
    started: Any = None
    finished: Any = None
    versions: dict[str, Any] = dataclasses.field(default_factory=dict)
    steps: list[Step] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    model: ModelTraining | None = None
    comparison: FilterComparison | None = None
    saes: list[SaeRun] = dataclasses.field(default_factory=list)
    sweep: Sweep | None = None
    filter_saes: FilterSaes | None = None
    predictions: Predictions | None = None
    sanity: SanityCheck | None = None
    attribution_bench: AttributionBench | None = None
    statistics: Statistics | None = None
    groups: dict[str, Group] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)

    def ablation_of(self, group: Group, unit: int) -> LatentAblation | None:
        """The zeroing of ``unit`` in the spliced model of the SAE whose latents ``group`` holds, if evaluated."""
        for sae in self.saes:
            if sae.label == group.label and sae.evaluation is not None:
                for ablation in sae.evaluation.ablations:
                    if ablation.latent == unit:
                        return ablation
        return None


# -- values ---------------------------------------------------------------------------------------------------------


def finite_number(value: Any) -> float | None:
    """``value`` as a float when it is a finite JSON number (not a bool); otherwise None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def slug(text: str) -> str:
    """``text`` with every character but letters, digits, ``-``, ``_`` and ``.`` replaced by ``-``."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text) or "group"
