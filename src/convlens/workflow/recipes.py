"""Recipes: the paper's workflow (steps 1-4) declared in TOML, checked against the registry before any work.

A recipe names a dataset (generated ``shapes`` or an image folder), a model (a plugin or a ``train-model`` run,
optionally fine-tuned), the activation filters to extract and compare, the SAEs to train (and an optional sweep),
the evaluation, the unit statistics and the visualizers to run on the top CNN units and SAE latents. Every
plugin is named as the registry knows it, so third-party plugins work by name. :func:`load_recipe` resolves
and validates the whole recipe (plugin names, every parameter, the layer) and raises one
:class:`RecipeError` naming the place of the first problem.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import re
import sys
from pathlib import Path
from typing import Any, Optional

from convlens.core.errors import ConvlensError, did_you_mean, suggest
from convlens.core.params import Params, coerce, param
from convlens.runtime.precision import COMPUTE_DTYPES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DEFAULTS_FILE = "defaults.toml"  # in the convlens.recipes package: the plugin names recipes fall back to
# plugin parameter values ending like these are files, taken from the recipe's folder like every relative path
PATH_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".tar", ".py", ".json", ".toml", ".txt")


class RecipeError(ConvlensError):
    """A recipe that cannot run: unknown section, plugin or parameter, wrong type, missing file."""


@dataclasses.dataclass(frozen=True)
class ShapesSection(Params):
    n: int = param(2000, min=1, help="number of images")
    size: int = param(64, min=16, help="image side in pixels")
    seed: int = param(0, help="same seed, same bytes")


@dataclasses.dataclass(frozen=True)
class PhotosSection(Params):
    """The photographs installed packages ship (``convlens data photos``); nothing to choose."""


@dataclasses.dataclass(frozen=True)
class FashionMnistSection(Params):
    n: int = param(2000, min=10, help="images, balanced over the 10 classes")
    split: str = param("train", choices=("train", "test"), help="Fashion-MNIST split")
    seed: int = param(0, help="same seed, same images")


GENERATED_DATA: dict[str, type[Params]] = {
    "shapes": ShapesSection,
    "photos": PhotosSection,
    "fashion-mnist": FashionMnistSection,
}


@dataclasses.dataclass(frozen=True)
class GeneratedData:
    """A dataset the run writes into its own ``data/`` folder: ``kind`` is a key of GENERATED_DATA."""

    kind: str
    section: Params

    def to_dict(self) -> dict[str, Any]:
        return {self.kind: self.section.to_dict()}


@dataclasses.dataclass(frozen=True)
class ExtractSection(Params):
    per_image: Optional[int] = param(None, min=1, help="samples per image (default: H x W of the layer)")
    val_fraction: float = param(0.1, min=0.0, max=0.9, help="share of images whose samples form the validation split")
    images_per_shard: int = param(256, min=1, help="images per store shard")
    batch_size: int = param(64, min=1, help="images per forward pass")
    dtype: str = param("float32", choices=("float32", "float16", "bfloat16"), help="stored precision")
    compare_max_images: Optional[int] = param(None, min=1, help="compare on a seeded subset of this many images")
    overlays: int = param(4, min=0, help="images drawn with every filter's patch weights")
    store: str = param("", help="the filter whose store the SAEs train on (default: the first filter)")


@dataclasses.dataclass(frozen=True)
class PredictionsSection(Params):
    enabled: bool = param(False, help="classify the images and map where the model looks for its prediction")
    top: int = param(5, min=1, help="classes listed per image")
    method: str = param("gradcam", help="the attribution visualizer drawn over each image")
    layer: str = param("", help="the layer the maps are taken at (default: the model's default layer)")
    max_images: int = param(64, min=1, help="the first images of the folder")


@dataclasses.dataclass(frozen=True)
class SanitySection(Params):
    enabled: bool = param(False, help="cascading randomisation of the model (Adebayo et al. 2018)")
    method: str = param("gradcam", help="the attribution visualizer checked")
    baseline: str = param("edge-detector", help="a method that ignores the model, checked beside it ('none': none)")
    layer: str = param("", help="the layer the maps are taken at (default: the model's default layer)")
    max_images: int = param(8, min=1, help="the first images of the folder")
    depth: int = param(1, min=1, help="how deep the randomised blocks are named (1: top-level children)")


@dataclasses.dataclass(frozen=True)
class AttributionBenchSection(Params):
    enabled: bool = param(False, help="score the attribution methods on every metric (convlens bench attribution)")
    methods: str = param("", help="comma-separated attribution visualizers (default: every installed one)")
    metrics: str = param("", help="comma-separated metrics (default: every installed one)")
    layer: str = param("", help="the layer the maps are taken at (default: the model's default layer)")
    max_images: int = param(32, min=2, help="the first images of the folder")
    batch_size: int = param(16, min=1, help="images per pass")
    shuffled_labels: bool = param(
        True, help="when the recipe trains the model, train it again on shuffled labels for data randomisation"
    )

    def names(self, field: str) -> tuple[str, ...]:
        return tuple(name.strip() for name in getattr(self, field).split(",") if name.strip())


@dataclasses.dataclass(frozen=True)
class EvaluateSection(Params):
    enabled: bool = param(True, help="splice every SAE into the model and measure top-1 and KL")
    max_images: Optional[int] = param(None, min=1, help="a seeded subset of this many images")
    ablate: int = param(8, min=0, help="the most active latents zeroed one at a time")
    ablation_images: int = param(512, min=1, help="images for the latent ablations")
    batch_size: int = param(64, min=1, help="images per forward pass")


@dataclasses.dataclass(frozen=True)
class StatisticsSection(Params):
    max_images: Optional[int] = param(None, min=1, help="a seeded subset of this many images")
    batch_size: int = param(64, min=1, help="images per forward pass")
    selective_auroc: float = param(
        0.9, min=0.5, max=1.0, help="AUROC from which a unit counts as selective for a concept value"
    )


@dataclasses.dataclass(frozen=True)
class VisualizeSection(Params):
    units: int = param(8, min=0, help="the top CNN channels visualised (by their share of the layer's activation)")
    latents: int = param(8, min=0, help="the top latents of every SAE visualised (by their share)")
    selective: int = param(
        3, min=0, help="also the most selective units of every group (highest concept AUROC), when there are concepts"
    )
    frequent: int = param(2, min=0, help="also the units of every group firing on the most images, not chosen yet")
    examples: int = param(5, min=1, help="top images per unit that attribution visualizers explain")


@dataclasses.dataclass(frozen=True)
class WarningsSection(Params):
    """When a result is not worth reading: the run's checks warn past these limits (checked after every run, so
    changing them reruns no step)."""

    chance_margin: float = param(
        0.1, min=0.0, max=1.0, help="warn when top-1 closes less than this share of the gap from chance to 100 %"
    )
    dead_latents: float = param(0.5, min=0.0, max=1.0, help="warn when more than this share of latents never fire")
    dense_latents: float = param(
        0.1, min=0.0, max=1.0, help="warn when more than this share of latents fire on over 10 % of samples"
    )
    fallbacks: float = param(
        0.2, min=0.0, max=1.0, help="warn when a filter fell back to uniform sampling on more than this share of images"
    )
    splice_loss: float = param(
        0.05, min=0.0, max=1.0, help="warn when splicing an SAE in loses more top-1 accuracy than this"
    )
    feature_viz_share: float = param(
        1.0,
        min=0.0,
        help="flag a feature visualisation ending below this share of the unit's best image in the data (its "
        "dataset examples then show more of what it responds to), and every one ending below its start",
    )


@dataclasses.dataclass(frozen=True)
class FilterSaesSection(Params):
    """[filter_saes]: one SAE per filter's store, all validated on one common store (paper 001 Figures 10-11)."""

    validate_on: str = param("magnitude", help="the filter whose store's validation split validates every SAE")
    baseline: str = param("uniform", help="the filter the others are judged against (the paper's original dataset)")
    sigma: float = param(2.0, min=0.0, help="1-d Gaussian smoothing of the drawn curves, in logged points (0: none)")


@dataclasses.dataclass(frozen=True)
class ReportSection(Params):
    enabled: bool = param(True, help="build the HTML report at the end")


@dataclasses.dataclass(frozen=True)
class Component:
    """A plugin as a recipe names it: registry kind, qualified name, validated parameters."""

    kind: str
    name: str
    params: dict[str, Any]
    label: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "params": self.params, "label": self.label}


@dataclasses.dataclass(frozen=True)
class SAEEntry:
    component: Component
    training: dict[str, Any]
    store: str  # label of the filter whose store it trains on


@dataclasses.dataclass(frozen=True)
class FilterSAEs:
    """What [filter_saes] asks for: ``sae`` trained with ``training`` on the store of each of ``filters``."""

    sae: Component
    training: dict[str, Any]
    filters: tuple[str, ...]  # labels of [extract] filters
    section: FilterSaesSection

    def to_dict(self) -> dict[str, Any]:
        return {
            "sae": self.sae.to_dict(),
            "train": self.training,
            "filters": list(self.filters),
            **self.section.to_dict(),
        }


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A validated recipe; ``to_dict`` is what a run records as its resolved recipe."""

    title: str
    seed: int
    device: str | None
    source: str  # the TOML text
    data_path: Path | None  # an image folder given by the user
    generated: GeneratedData | None  # else a dataset the run writes
    model: str  # a model plugin's qualified name, or a train-model run folder
    model_params: dict[str, Any]
    layer: str
    channels: int
    training: dict[str, Any] | None  # TrainingParams values when the model is fine-tuned
    filters: tuple[Component, ...]  # each writes an activation store
    compared: tuple[Component, ...]  # compared on the same images (paper Figures 8-9); empty: no comparison
    extract: ExtractSection
    saes: tuple[SAEEntry, ...]
    sweep: dict[str, Any] | None  # {"configs": [...], "training": {...}, "store": label}
    evaluate: EvaluateSection
    statistics: StatisticsSection
    visualize: VisualizeSection
    visualizers: tuple[Component, ...]
    report: ReportSection
    predictions: PredictionsSection = PredictionsSection()
    sanity: SanitySection = SanitySection()
    attribution_bench: AttributionBenchSection = AttributionBenchSection()
    dtype: str = "float32"  # compute precision (autocast) of the steps that run the model on images
    warnings: WarningsSection = WarningsSection()
    filter_saes: FilterSAEs | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "seed": self.seed,
            "device": self.device,
            "dtype": self.dtype,
            "data": {"path": str(self.data_path)} if self.data_path else self.generated.to_dict(),
            "model": {"name": self.model, "params": self.model_params, "layer": self.layer, "train": self.training},
            "extract": {
                "filters": [f.to_dict() for f in self.filters],
                "compare": [f.to_dict() for f in self.compared],
                **self.extract.to_dict(),
            },
            "sae": [
                {**entry.component.to_dict(), "train": entry.training, "store": entry.store} for entry in self.saes
            ],
            "sweep": self.sweep,
            "evaluate": self.evaluate.to_dict(),
            "statistics": self.statistics.to_dict(),
            "visualize": {**self.visualize.to_dict(), "visualizers": [v.to_dict() for v in self.visualizers]},
            "report": self.report.to_dict(),
            "predictions": self.predictions.to_dict(),
            "sanity": self.sanity.to_dict(),
            "attribution_bench": self.attribution_bench.to_dict(),
            "warnings": self.warnings.to_dict(),
            "filter_saes": self.filter_saes.to_dict() if self.filter_saes else None,
        }


TOP_LEVEL = (
    "title",
    "seed",
    "device",
    "dtype",
    "data",
    "model",
    "extract",
    "sae",
    "sweep",
    "evaluate",
    "statistics",
    "visualize",
    "report",
    "predictions",
    "sanity",
    "attribution_bench",
    "warnings",
    "filter_saes",
)


@functools.lru_cache(maxsize=1)
def recipe_defaults() -> dict[str, Any]:
    """The packaged defaults of the sections that name plugins (``convlens/recipes/defaults.toml``)."""
    from importlib.resources import files

    return tomllib.loads(files("convlens.recipes").joinpath(DEFAULTS_FILE).read_text(encoding="utf-8"))


def sweep_preset(name: Any, error: type[ConvlensError] = ConvlensError, place: str = "preset") -> list[dict[str, Any]]:
    """The SAE configurations of the sweep preset ``name`` (a fresh copy); ``error`` names the known ones."""
    import copy

    presets = recipe_defaults()["sweep"]["presets"]
    if name not in presets:
        raise error(f"{place} must be one of {', '.join(repr(p) for p in presets)}, got {name!r}")
    return copy.deepcopy(presets[name])


def load_recipe(path: str | Path, *, text: str | None = None) -> Recipe:
    """Read and validate the recipe at ``path`` (or its ``text``; relative paths are taken from ``path``'s
    folder)."""
    path = Path(path)
    if text is None:
        try:
            text = path.read_text()
        except OSError as exc:
            raise RecipeError(f"cannot read recipe {path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise RecipeError(
                f"cannot read recipe {path}: it is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at "
                f"position {exc.start}); a recipe is a TOML text file"
            ) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path.name} is not valid TOML: {exc}") from None
    try:
        return _validate(raw, text, path.parent)
    except RecipeError as exc:
        raise RecipeError(f"{path.name}: {exc}") from None


def _table(raw: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise RecipeError(f"{where}{key} must be a table, got {type(value).__name__}")
    return dict(value)


def _known(table: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for key in table:
        if key not in allowed:
            hint = suggest(key, allowed, n=1)
            raise RecipeError(
                f"{where} has no key '{key}'"
                + (f"; did you mean '{hint[0]}'?" if hint else "")
                + f" (keys: {', '.join(allowed)})"
            )


def _section(cls: type, table: dict[str, Any], where: str) -> Any:
    try:
        return coerce(cls, table, owner=where)
    except ConvlensError as exc:
        raise RecipeError(str(exc)) from None


def _component(
    kind: str, entry: Any, where: str, extra: tuple[str, ...] = (), channels: int = 1
) -> tuple[Component, dict[str, Any]]:
    """``"name"`` or ``{name = ..., params = {...}, label = ...}``: the plugin checked against the registry, its
    parameters validated (an SAE's for ``channels`` inputs); returns the component and the entry's other keys
    (``extra``)."""
    from convlens.core.component_registry import default_registry
    from convlens.core.params import parameter_specs

    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise RecipeError(f"{where} must be a {kind} name or a table with a 'name'")
    _known(entry, ("name", "params", "label", *extra), where)
    try:
        component = default_registry().get(kind, entry["name"])
    except ConvlensError as exc:
        raise RecipeError(f"{where}: {exc}") from None
    params = entry.get("params", {})
    if not isinstance(params, dict):
        raise RecipeError(f"{where}.params must be a table")
    fields = {spec.name for spec in parameter_specs(component.spec.params)}
    checked = dict(params)
    if kind == "sae" and "input_dim" in fields:
        checked.setdefault("input_dim", channels)  # the layer's: the store will have as many
    owner = where if component.name in where else f"{where} ({kind} '{component.name}')"
    _section(component.spec.params, checked, owner)
    label = str(entry.get("label") or component.name)
    return Component(kind, component.qualified_name, dict(params), label), {k: entry[k] for k in extra if k in entry}


def _training(cls: type, table: Any, where: str) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise RecipeError(f"{where} must be a table")
    _section(cls, table, where)
    return dict(table)


def _unique(labels: list[str], where: str) -> None:
    seen: set[str] = set()
    for label in labels:
        if label in seen:
            raise RecipeError(f"{where}: the label '{label}' is used twice; give each entry its own 'label'")
        seen.add(label)


def _validate(raw: dict[str, Any], text: str, base: Path) -> Recipe:
    from convlens.models.fine_tuning import TrainingParams
    from convlens.sae.training import SAETrainingParams

    _known(raw, TOP_LEVEL, "the recipe")
    raw = _with_recipe_paths(raw, base)
    title = raw.get("title", "convlens run")
    seed = raw.get("seed", 0)
    device = raw.get("device")
    if not isinstance(title, str) or not isinstance(seed, int) or not (device is None or isinstance(device, str)):
        raise RecipeError("title and device must be strings and seed an integer")
    dtype = raw.get("dtype", "float32")
    if dtype not in COMPUTE_DTYPES:
        raise RecipeError(f"dtype '{dtype}' is not one of {', '.join(COMPUTE_DTYPES)}")

    data_path, generated = _check_data(_table(raw, "data", ""), base)

    model = _table(raw, "model", "")
    _known(model, ("name", "params", "layer", "train"), "[model]")
    if not isinstance(model.get("name"), str):
        raise RecipeError("[model] needs a 'name': a model plugin or a train-model run folder")
    model_name, model_params, layer, channels, module = _check_model(model, base)
    training = _training(TrainingParams, model["train"], "[model.train]") if "train" in model else None

    extract = _table(raw, "extract", "")
    filters_raw = extract.pop("filters", None)
    if not isinstance(filters_raw, list) or not filters_raw:
        raise RecipeError('[extract] needs \'filters\': a list of activation filters, e.g. ["magnitude", "median"]')
    filters = tuple(_component("filter", entry, f"[extract] filters[{i}]")[0] for i, entry in enumerate(filters_raw))
    _unique([f.label for f in filters], "[extract] filters")
    compare_raw = extract.pop("compare", len(filters) > 1)
    if isinstance(compare_raw, list):
        compared = tuple(
            _component("filter", entry, f"[extract] compare[{i}]")[0] for i, entry in enumerate(compare_raw)
        )
    elif isinstance(compare_raw, bool):
        compared = filters if compare_raw else ()
    else:
        raise RecipeError("[extract] compare must be true, false or a list of filters")
    if len(compared) == 1:
        raise RecipeError("[extract] compare needs at least two filters")
    _unique([f.label for f in compared], "[extract] compare")
    extract_section = _section(ExtractSection, extract, "[extract]")
    labels = [f.label for f in filters]
    default_store = extract_section.store or labels[0]
    if default_store not in labels:
        raise RecipeError(f"[extract] store '{default_store}' is not one of the filters ({', '.join(labels)})")

    saes_raw = raw.get("sae", [])
    if isinstance(saes_raw, dict):
        saes_raw = [saes_raw]
    if not isinstance(saes_raw, list):
        raise RecipeError("[[sae]] must be an array of tables")
    saes = []
    for i, entry in enumerate(saes_raw):
        component, extra = _component("sae", entry, f"[[sae]] #{i + 1}", extra=("train", "store"), channels=channels)
        store = extra.get("store", default_store)
        if store not in labels:
            raise RecipeError(f"[[sae]] #{i + 1} store '{store}' is not one of the filters ({', '.join(labels)})")
        saes.append(
            SAEEntry(component, _training(SAETrainingParams, extra.get("train", {}), f"[[sae]] #{i + 1} train"), store)
        )
    _unique([entry.component.label for entry in saes], "[[sae]]")

    sweep = None
    if "sweep" in raw:
        sweep = _check_sweep(_table(raw, "sweep", ""), labels, default_store, channels)
    filter_saes = None
    if "filter_saes" in raw:
        filter_saes = _check_filter_saes(_table(raw, "filter_saes", ""), labels, saes, channels)

    evaluate = _section(EvaluateSection, _table(raw, "evaluate", ""), "[evaluate]")
    statistics = _section(StatisticsSection, _table(raw, "statistics", ""), "[statistics]")
    visualizers, visualize = _check_visualize(_table(raw, "visualize", ""))
    for visualizer in visualizers:
        for key, value in visualizer.params.items():
            if key.replace("-", "_").endswith("layer") and isinstance(value, str):
                _check_layer(module, value, f"[visualize.{visualizer.label}] {key}")
    report = _section(ReportSection, _table(raw, "report", ""), "[report]")
    predictions = _section(PredictionsSection, _table(raw, "predictions", ""), "[predictions]")
    sanity = _section(SanitySection, _table(raw, "sanity", ""), "[sanity]")
    attribution_bench = _section(AttributionBenchSection, _table(raw, "attribution_bench", ""), "[attribution_bench]")
    if attribution_bench.enabled:
        _check_bench_section(module, attribution_bench)
    warnings = _section(WarningsSection, _table(raw, "warnings", ""), "[warnings]")
    for name, section in (("predictions", predictions), ("sanity", sanity)):
        if section.enabled:
            _check_attribution_section(module, section, name)
    return Recipe(
        title=title,
        seed=seed,
        device=device,
        source=text,
        data_path=data_path,
        generated=generated,
        model=model_name,
        model_params=model_params,
        layer=layer,
        channels=channels,
        training=training,
        filters=filters,
        compared=compared,
        extract=extract_section,
        saes=tuple(saes),
        sweep=sweep,
        evaluate=evaluate,
        statistics=statistics,
        visualize=visualize,
        visualizers=visualizers,
        report=report,
        predictions=predictions,
        sanity=sanity,
        attribution_bench=attribution_bench,
        dtype=dtype,
        warnings=warnings,
        filter_saes=filter_saes,
    )


def _check_bench_section(module: Any, section: AttributionBenchSection) -> None:
    """The methods and metrics [attribution_bench] names are installed, its layer is the model's."""
    from convlens.core.component_registry import default_registry

    registry = default_registry()
    for kind, field in (("visualizer", "methods"), ("metric", "metrics")):
        for name in section.names(field):
            try:
                registry.get(kind, name)
            except ConvlensError as exc:
                raise RecipeError(f"[attribution_bench] {field}: {exc}") from None
    if section.layer:
        _check_layer(module, section.layer, "[attribution_bench] layer")


def _check_attribution_section(module: Any, section: Any, name: str) -> None:
    """The methods of [predictions] or [sanity] are attribution visualizers, its layer is the model's."""
    from convlens.attribution.base import AttributionVisualizer
    from convlens.core.component_registry import default_registry

    registry = default_registry()
    methods = [section.method] + [getattr(section, "baseline", "none")]
    for method in (m for m in methods if m.lower() != "none"):
        try:
            instance = registry.create("visualizer", method)
        except ConvlensError as exc:
            raise RecipeError(f"[{name}] method: {exc}") from None
        if not isinstance(instance, AttributionVisualizer):
            raise RecipeError(f"[{name}] method '{method}' is not an attribution method (e.g. gradcam, saliency)")
    if section.layer:
        _check_layer(module, section.layer, f"[{name}] layer")


def _check_layer(module: Any, layer: str, where: str) -> None:
    from convlens.models.layers import resolve_layer

    try:
        resolve_layer(module, layer)
    except ConvlensError as exc:
        raise RecipeError(f"{where}: {exc}") from None


def _with_recipe_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """``raw`` with every plugin parameter that is a relative path taken from the recipe's folder ``base``."""
    raw = copy.deepcopy(raw)
    for table in _plugin_parameter_tables(raw):
        for key, value in table.items():
            table[key] = recipe_path(value, base)
    return raw


def _plugin_parameter_tables(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """The tables of plugin parameters: [model] params, the params of filters, SAEs and sweep configurations, and
    the [visualize.NAME] tables."""
    model, extract, saes, sweep = (raw.get(key) for key in ("model", "extract", "sae", "sweep"))
    entries = [model, *(saes if isinstance(saes, list) else [saes])]
    if isinstance(raw.get("filter_saes"), dict):
        entries.append(raw["filter_saes"].get("sae"))
    if isinstance(extract, dict):
        entries += [e for key in ("filters", "compare") if isinstance(extract.get(key), list) for e in extract[key]]
    if isinstance(sweep, dict) and isinstance(sweep.get("configs"), list):
        entries += sweep["configs"]
    tables = [entry.get("params") for entry in entries if isinstance(entry, dict)]
    visualize = raw.get("visualize")
    tables += list(visualize.values()) if isinstance(visualize, dict) else []
    return [table for table in tables if isinstance(table, dict)]


def recipe_path(value: Any, base: Path) -> Any:
    """A recipe value that is a relative path, taken from the recipe's folder ``base`` (absolute); other values as
    they are. A value is a path when it has a ``/``, starts with ``.`` or ``~``, or ends like a file
    (``PATH_SUFFIXES``), and names no scheme (``hf-hub:...``); in ``file.py:function`` (the ``python`` model's
    target) the file is the path."""
    if not isinstance(value, str):
        return value
    location, colon, function = value.rpartition(":")
    if not (colon and location.endswith(".py") and function.isidentifier()):
        location, colon, function = value, "", ""
    if not _looks_like_a_path(location):
        return value
    path = Path(location).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve()) + colon + function


def _looks_like_a_path(value: str) -> bool:
    if re.match(r"[A-Za-z][\w+.-]*:", value):
        return False
    return "/" in value or value.startswith((".", "~")) or value.lower().endswith(PATH_SUFFIXES)


def _check_data(data: dict[str, Any], base: Path) -> tuple[Path | None, GeneratedData | None]:
    """[data]: an image folder (``path``) or one dataset the run writes (shapes, photos, fashion-mnist)."""
    sources = ("path", *GENERATED_DATA)
    _known(data, sources, "[data]")
    given = [key for key in sources if key in data]
    if len(given) != 1:
        raise RecipeError(
            "[data] needs exactly one of 'path' (an image folder), 'shapes' (a table: n, size, seed), "
            "'photos' (an empty table: the photos installed packages ship) or 'fashion-mnist' (a table: n, split, seed)"
        )
    kind = given[0]
    if kind != "path":
        section = _section(GENERATED_DATA[kind], _table(data, kind, "[data]."), f"[data.{kind}]")
        return None, GeneratedData(kind, section)
    data_path = (base / str(data["path"])).resolve()
    if not data_path.is_dir():
        raise RecipeError(f"[data] path {data_path} is not a folder")
    return data_path, None


def _check_model(model: dict[str, Any], base: Path) -> tuple[str, dict[str, Any], str, int, Any]:
    """The model's name (or run folder), its parameters, the layer (default: the model's), its channels and the
    module; the model is built once, with the parameters given, to check them and the layer."""
    import torch

    from convlens.models.layers import activations_at
    from convlens.models.loading import load_model

    name = model["name"]
    run_folder = base / name
    if ("/" in name or name.startswith(".")) and not run_folder.is_dir():
        raise RecipeError(f"[model] name '{name}' looks like a path, but {run_folder} is not a train-model run")
    if run_folder.is_dir():
        name = str(run_folder.resolve())
    params = model.get("params", {})
    if not isinstance(params, dict):
        raise RecipeError("[model] params must be a table")
    try:
        bundle, record = load_model(name, params)
        layer = model.get("layer") or bundle.default_layer
        probe = activations_at(
            bundle.module.eval(), torch.zeros(1, 3, *bundle.input_size), layer, model_name=record["name"]
        ).activations[layer]
    except ConvlensError as exc:
        raise RecipeError(f"[model]: {exc}") from None
    if probe.ndim != 4:
        raise RecipeError(
            f"[model] layer '{layer}' gives {tuple(probe.shape)}; the workflow needs a convolutional "
            "layer with output [N, C, H, W]"
        )
    return (name if run_folder.is_dir() else record["name"]), params, layer, int(probe.shape[1]), bundle.module


def _check_sweep(sweep: dict[str, Any], labels: list[str], default_store: str, channels: int) -> dict[str, Any]:
    from convlens.sae.training import SAETrainingParams

    _known(sweep, ("preset", "configs", "train", "store"), "[sweep]")
    if ("preset" in sweep) == ("configs" in sweep):
        raise RecipeError(
            "[sweep] needs exactly one of 'preset' (\"paper\") or 'configs' (a list of "
            "{sae = NAME, params = {...}, group = ...})"
        )
    if "preset" in sweep:
        configs = sweep_preset(sweep["preset"], RecipeError, "[sweep] preset")
    else:
        configs = sweep["configs"]
        if not isinstance(configs, list) or not configs:
            raise RecipeError("[sweep] configs must be a non-empty list of tables")
    for i, config in enumerate(configs):
        if not isinstance(config, dict) or "sae" not in config:
            raise RecipeError(f"[sweep] configs[{i}] needs an 'sae' name")
        _known(config, ("sae", "params", "group"), f"[sweep] configs[{i}]")
        entry = {"name": config["sae"], "params": config.get("params", {})}
        _component("sae", entry, f"[sweep] configs[{i}]", channels=channels)
    store = sweep.get("store", default_store)
    if store not in labels:
        raise RecipeError(f"[sweep] store '{store}' is not one of the filters ({', '.join(labels)})")
    return {
        "configs": configs,
        "training": _training(SAETrainingParams, sweep.get("train", {}), "[sweep] train"),
        "store": store,
    }


def _check_filter_saes(table: dict[str, Any], labels: list[str], saes: list[SAEEntry], channels: int) -> FilterSAEs:
    """[filter_saes]: the filters are [extract] filters (their stores are extracted anyway), among them the one
    validated on and the baseline; the SAE is its ``sae`` table or the first [[sae]] entry."""
    from convlens.core.params import parameter_specs
    from convlens.sae.training import SAETrainingParams

    where = "[filter_saes]"
    _known(table, ("sae", "filters", *(spec.name for spec in parameter_specs(FilterSaesSection))), where)
    filters = table.pop("filters", labels)
    sae_entry = table.pop("sae", None)
    section = _section(FilterSaesSection, table, where)
    if not isinstance(filters, list) or not all(isinstance(label, str) for label in filters):
        raise RecipeError(f"{where} filters must be a list of [extract] filter labels")
    _unique(filters, f"{where} filters")
    listed = ", ".join(labels)
    for label in filters:
        if label not in labels:
            hint = did_you_mean(label, labels) or "; add it there"
            raise RecipeError(f"{where} filters: '{label}' is not one of [extract] filters ({listed}){hint}")
    for key, label in (("validate_on", section.validate_on), ("baseline", section.baseline)):
        if label not in labels:
            hint = did_you_mean(label, labels) or f': every SAE needs its store, so add "{label}" to [extract] filters'
            raise RecipeError(f"{where} {key} '{label}' is not one of [extract] filters ({listed}){hint}")
    if section.baseline not in filters:
        raise RecipeError(f"{where} filters must include the baseline '{section.baseline}'")
    if len(filters) < 2:
        raise RecipeError(f"{where} needs at least two filters to compare (the baseline and one more)")
    if sae_entry is None:
        if not saes:
            raise RecipeError(f"{where} needs an 'sae' table (name, params, train) when the recipe has no [[sae]]")
        return FilterSAEs(saes[0].component, saes[0].training, tuple(filters), section)
    component, extra = _component("sae", sae_entry, f"{where} sae", extra=("train",), channels=channels)
    training = _training(SAETrainingParams, extra.get("train", {}), f"{where} sae train")
    return FilterSAEs(component, training, tuple(filters), section)


def _check_visualize(table: dict[str, Any]) -> tuple[tuple[Component, ...], VisualizeSection]:
    names = table.pop("visualizers", list(recipe_defaults()["visualize"]["visualizers"]))
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise RecipeError("[visualize] visualizers must be a list of visualizer names")
    settings = {key: table.pop(key) for key in [k for k, v in table.items() if isinstance(v, dict)]}
    section = _section(VisualizeSection, table, "[visualize]")
    visualizers = []
    for name in names:
        component, _ = _component("visualizer", {"name": name, "params": settings.pop(name, {})}, f"[visualize.{name}]")
        visualizers.append(component)
    if settings:
        extra = next(iter(settings))
        raise RecipeError(
            f"[visualize.{extra}] configures a visualizer that is not in visualizers ({', '.join(names)})"
        )
    _unique([v.label for v in visualizers], "[visualize] visualizers")
    return tuple(visualizers), section
