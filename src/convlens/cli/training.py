"""``convlens train-model MODEL --data DIR --out RUN``: fine-tune a model plugin on an image folder."""

from __future__ import annotations

from typing import Any

import click

from convlens.core.component_registry import default_registry
from convlens.core.params import click_parameters, coerce, values_from_click
from convlens.models.fine_tuning import TrainingParams
from convlens.runtime.locks import output_lock

from .base import ComponentGroup
from .output import echo_json
from .run_folders import default_run_folder

TRAIN_PREFIX = "train__"


def _train(
    component: Any,
    params: dict[str, Any],
    data: str,
    val: str | None,
    out: str | None,
    device: str | None,
    resume: bool,
    as_json: bool,
    **options: Any,
) -> None:
    from convlens.models.fine_tuning import prepare_data, train_model
    from convlens.runtime.device import resolve_device

    training = coerce(TrainingParams, values_from_click(options, TRAIN_PREFIX), owner="train-model")
    field_names = {spec["name"] for spec in default_registry().describe("model", component.qualified_name)["params"]}
    prepared = prepare_data(data, training, val)
    if "num_classes" in field_names and "num_classes" not in params:
        params["num_classes"] = len(prepared.class_names)
    if "seed" in field_names and "seed" not in params:
        params["seed"] = training.seed
    bundle = default_registry().create("model", component.qualified_name, **params)
    out = out or default_run_folder(f"train-{component.name}")
    click.get_current_context().with_resource(output_lock(out, command="train-model"))
    try:
        summary = train_model(
            bundle,
            prepared,
            out,
            training,
            device=resolve_device(device),
            resume=resume,
            model={"name": component.qualified_name, "params": params},
        )
    except KeyboardInterrupt:
        click.echo(
            f"\ninterrupted; finished epochs are saved in {out}; continue with the same command and --resume", err=True
        )
        raise SystemExit(130) from None
    if as_json:
        echo_json(summary)
        return
    final, classes = summary["final"], summary["classes"]
    top5 = f", top-5 {100 * final['val_top5']:.1f} %" if classes > 5 else ""  # with 5 classes or fewer it is 100 %
    click.echo(
        f"trained {component.name} for {summary['epochs']} epochs on {summary['train_images']} images "
        f"({summary['val_images']} validation, {classes} classes) in {summary['seconds']:.0f} s: "
        f"validation top-1 {100 * final['val_top1']:.1f} %{top5} "
        f"(best top-1 {100 * summary['best_val_top1']:.1f} % at epoch {summary['best_epoch']}); "
        f"wrote {out}/model.safetensors, metrics.jsonl, curves.png, error-analysis.json"
    )
    if summary["skipped_summary"]:
        click.echo(summary["skipped_summary"])
    from convlens.workflow.checks import near_chance
    from convlens.workflow.recipes import WarningsSection

    if near_chance(final["val_top1"], classes, WarningsSection().chance_margin, summary["val_images"]):
        click.echo(
            f"warning: validation top-1 {100 * final['val_top1']:.1f} % is close to chance ({100 / classes:.1f} % "
            f"with {classes} classes): the model has not learnt the task",
            err=True,
        )


train_model_command = ComponentGroup(
    "train-model",
    kind="model",
    run=_train,
    shared_params=[
        click.Option(
            ["--data"],
            required=True,
            type=click.Path(exists=True, file_okay=False),
            help="ImageFolder tree (class sub-folders), a folder with train/ and val/, or a shapes dataset.",
        ),
        click.Option(
            ["--val"],
            default=None,
            type=click.Path(exists=True, file_okay=False),
            help="Separate validation ImageFolder (default: a seeded split of --data).",
        ),
        click.Option(
            ["--out", "-o"],
            default=None,
            type=click.Path(file_okay=False),
            help="Run folder (default: runs/train-MODEL).",
        ),
        click.Option(["--device"], default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)."),
        click.Option(["--resume"], is_flag=True, help="Continue an interrupted run in --out."),
        click.Option(["--json", "as_json"], is_flag=True, help="Output the summary as JSON."),
        *click_parameters(TrainingParams, dest_prefix=TRAIN_PREFIX),
    ],
    help="Fine-tune a model on an image folder (paper sec. 6.2-6.3): augmentation on the training split, "
    "cosine learning rate, per-epoch metrics, checkpoints and error analysis.\n\n"
    "`convlens train-model MODEL --help` lists the training options and that model's own options "
    "(options of the model that clash with training options get a --model- prefix).",
)
