"""Run a recipe (:mod:`convlens.workflow.recipes`) into one run folder, step by step, skipping what is done.

Every step has inputs (its part of the recipe and the digests of the steps it reads) and outputs (paths in the
run folder). When a step finishes, ``steps/<step>.json`` records the digest of its inputs; a later run skips a
step whose digest matches and whose outputs exist, reruns it when its inputs changed (after removing its stale
outputs), and lets an interrupted model training, extraction or SAE training continue from its own checkpoints,
which end with the same result as an uninterrupted run. ``pipeline.json`` says what the folder holds (the
layout the report reads) and how each step went.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from convlens.core.errors import ConvlensError
from convlens.runtime.locks import holds_files
from convlens.runtime.run_records import write_json_atomic
from convlens.units.selection import UnitChoice, choose_units
from convlens.workflow.recipes import Recipe

STEP_RECORDS = "steps"
BENCH_FOLDER = "attribution-bench"
#: the options of ``convlens visualize`` itself: a visualizer parameter of the same name is offered as --viz-NAME
VISUALIZE_COMMAND_OPTIONS = frozenset(
    ("model", "layer", "units", "sae", "data", "out", "o", "device", "dtype", "force", "json")
)
PIPELINE_FILE = "pipeline.json"
FILTER_SAES = "filter-saes"  # the folder of the SAEs trained per filter's store (paper Figures 10-11)


@dataclasses.dataclass
class Step:
    """One unit of work: ``action()`` writes ``outputs`` (relative to the run folder) from ``inputs`` and the
    outputs of the steps in ``needs``. A ``resumable`` step continues from what an interrupted attempt left."""

    name: str
    outputs: list[str]
    inputs: dict[str, Any]
    needs: list[str]
    action: Callable[[], dict[str, Any] | None]
    resumable: bool = False


# where the model and SAE trainers keep an interrupted training's state
TRAIN_STATE = Path("checkpoints") / "train-state.safetensors"


def resumable(out: Path) -> bool:
    """Whether ``out`` holds an interrupted training to resume; if not, what an earlier run left there is removed,
    so the step trains from a clean folder."""
    resume = (out / TRAIN_STATE).is_file()
    if not resume and out.exists():
        shutil.rmtree(out)
    return resume


def digest_of(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:20]


def slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)


class PipelineRun:
    """The steps of ``recipe`` in ``run_dir``: :meth:`plan` says what would run, :meth:`run` runs it."""

    def __init__(
        self,
        recipe: Recipe,
        run_dir: str | Path,
        *,
        device: str | None = None,
        dtype: str | None = None,
        workers: int = 0,
        progress: bool | None = None,
        echo: Callable[[str], None] = print,
    ):
        self.recipe = recipe
        self.run_dir = Path(run_dir)
        self.device_name = device or recipe.device
        self.dtype = dtype or recipe.dtype
        self.workers = workers  # a property of the machine, not of the recipe: no step's digest depends on it
        self.progress = progress
        self.echo = echo
        self._bundle: Any = None
        self._index: Any = None
        self._concepts: Any = None
        self.warnings: list[str] = []
        self.layout = self._layout()
        self.steps = self._steps()

    # -- paths and shared objects -------------------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        return self.recipe.data_path or self.run_dir / "data"

    def store_dir(self, label: str) -> Path:
        return self.run_dir / "activations" / slug(label)

    def sae_path(self, label: str) -> Path:
        return self.run_dir / "saes" / slug(label) / "sae.safetensors"

    def visual_dir(self, group: str, visualizer: str) -> str:
        if group == "cnn":
            return f"units/{slug(visualizer)}"
        return f"latents/{slug(group)}/{slug(visualizer)}"

    @property
    def device(self) -> Any:
        from convlens.runtime.device import resolve_device

        return resolve_device(self.device_name)

    def model_argument(self) -> str:
        return str(self.run_dir / "model") if self.recipe.training is not None else self.recipe.model

    def bundle(self) -> Any:
        """The model as the later steps use it (the fine-tuned weights when the recipe trains), built once."""
        if self._bundle is None:
            from convlens.models.loading import load_model
            from convlens.runtime.precision import channels_last

            params = {} if self.recipe.training is not None else self.recipe.model_params
            # a model this run trained comes from the recipe's own [model], which was checked before training
            trained_here = self.recipe.training is not None
            bundle, record = load_model(self.model_argument(), params, trust_code=trained_here)
            channels_last(bundle.module.to(self.device).eval(), self.device)
            self._bundle = (bundle, record)
        return self._bundle

    def index(self) -> Any:
        if self._index is None:
            from convlens.data.images import scan_images

            self._index = scan_images(self.data_dir)
        return self._index

    def concepts(self) -> Any:
        from convlens.data.concepts import load_concepts
        from convlens.data.images import DATASET_FILE

        if self._concepts is None and (self.data_dir / DATASET_FILE).is_file():
            self._concepts = load_concepts(self.data_dir)
        return self._concepts

    # -- the steps ------------------------------------------------------------------------------------------------

    def _steps(self) -> list[Step]:
        recipe = self.recipe
        steps: list[Step] = []
        upstream: list[str] = []
        if recipe.generated is not None:
            steps.append(Step("data", ["data"], recipe.generated.to_dict(), [], self._make_data))
            upstream = ["data"]
        data_inputs = {"data": str(recipe.data_path)} if recipe.data_path else {}
        if recipe.training is not None:
            steps.append(
                Step(
                    "train-model",
                    ["model"],
                    {
                        "model": recipe.model,
                        "params": recipe.model_params,
                        "train": recipe.training,
                        "seed": recipe.seed,
                        **data_inputs,
                    },
                    upstream,
                    self._train_model,
                    resumable=True,
                )
            )
            model_steps = ["train-model"]
        else:
            model_steps = upstream
        base = {
            "model": recipe.model,
            "params": recipe.model_params,
            "layer": recipe.layer,
            "seed": recipe.seed,
            **data_inputs,
        }
        for component in recipe.filters:
            steps.append(
                Step(
                    f"extract:{component.label}",
                    [f"activations/{slug(component.label)}"],
                    {**base, "filter": component.to_dict(), "extract": recipe.extract.to_dict(), **self._precision()},
                    model_steps,
                    lambda c=component: self._extract(c),
                    resumable=True,
                )
            )
        if recipe.compared:
            steps.append(
                Step(
                    "compare-filters",
                    ["filters"],
                    {**base, "filters": [c.to_dict() for c in recipe.compared], "extract": recipe.extract.to_dict()},
                    model_steps,
                    self._compare_filters,
                )
            )
        sae_steps = []
        for entry in recipe.saes:
            name = f"train-sae:{entry.component.label}"
            steps.append(
                Step(
                    name,
                    [f"saes/{slug(entry.component.label)}"],
                    {"sae": entry.component.to_dict(), "train": entry.training, "seed": recipe.seed},
                    [f"extract:{entry.store}"],
                    lambda e=entry: self._train_sae(e),
                    resumable=True,
                )
            )
            sae_steps.append(name)
        if recipe.sweep is not None:
            steps.append(
                Step(
                    "sweep",
                    ["sweep"],
                    {"sweep": recipe.sweep, "seed": recipe.seed},
                    [f"extract:{recipe.sweep['store']}"],
                    self._sweep,
                )
            )
        if recipe.filter_saes is not None:
            steps += self._filter_sae_steps(recipe.filter_saes)
        if recipe.evaluate.enabled:
            for entry in recipe.saes:
                label = entry.component.label
                steps.append(
                    Step(
                        f"evaluate:{label}",
                        [f"evaluation/{slug(label)}.json"],
                        {**base, "evaluate": recipe.evaluate.to_dict()},
                        model_steps + [f"train-sae:{label}"],
                        lambda e=entry: self._evaluate(e),
                    )
                )
        if recipe.predictions.enabled:
            inputs = {**base, "predictions": recipe.predictions.to_dict(), **self._precision()}
            steps.append(Step("predictions", ["predictions"], inputs, model_steps, self._predictions))
        if recipe.sanity.enabled:
            inputs = {**base, "sanity": recipe.sanity.to_dict()}
            steps.append(Step("sanity-check", ["sanity"], inputs, model_steps, self._sanity_check))
        if recipe.attribution_bench.enabled:
            inputs = {**base, "attribution_bench": recipe.attribution_bench.to_dict()}
            steps.append(Step("attribution-bench", [BENCH_FOLDER], inputs, model_steps, self._attribution_bench))
        steps.append(
            Step(
                "statistics",
                ["statistics"],
                {**base, "statistics": recipe.statistics.to_dict(), **self._precision()},
                model_steps + sae_steps,
                self._statistics,
            )
        )
        section = recipe.visualize
        groups = [("cnn", UnitChoice(section.units, section.selective, section.frequent), None)]
        groups += [
            (e.component.label, UnitChoice(section.latents, section.selective, section.frequent), e)
            for e in recipe.saes
        ]
        for group, choice, entry in groups:
            if choice.total == 0:
                continue
            previous: list[str] = []
            for visualizer in recipe.visualizers:
                name = f"visualize:{group}:{visualizer.label}"
                steps.append(
                    Step(
                        name,
                        [self.visual_dir(group, visualizer.label)],
                        {
                            **base,
                            "visualizer": visualizer.to_dict(),
                            "count": choice.by_share,
                            **({"choice": dataclasses.asdict(choice)} if choice.total > choice.by_share else {}),
                            "examples": recipe.visualize.examples,
                            **self._precision(),
                        },
                        ["statistics", *previous],
                        lambda g=group, v=visualizer, e=entry, c=choice: self._visualize(g, v, e, c),
                    )
                )
                previous.append(name)
        return steps

    def _filter_sae_steps(self, section: Any) -> list[Step]:
        """One SAE per filter's store, validated on the store of ``validate_on`` (resumable, one step each, so that
        a new filter trains only its own), then the summary and the figure of them all."""
        common = {"sae": section.sae.to_dict(), "train": section.training, "seed": self.recipe.seed}
        validate_on = section.section.validate_on
        steps = [
            Step(
                f"filter-sae:{label}",
                [f"{FILTER_SAES}/{slug(label)}"],
                {**common, "validate_on": validate_on},
                [f"extract:{label}", f"extract:{validate_on}"],
                lambda label=label: self._train_filter_sae(label),
                resumable=True,
            )
            for label in section.filters
        ]
        outputs = [f"{FILTER_SAES}/{name}" for name in ("summary.json", "errors.png", "errors.svg")]
        inputs = {"filters": list(section.filters), **section.section.to_dict()}
        summary = Step("filter-saes", outputs, inputs, [step.name for step in steps], self._compare_filter_saes)
        return [*steps, summary]

    def _precision(self) -> dict[str, str]:
        """The compute precision among a step's inputs; float32 is left out, so earlier runs keep their digests."""
        return {} if self.dtype == "float32" else {"dtype": self.dtype}

    def _layout(self) -> dict[str, Any]:
        """What the run folder holds, as ``pipeline.json`` describes it to the report."""
        recipe = self.recipe
        in_run = recipe.data_path is None
        return {
            "title": recipe.title,
            "model": {
                "name": recipe.model,
                "params": recipe.model_params,
                "run": "model" if recipe.training is not None else None,
            },
            "layer": recipe.layer,
            "data": {"path": "data" if in_run else str(recipe.data_path), "images": None, "concepts": None},
            "filters": {
                "names": [c.label for c in recipe.compared or recipe.filters],
                "stores": {c.label: f"activations/{slug(c.label)}" for c in recipe.filters},
                "comparison": "filters" if recipe.compared else None,
            },
            "saes": [
                {
                    "label": e.component.label,
                    "name": e.component.name,
                    "params": e.component.params,
                    "run": f"saes/{slug(e.component.label)}",
                    "store": f"activations/{slug(e.store)}",
                    "evaluation": f"evaluation/{slug(e.component.label)}.json" if recipe.evaluate.enabled else None,
                }
                for e in recipe.saes
            ],
            "sweep": "sweep" if recipe.sweep is not None else None,
            "filter_saes": FILTER_SAES if recipe.filter_saes is not None else None,
            "predictions": "predictions/predictions.json" if recipe.predictions.enabled else None,
            "sanity": "sanity/sanity_check.json" if recipe.sanity.enabled else None,
            "attribution_bench": f"{BENCH_FOLDER}/bench.json" if recipe.attribution_bench.enabled else None,
            "statistics": "statistics",
            "visualizations": {},
        }

    # -- running ----------------------------------------------------------------------------------------------------

    def _record_path(self, step: Step) -> Path:
        return self.run_dir / STEP_RECORDS / f"{slug(step.name)}.json"

    def _digests(self) -> dict[str, str]:
        digests: dict[str, str] = {}
        for step in self.steps:
            digests[step.name] = digest_of(
                {"step": step.name, "inputs": step.inputs, "needs": {n: digests[n] for n in step.needs}}
            )
        return digests

    def _read_record(self, step: Step) -> dict[str, Any]:
        try:
            return json.loads(self._record_path(step).read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def _is_done(self, step: Step, digest: str) -> bool:
        record = self._read_record(step)
        return (
            record.get("digest") == digest
            and record.get("status") == "done"
            and all((self.run_dir / o).exists() for o in step.outputs)
        )

    def plan(self) -> list[dict[str, Any]]:
        """Per step: name, outputs, and whether it would run or is done for the same inputs."""
        digests = self._digests()
        return [
            {
                "name": step.name,
                "outputs": step.outputs,
                "status": "done" if self._is_done(step, digests[step.name]) else "to run",
            }
            for step in self.steps
        ]

    def run(self) -> dict[str, Any]:
        from convlens.runtime.precision import check_compute_dtype
        from convlens.runtime.run_records import versions

        if self.dtype != "float32":  # checked now, not after the steps before the first that uses it
            check_compute_dtype(self.dtype, self.device)
        started = time.perf_counter()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / STEP_RECORDS).mkdir(exist_ok=True)
        (self.run_dir / "recipe.toml").write_text(self.recipe.source)
        digests = self._digests()
        states = [{"name": s.name, "status": "pending", "seconds": None, "outputs": s.outputs} for s in self.steps]
        self.state = {
            **self.layout,
            "recipe": self.recipe.to_dict(),
            "steps": states,
            "warnings": self.warnings,
            "started": _now(),
            "finished": None,
            "versions": versions(),
        }
        if self.recipe.data_path is not None:
            self._describe_data()
        self._write_state()
        ran = skipped = 0
        for number, (step, state) in enumerate(zip(self.steps, states), start=1):
            head = f"[{number}/{len(self.steps)}] {step.name}"
            if self._is_done(step, digests[step.name]):
                record = self._read_record(step)
                state.update(status="skipped", seconds=record.get("seconds"))
                self._after(step, {"warnings": record.get("warnings", [])})
                took = (
                    f" (it took {record['seconds']:.1f} s)" if isinstance(record.get("seconds"), (int, float)) else ""
                )
                self.echo(f"{head}: done before for the same inputs{took}, skipped")
                skipped += 1
                continue
            self._prepare(step, digests[step.name])
            self.echo(f"{head} ...")
            step_started = time.perf_counter()
            state["status"] = "running"
            self._write_state()
            try:
                result = step.action()
            except KeyboardInterrupt:
                state["status"] = "interrupted"
                self._write_state()
                raise
            except Exception as exc:
                state.update(status="failed", error=str(exc))
                self._write_state()
                raise
            seconds = round(time.perf_counter() - step_started, 2)
            state.update(status="done", seconds=seconds)
            self._after(step, result)
            write_json_atomic(
                self._record_path(step),
                {
                    "name": step.name,
                    "digest": digests[step.name],
                    "status": "done",
                    "inputs": step.inputs,
                    "outputs": step.outputs,
                    "seconds": seconds,
                    "warnings": (result or {}).get("warnings", []),
                },
            )
            self._write_state()
            self.echo(f"{head}: done in {seconds:.1f} s")
            ran += 1
        self._check()
        self.state["finished"] = _now()
        self._write_state()
        if self.recipe.report.enabled:
            self._report()
        report = self.run_dir / "report" / "index.html"
        return {
            "out": str(self.run_dir),
            "steps": len(self.steps),
            "ran": ran,
            "skipped": skipped,
            "seconds": round(time.perf_counter() - started, 1),
            "warnings": list(self.warnings),
            "report": str(report) if report.is_file() else None,
        }

    def _check(self) -> None:
        """The run's checks (:mod:`convlens.workflow.checks`) into its warnings and the flags the report shows."""
        from convlens.workflow.checks import check_run

        checks = check_run(self.run_dir, self.recipe, self.state)
        self.warnings.extend(w for w in checks.warnings if w not in self.warnings)
        self.state["flags"] = checks.flags

    def _prepare(self, step: Step, digest: str) -> None:
        """Mark ``step`` as running; remove what an earlier attempt left unless it ran for the same inputs and
        the step resumes from it (then the attempt's checkpoints continue it)."""
        if not (step.resumable and self._read_record(step).get("digest") == digest):
            for output in step.outputs:
                path = self.run_dir / output
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        write_json_atomic(self._record_path(step), {"name": step.name, "digest": digest, "status": "running"})

    def _after(self, step: Step, result: dict[str, Any] | None) -> None:
        """Fill ``pipeline.json`` with what a finished (or skipped) step tells the report."""
        if step.name == "data":
            self._describe_data()
        if step.name.startswith("visualize:"):
            _, group, visualizer = step.name.split(":", 2)
            record = json.loads((self.run_dir / step.outputs[0] / "record.json").read_text())
            entry = self.state["visualizations"].setdefault(
                group, {"units": record.get("pipeline_units"), "reasons": record.get("pipeline_reasons"), "runs": {}}
            )
            entry["runs"][visualizer] = step.outputs[0]
        if result and result.get("warnings"):
            self.warnings.extend(w for w in result["warnings"] if w not in self.warnings)

    def _describe_data(self) -> None:
        labelled = len(self.index().class_names or ()) > 1  # the class labels are a concept too (statistics)
        self.state["data"].update(images=len(self.index()), concepts=self.concepts() is not None or labelled)

    def _write_state(self) -> None:
        write_json_atomic(self.run_dir / PIPELINE_FILE, self.state)

    # -- step actions -----------------------------------------------------------------------------------------------

    def _make_data(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        generated = self.recipe.generated
        assert generated is not None
        kind, section, out = generated.kind, generated.section, self.run_dir / "data"
        if kind == "photos":
            from convlens.data.real_photos import write_photos

            summary = write_photos(out)
            return {"images": summary["images"], "skipped_sources": [item["source"] for item in summary["skipped"]]}
        total = section.n  # type: ignore[attr-defined]
        with tqdm(total=total, desc=kind, unit="img", leave=False, disable=self._disabled()) as bar:
            if kind == "shapes":
                from convlens.data.shapes import write_shapes

                write_shapes(out, n=total, size=section.size, seed=section.seed, progress=bar.update)
            else:
                from convlens.data.fashion_mnist import write_fashion_mnist

                write_fashion_mnist(out, n=total, split=section.split, seed=section.seed, progress=bar.update)
        return {}

    def _disabled(self) -> bool | None:
        return None if self.progress is None else not self.progress

    def _train_model(self) -> dict[str, Any]:
        from convlens.core.component_registry import default_registry
        from convlens.core.params import coerce, parameter_specs
        from convlens.models.fine_tuning import TrainingParams, prepare_data, train_model

        recipe = self.recipe
        training = coerce(TrainingParams, {"seed": recipe.seed, **recipe.training}, owner="[model.train]")
        prepared = prepare_data(self.data_dir, training)
        registry = default_registry()
        from convlens.models.loading import resolve_model_argument

        name, params = resolve_model_argument(recipe.model)
        params.update(recipe.model_params)
        component = registry.get("model", name)
        fields = {spec.name for spec in parameter_specs(component.spec.params)}
        if "num_classes" in fields and "num_classes" not in params:
            params["num_classes"] = len(prepared.class_names)
        if "seed" in fields and "seed" not in params:
            params["seed"] = recipe.seed
        bundle = registry.create("model", component.qualified_name, **params)
        out = self.run_dir / "model"
        resume = resumable(out)
        summary = train_model(
            bundle,
            prepared,
            out,
            training,
            device=self.device,
            resume=resume,
            progress=self.progress,
            model={"name": component.qualified_name, "params": params},
        )
        final = summary["final"]
        self.echo(f"  validation top-1 {100 * final['val_top1']:.1f} % after {summary['epochs']} epochs")
        return {"warnings": [summary["skipped_summary"]] if summary["skipped_summary"] else []}

    def _extract(self, component: Any) -> dict[str, Any]:
        from convlens.activations.extraction import ExtractionSettings, extract
        from convlens.core.component_registry import default_registry

        bundle, record = self.bundle()
        filter_ = default_registry().create("filter", component.name, **component.params)
        section = self.recipe.extract
        settings = ExtractionSettings(
            model=record,
            layer=self.recipe.layer,
            filter={"name": component.name, "params": filter_.params.to_dict() if filter_.params else {}},
            per_image=section.per_image,
            seed=self.recipe.seed,
            val_fraction=section.val_fraction,
            images_per_shard=section.images_per_shard,
            batch_size=section.batch_size,
            dtype=section.dtype,
            compute_dtype=self.dtype,
        )
        index = self.index()
        summary = extract(
            bundle,
            filter_,
            index,
            self.store_dir(component.label),
            settings,
            device=self.device,
            workers=self.workers,
            progress=self.progress,
            dataset={"root": str(index.root), "fingerprint": index.fingerprint()},
        )
        manifest = summary["manifest"]
        self.echo(
            f"  {manifest['samples']} samples of {manifest['images_used']} images; "
            f"{manifest['fallbacks']} uniform fallbacks"
        )
        warnings = []
        if manifest["skipped"]:
            warnings.append(
                f"extract {component.label}: skipped {len(manifest['skipped'])} images (unreadable, or non-finite "
                "activations; manifest.json lists each with its reason)"
            )
        return {"warnings": warnings}

    def _compare_filters(self) -> dict[str, Any]:
        from convlens.activations.filter_comparison import ComparisonSettings, compare_filters
        from convlens.core.component_registry import default_registry

        bundle, record = self.bundle()
        registry = default_registry()
        filters = {c.label: registry.create("filter", c.name, **c.params) for c in self.recipe.compared}
        section = self.recipe.extract
        settings = ComparisonSettings(
            layer=self.recipe.layer,
            per_image=section.per_image,
            seed=self.recipe.seed,
            batch_size=section.batch_size,
            max_images=section.compare_max_images,
            overlays=section.overlays,
        )
        index = self.index()
        result = compare_filters(
            bundle,
            filters,
            index,
            self.run_dir / "filters",
            settings,
            concepts=self.concepts(),
            device=self.device,
            workers=self.workers,
            progress=self.progress,
            run_info={
                "model": record,
                "filter_settings": {c.label: c.to_dict() for c in self.recipe.compared},
                "dataset": {"root": str(index.root), "fingerprint": index.fingerprint()},
            },
        )
        for line in result["findings"]:
            self.echo(f"  {line}")
        return {"warnings": [f"compare-filters: {line}" for line in result["findings"] if "not" in line]}

    def _first_images(self, count: int) -> tuple[Any, list[str], list[Any]]:
        """The first ``count`` readable images of the data as model inputs on the device, their names and their
        pictures as the model sees them."""
        from convlens.data.images import Preprocessing, SkipLog
        from convlens.data.loading import first_images

        bundle, _ = self.bundle()
        index = self.index()
        preprocessing = Preprocessing.of(bundle)
        batch = first_images(index, preprocessing, count, SkipLog(), device=self.device)
        names = [index.relative(index.paths[int(position)]) for position in batch.positions]
        return batch, names, [preprocessing.to_pil(image) for image in batch.images.cpu()]

    def _known_labels(self, batch: Any, names: list[str]) -> list[int | None]:
        """Per image its class in the model's terms when known: from ``photos.json`` (ImageNet indices), else the
        folder's labels."""
        from convlens.data.real_photos import PHOTOS_FILE

        photos = self.data_dir / PHOTOS_FILE
        if photos.is_file():
            records = json.loads(photos.read_text())["images"]
            indices = {record["file"]: record.get("imagenet_index") for record in records}
            return [indices.get(name) for name in names]
        return [int(label) if label >= 0 else None for label in batch.labels.tolist()]

    def _attribution(self, name: str) -> Any:
        from convlens.core.component_registry import default_registry

        return default_registry().create("visualizer", name)

    def _predictions(self) -> dict[str, Any]:
        from convlens.attribution.predictions import explained_predictions, prediction_overlays, prediction_summary
        from convlens.runtime.precision import autocast
        from convlens.runtime.run_records import write_json_atomic

        section = self.recipe.predictions
        bundle, _ = self.bundle()
        layer = section.layer or bundle.default_layer
        batch, names, pictures = self._first_images(section.max_images)
        method = self._attribution(section.method)
        with autocast(self.device, self.dtype):
            rows, maps = explained_predictions(
                bundle, method, batch.images, names, layer, top=section.top, labels=self._known_labels(batch, names)
            )
        out = self.run_dir / "predictions"
        for row, overlay in zip(rows, prediction_overlays(rows, maps, pictures, out)):
            row["overlay"] = overlay
        summary = prediction_summary(rows)
        classes = len(bundle.class_names) if bundle.class_names else None
        write_json_atomic(
            out / "predictions.json",
            {"method": method.name, "layer": layer, "classes": classes, **summary, "rows": rows},
        )
        labelled = summary["labelled"]
        top5 = f", top-5 {summary['top5_hits']}/{labelled}" if classes is None or classes > 5 else ""
        hits = f"; top-1 {summary['top1_hits']}/{labelled}{top5}" if labelled else ""
        self.echo(f"  {summary['images']} images classified, {method.name} of the predicted class at {layer}{hits}")
        return {}

    def _sanity_check(self) -> dict[str, Any]:
        from convlens.attribution.sanity_checks import cascade_figures, cascade_record, cascading_randomisation
        from convlens.runtime.run_records import write_json_atomic

        section = self.recipe.sanity
        bundle, _ = self.bundle()
        layer = section.layer or bundle.default_layer
        batch, names, pictures = self._first_images(section.max_images)
        methods = [self._attribution(section.method)]
        if section.baseline.lower() != "none":
            methods.append(self._attribution(section.baseline))
        out = self.run_dir / "sanity"
        out.mkdir(parents=True, exist_ok=True)
        results = cascading_randomisation(
            bundle, methods, batch.images, layer, depth=section.depth, seed=self.recipe.seed, progress=self.progress
        )
        record = cascade_record(results, cascade_figures(results, pictures, out))
        write_json_atomic(out / "sanity_check.json", {"layer": layer, "images": names, **record})
        finals = ", ".join(
            f"{m} {v:.2f}" if v is not None else f"{m} n/a" for m, v in record["fully_randomised"].items()
        )
        self.echo(f"  Spearman with the original maps once every block is randomised: {finals}")
        return {}

    def _attribution_bench(self) -> dict[str, Any]:
        from convlens.attribution.bench import (
            BenchSettings,
            run_attribution_bench,
            train_on_shuffled_labels,
            write_bench,
        )
        from convlens.report.attribution_bench_page import write_attribution_bench_page

        section = self.recipe.attribution_bench
        bundle, record = self.bundle()
        out = self.run_dir / BENCH_FOLDER
        twin = None
        if section.shuffled_labels and self.recipe.training is not None:
            self.echo("  training the model again on shuffled labels (data randomisation)")
            shuffled = out / "shuffled-labels"
            twin = train_on_shuffled_labels(
                self.run_dir / "model", shuffled, seed=self.recipe.seed, device=self.device, progress=self.progress
            )
        settings = BenchSettings(
            layer=section.layer or None,
            max_images=section.max_images,
            batch_size=section.batch_size,
            methods=section.names("methods"),
            metrics=section.names("metrics"),
            seed=self.recipe.seed,
        )
        summary = run_attribution_bench(
            bundle, self.data_dir, settings, shuffled_model=twin, model_name=record["name"], device=self.device
        )
        write_attribution_bench_page(write_bench(summary, out), out)
        applied = sum(metric["applies"] for metric in summary["metrics"])
        self.echo(f"  scored {len(summary['methods'])} attribution methods on {applied} metrics: {out}/index.html")
        return {}

    def _train_sae(self, entry: Any) -> dict[str, Any]:
        from convlens.activations.store import ActivationStore
        from convlens.core.params import coerce
        from convlens.sae.training import SAETrainingParams, build_sae, train_sae

        training = coerce(SAETrainingParams, {"seed": self.recipe.seed, **entry.training}, owner="[[sae]] train")
        store = ActivationStore(self.store_dir(entry.store))
        sae, record = build_sae(entry.component.name, entry.component.params, store.dim, training.seed)
        out = self.sae_path(entry.component.label).parent
        resume = resumable(out)
        summary = train_sae(
            sae, record, store, out, training, device=self.device, resume=resume, progress=self.progress
        )
        val = summary["final"].get("val") or {}
        if val:
            self.echo(
                f"  variance explained {100 * val['fve']:.1f} %, L0 {val['l0']:.1f}, dead latents "
                f"{100 * val['dead_fraction']:.1f} %"
            )
        return {}

    def _train_filter_sae(self, label: str) -> dict[str, Any]:
        from convlens.activations.store import ActivationStore
        from convlens.core.params import coerce
        from convlens.sae.training import SAETrainingParams, build_sae, train_sae

        section = self.recipe.filter_saes
        assert section is not None
        owner = "[filter_saes] sae train"
        training = coerce(SAETrainingParams, {"seed": self.recipe.seed, **section.training}, owner=owner)
        store = ActivationStore(self.store_dir(label))
        validation = ActivationStore(self.store_dir(section.section.validate_on))
        sae, record = build_sae(section.sae.name, section.sae.params, store.dim, training.seed)
        out = self.run_dir / FILTER_SAES / slug(label)
        resume = resumable(out)
        summary = train_sae(
            sae,
            record,
            store,
            out,
            training,
            val_store=validation,
            device=self.device,
            resume=resume,
            progress=self.progress,
        )
        final = summary["final"]
        self.echo(
            f"  MSE {final['train']['mse']:.4g} on its own store, {final['val']['mse']:.4g} on the "
            f"{section.section.validate_on} store's validation split"
        )
        return {}

    def _compare_filter_saes(self) -> dict[str, Any]:
        from convlens.sae.filter_stores import compare_filter_saes

        section = self.recipe.filter_saes
        assert section is not None
        folder = self.run_dir / FILTER_SAES
        settings = section.section
        result = compare_filter_saes(
            {label: folder / slug(label) for label in section.filters},
            settings.baseline,
            settings.validate_on,
            settings.sigma,
            folder,
        )
        finals = ", ".join(f"{row['filter']} {row['final_val_mse']:.4g}" for row in result["filters"])
        verdict = "holds" if result["claim"]["holds"] else "does not hold"
        self.echo(f"  validation MSE on the {settings.validate_on} store: {finals}; the paper's claim {verdict}")
        return {}

    def _sweep(self) -> dict[str, Any]:
        from convlens.activations.store import ActivationStore
        from convlens.core.params import coerce
        from convlens.sae.sweep import run_sweep
        from convlens.sae.training import SAETrainingParams, build_sae

        sweep = self.recipe.sweep
        training = coerce(SAETrainingParams, {"seed": self.recipe.seed, **sweep["training"]}, owner="[sweep] train")
        store = ActivationStore(self.store_dir(sweep["store"]))
        result = run_sweep(
            sweep["configs"],
            lambda config: build_sae(config["sae"], config.get("params", {}), store.dim, training.seed),
            store,
            self.run_dir / "sweep",
            training,
            device=self.device,
            progress=self.progress,
        )
        failed = [row["label"] for row in result["configs"] if row["failed"]]
        return {"warnings": [f"sweep: {', '.join(failed)} failed"] if failed else []}

    def _evaluate(self, entry: Any) -> dict[str, Any]:
        from convlens.sae.base import load_sae
        from convlens.sae.evaluation import evaluate_splice

        bundle, record = self.bundle()
        section = self.recipe.evaluate
        path = self.sae_path(entry.component.label)
        sae = load_sae(path, input_dim=self.recipe.channels, device=self.device).eval()
        result = evaluate_splice(
            bundle,
            sae,
            self.recipe.layer,
            self.index(),
            batch_size=section.batch_size,
            max_images=section.max_images,
            ablate=section.ablate,
            ablation_images=section.ablation_images,
            seed=self.recipe.seed,
            device=self.device,
            workers=self.workers,
            progress=self.progress,
        )
        out = self.run_dir / "evaluation" / f"{slug(entry.component.label)}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        classes = len(self.index().class_names or ())
        write_json_atomic(
            out, {"model": record, "sae": str(path.relative_to(self.run_dir)), "classes": classes or None, **result}
        )
        top1 = result["top1"]
        if top1["model"] is not None:
            self.echo(f"  top-1 {100 * top1['model']:.1f} % alone, {100 * top1['sae']:.1f} % with the SAE spliced in")
        return {}

    def _statistics(self) -> dict[str, Any]:
        from convlens.sae.base import load_sae
        from convlens.units.statistics import unit_statistics

        bundle, _ = self.bundle()
        section = self.recipe.statistics
        saes = {
            e.component.label: load_sae(
                self.sae_path(e.component.label), input_dim=self.recipe.channels, device=self.device
            ).eval()
            for e in self.recipe.saes
        }
        result = unit_statistics(
            bundle,
            self.recipe.layer,
            self.index(),
            self.run_dir / "statistics",
            saes=saes,
            concepts=self.concepts(),
            max_images=section.max_images,
            batch_size=section.batch_size,
            seed=self.recipe.seed,
            device=self.device,
            progress=self.progress,
            selective_auroc=section.selective_auroc,
            dtype=self.dtype,
            workers=self.workers,
        )
        warnings = []
        for group, values in result["groups"].items():
            summary = values["summary"]
            self.echo(
                f"  {group}: {summary['units']} units, {summary['dead']} dead, {summary['selective']} selective "
                "for one concept"
            )
            if summary["dead"] > summary["units"] / 2:
                warnings.append(f"{group}: {summary['dead']} of {summary['units']} units never fired")
        return {"warnings": warnings}

    def chosen_units(self, group: str, choice: UnitChoice) -> dict[int, list[str]]:
        """The units of ``group`` to picture and why (:func:`convlens.units.selection.choose_units`)."""
        statistics = json.loads((self.run_dir / "statistics" / "statistics.json").read_text())
        return choose_units(statistics["groups"][group]["units"], choice)

    def top_images(self, group: str, unit: int, count: int) -> list[Path]:
        """The images where ``unit`` of ``group`` is strongest (per-image maxima of the statistics step)."""
        from safetensors.torch import load_file

        tensors = load_file(str(self.run_dir / "statistics" / "maxima.safetensors"))
        maxima, positions = tensors[f"maxima.{group}"][:, unit], tensors["positions"]
        order = maxima.argsort(descending=True, stable=True)[:count]
        index = self.index()
        return [index.paths[int(positions[i])] for i in order]

    def _visualize(self, group: str, visualizer: Any, entry: Any, choice: UnitChoice) -> dict[str, Any]:
        from convlens.core.component_registry import default_registry
        from convlens.core.contracts import VisualTarget
        from convlens.core.params import parameter_specs

        bundle, _ = self.bundle()
        reasons = self.chosen_units(group, choice)
        units = list(reasons)
        out = self.run_dir / self.visual_dir(group, visualizer.label)
        out.mkdir(parents=True, exist_ok=True)
        registry = default_registry()
        params = dict(visualizer.params)
        fields = {spec.name for spec in parameter_specs(registry.get("visualizer", visualizer.name).spec.params)}
        if "seed" in fields and "seed" not in params:
            params["seed"] = self.recipe.seed
        instance = registry.create("visualizer", visualizer.name, **params)
        earlier = self._outputs_read_by(instance, group, fields, params)
        if earlier:
            instance = registry.create("visualizer", visualizer.name, **params, **earlier)
        instance.progress = self.progress
        sae = None
        if entry is not None:
            from convlens.sae.base import load_sae

            sae = load_sae(self.sae_path(group), input_dim=self.recipe.channels, device=self.device).eval()
        if instance.explains_units_on_images:
            record = self._attribute_units(instance, bundle, units, sae, group, out)
        else:
            data = str(self.data_dir) if instance.needs_data else None
            record = instance.run(VisualTarget(bundle, self.recipe.layer, tuple(units), sae, data, self.dtype), out)
        record = {
            **record,
            "pipeline_units": units,
            "pipeline_reasons": {str(u): r for u, r in reasons.items()},
            "pipeline_command": None
            if instance.explains_units_on_images
            else self.visualize_command(group, visualizer, {**params, **earlier}, instance.needs_data),
        }
        write_json_atomic(out / "record.json", record)
        return {}

    def visualize_command(self, group: str, visualizer: Any, params: dict[str, Any], needs_data: bool) -> list[str]:
        """The ``convlens visualize`` words that render one more unit of ``group`` as this run's step did, with
        ``{unit}`` standing for the unit (a unit page fills it in)."""
        from convlens.core.component_registry import default_registry
        from convlens.core.params import command_line_options, parameter_specs
        from convlens.models.loading import resolve_model_argument

        registry = default_registry()
        run_dir = self.run_dir.resolve()
        if self.recipe.training is not None:
            model = ["--model", str(run_dir / "model")]
        else:
            name, _ = resolve_model_argument(self.recipe.model, trust_code=True)
            spec = registry.get("model", name).spec.params
            every = {s.name.replace("_", "-") for s in parameter_specs(spec)}
            options = command_line_options(spec, self.recipe.model_params, reserved=every, prefix="model")
            model = ["--model", self.recipe.model, *options]
        component = registry.get("visualizer", visualizer.name)
        short = component.spec.name
        name = (
            short if registry.get("visualizer", short).qualified_name == component.qualified_name else visualizer.name
        )
        words = [
            "convlens",
            "visualize",
            name or visualizer.name,
            *model,
            "--layer",
            self.recipe.layer,
            "--units",
            "{unit}",
        ]
        if group != "cnn":
            words += ["--sae", str(self.sae_path(group).resolve())]
        if needs_data:
            words += ["--data", str(self.data_dir.resolve())]
        if self.dtype != "float32":
            words += ["--dtype", self.dtype]
        out = run_dir / "extra" / slug(group) / slug(visualizer.label) / "unit-{unit}"
        words += ["--out", str(out)]
        options = command_line_options(component.spec.params, params, reserved=VISUALIZE_COMMAND_OPTIONS, prefix="viz")
        return words + options

    def _outputs_read_by(self, instance: Any, group: str, fields: set[str], params: dict[str, Any]) -> dict[str, str]:
        """The parameters ``instance`` fills with other visualizers' output folders of this run (those that ran)."""
        filled = {}
        for field, other in instance.reads_outputs_of.items():
            folder = self.run_dir / self.visual_dir(group, other)
            if field in fields and field not in params and (folder / "record.json").is_file():
                filled[field] = str(folder)
        return filled

    def _attribute_units(
        self, visualizer: Any, bundle: Any, units: list[int], sae: Any, group: str, out: Path
    ) -> dict[str, Any]:
        """Each unit explained on its own top images, one sub-folder per unit, the records merged."""
        from convlens.core.contracts import VisualTarget

        figures, runs = [], {}
        summary = None
        for unit in units:
            folder = f"unit-{unit:04d}"
            images = self.top_images(group, unit, self.recipe.visualize.examples)
            target = VisualTarget(bundle, self.recipe.layer, (unit,), sae, images, self.dtype)
            record = visualizer.run(target, out / folder)
            figures += [{**figure, "path": f"{folder}/{figure['path']}"} for figure in record.get("figures", [])]
            runs[str(unit)] = folder
            summary = record.get("summary")
        return {
            "visualizer": visualizer.name,
            "layer": self.recipe.layer,
            "target": "units",
            "runs": runs,
            "figures": figures,
            "summary": f"{len(units)} units on their top {self.recipe.visualize.examples} "
            f"images" + (f"; last: {summary}" if summary else ""),
        }

    def _report(self) -> None:
        from convlens.report.site import build_report

        started = time.perf_counter()
        build_report(self.run_dir)
        self.echo(f"[report] written in {time.perf_counter() - started:.1f} s")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def check_run_folder(run_dir: Path) -> None:
    """A run folder must be new, empty, or an earlier run of a recipe (it holds ``pipeline.json``)."""
    if holds_files(run_dir) and not (run_dir / PIPELINE_FILE).is_file():
        raise ConvlensError(f"{run_dir} holds other files and no {PIPELINE_FILE}; choose a new or empty --out")
