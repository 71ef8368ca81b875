"""Fine-tuning a model on an image folder (001 sec. 6.2-6.3): augmentation, cosine schedule, resumable runs.

A run folder holds::

    config.json                     model, data, training parameters, versions
    metrics.jsonl                   one line per epoch: loss, top-1 and top-5 on train and validation, lr, time
    curves.png                      loss and accuracy per epoch
    error-analysis.json / .png      per-class accuracy, best and worst classes, most-confused pairs (Figure 6)
    checkpoints/epoch-NNN.safetensors   the model's weights after each of the last ``keep_checkpoints`` epochs
                                        (loadable with weights=PATH)
    checkpoints/train-state.safetensors optimizer state and history of the last finished epoch
    model.safetensors               the final weights, with class names in the metadata

Every random choice comes from a generator seeded by (seed, purpose, epoch, image): the shuffle of each epoch
and each image's augmentation do not depend on batch size, worker count or an interruption, so ``resume``
after epoch k continues to the same weights as a run that was never stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from convlens.core.errors import ConvlensError
from convlens.core.params import Params, param
from convlens.data.images import (
    ImageIndex,
    Preprocessing,
    SkipLog,
    require_readable,
    scan_images,
    shown,
)
from convlens.data.loading import ImageDataset, image_batches
from convlens.runtime.run_records import (
    load_optimizer_state,
    save_optimizer_state,
    versions,
    write_json_atomic,
    write_lines_atomic,
)
from convlens.runtime.seeding import derive_seed, torch_generator

if TYPE_CHECKING:
    import torch

    from convlens.core.contracts import ModelBundle

STATE_FILE = "train-state.safetensors"
RESUMABLE_CHANGES = ("keep_checkpoints",)  # training settings that may differ when a run is resumed


@dataclass(frozen=True)
class TrainingParams(Params):
    epochs: int = param(15, help="passes over the training split", min=1)
    batch_size: int = param(64, help="images per optimisation step", min=1)
    optimizer: Literal["adamw", "adam", "sgd"] = param("adamw", help="optimizer")
    lr: float = param(
        3e-3, help="initial learning rate, annealed to 0 on a cosine (the paper: 4e-5 fine-tuning)", min=0.0
    )
    weight_decay: float = param(0.05, help="weight decay", min=0.0)
    momentum: float = param(0.9, help="momentum (sgd only)", min=0.0, max=1.0)
    label_smoothing: float = param(0.0, help="label smoothing of the cross-entropy", min=0.0, max=1.0)
    val_fraction: float = param(
        0.1, help="share of each class held out for validation (without --val)", min=0.0, max=0.9
    )
    augment: bool = param(True, help="random resized crop, flip, colour jitter and random erasing (train only)")
    crop_scale: float = param(0.5, help="smallest area fraction kept by the random resized crop", min=0.05, max=1.0)
    flip: float = param(0.5, help="horizontal flip probability", min=0.0, max=1.0)
    jitter: float = param(0.2, help="brightness, contrast and saturation jitter strength", min=0.0, max=1.0)
    hue: float = param(
        0.0, help="hue jitter, a fraction of the colour circle (about 0.4 ms per image)", min=0.0, max=0.5
    )
    erase: float = param(0.1, help="random erasing probability", min=0.0, max=1.0)
    workers: int = param(0, help="data-loading worker processes (0: load in the main process)", min=0)
    seed: int = param(0, help="seed for the split, the shuffles and the augmentation")
    keep_checkpoints: int | None = param(
        1,
        min=1,
        help="epoch checkpoints kept in checkpoints/, the last ones (none: every epoch); resuming needs only the last",
    )


class TrainAugmentation:
    """The training transform; image ``position`` in epoch ``epoch`` always gets the same random draw."""

    def __init__(self, preprocessing: Preprocessing, params: TrainingParams):
        self.preprocessing = preprocessing
        self.params = params
        self.epoch = 0

    def __call__(self, image: Any, position: int) -> torch.Tensor:
        import torch
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as F

        p = self.params
        generator = torch_generator(p.seed, "augment", self.epoch, position)

        def uniform(low: float, high: float) -> float:
            return low + (high - low) * float(torch.rand((), generator=generator))

        top, left, height, width = _resized_crop_box(image.height, image.width, p.crop_scale, uniform)
        image = F.resized_crop(
            image,
            top,
            left,
            height,
            width,
            list(self.preprocessing.input_size),
            interpolation=InterpolationMode.BILINEAR,
            antialias=True,
        )
        if uniform(0, 1) < p.flip:
            image = F.hflip(image)
        if p.jitter > 0:
            image = F.adjust_brightness(image, uniform(1 - p.jitter, 1 + p.jitter))
            image = F.adjust_contrast(image, uniform(1 - p.jitter, 1 + p.jitter))
            image = F.adjust_saturation(image, uniform(1 - p.jitter, 1 + p.jitter))
        if p.hue > 0:
            image = F.adjust_hue(image, uniform(-p.hue, p.hue))
        tensor = self.preprocessing.normalize(F.pil_to_tensor(image))
        if uniform(0, 1) < p.erase:
            _erase(tensor, uniform, generator)
        return tensor


def _resized_crop_box(height: int, width: int, min_scale: float, uniform: Callable[[float, float], float]):
    """A box of area fraction in [min_scale, 1] and aspect ratio in [3/4, 4/3] (log-uniform), as torchvision."""
    area = height * width
    for _ in range(10):
        target = area * uniform(min_scale, 1.0)
        ratio = math.exp(uniform(math.log(3 / 4), math.log(4 / 3)))
        box_w = round(math.sqrt(target * ratio))
        box_h = round(math.sqrt(target / ratio))
        if 0 < box_w <= width and 0 < box_h <= height:
            top = int(uniform(0, height - box_h + 1 - 1e-9))
            left = int(uniform(0, width - box_w + 1 - 1e-9))
            return top, left, box_h, box_w
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


def _erase(tensor: torch.Tensor, uniform: Callable[[float, float], float], generator: torch.Generator) -> None:
    """Random erasing (Zhong et al. 2020): a box of 2-33 % of the area filled with normal noise, in place."""
    import torch

    _, height, width = tensor.shape
    for _ in range(10):
        target = height * width * uniform(0.02, 0.33)
        ratio = math.exp(uniform(math.log(0.3), math.log(3.3)))
        box_h = round(math.sqrt(target * ratio))
        box_w = round(math.sqrt(target / ratio))
        if 0 < box_h < height and 0 < box_w < width:
            top = int(uniform(0, height - box_h + 1 - 1e-9))
            left = int(uniform(0, width - box_w + 1 - 1e-9))
            tensor[:, top : top + box_h, left : left + box_w] = torch.randn(
                (tensor.shape[0], box_h, box_w), generator=generator, dtype=tensor.dtype
            )
            return


def split_index(index: ImageIndex, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Per-class seeded split of positions into (train, validation); every class with 2+ images gets 1+ val."""
    import torch

    if index.labels is None:
        raise ConvlensError(f"{index.root} is a flat folder; training needs one sub-folder per class")
    by_class: dict[int, list[int]] = {}
    for position, label in enumerate(index.labels):
        by_class.setdefault(label, []).append(position)
    train, val = [], []
    for label, positions in sorted(by_class.items()):
        order = torch.randperm(len(positions), generator=torch_generator(seed, "split", label)).tolist()
        count = round(len(positions) * val_fraction)
        if val_fraction > 0 and len(positions) > 1:
            count = min(max(count, 1), len(positions) - 1)
        val += [positions[i] for i in order[:count]]
        train += [positions[i] for i in order[count:]]
    return sorted(train), sorted(val)


def cosine_lr(base_lr: float, step: int, total_steps: int) -> float:
    """Cosine annealing from ``base_lr`` to 0 over ``total_steps`` (Loshchilov & Hutter 2017), per step."""
    return 0.5 * base_lr * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))


def _make_optimizer(module: torch.nn.Module, params: TrainingParams) -> torch.optim.Optimizer:
    import torch

    trainable = [p for p in module.parameters() if p.requires_grad]
    if params.optimizer == "sgd":
        return torch.optim.SGD(trainable, lr=params.lr, momentum=params.momentum, weight_decay=params.weight_decay)
    if params.optimizer == "adam":
        return torch.optim.Adam(trainable, lr=params.lr, weight_decay=params.weight_decay)
    return torch.optim.AdamW(trainable, lr=params.lr, weight_decay=params.weight_decay)


@dataclass
class _Tally:
    """Running sums for loss and top-k accuracy, plus the confusion matrix on validation."""

    classes: int
    loss: float = 0.0
    count: int = 0
    top1: int = 0
    top5: int = 0
    confusion: Any = None

    def add(self, logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor, confusion: bool = False) -> None:
        import torch

        k = min(5, logits.shape[1])
        ranked = logits.topk(k, dim=1).indices
        hits = ranked == labels[:, None]
        self.loss += float(loss) * len(labels)
        self.count += len(labels)
        self.top1 += int(hits[:, 0].sum())
        self.top5 += int(hits.any(dim=1).sum())
        if confusion:
            if self.confusion is None:
                self.confusion = torch.zeros(self.classes, self.classes, dtype=torch.long)
            flat = labels.cpu() * self.classes + ranked[:, 0].cpu()
            self.confusion += torch.bincount(flat, minlength=self.classes**2).view(self.classes, self.classes)

    def metrics(self, prefix: str) -> dict[str, float]:
        if not self.count:
            return {f"{prefix}_loss": float("nan"), f"{prefix}_top1": float("nan"), f"{prefix}_top5": float("nan")}
        return {
            f"{prefix}_loss": self.loss / self.count,
            f"{prefix}_top1": self.top1 / self.count,
            f"{prefix}_top5": self.top5 / self.count,
        }


def error_analysis(confusion: torch.Tensor, class_names: tuple[str, ...], top: int = 10) -> dict[str, Any]:
    """Per-class accuracy, the best and worst classes and the most-confused pairs (after Wu et al. 2017)."""
    matrix = confusion.tolist()
    rows = [sum(row) for row in matrix]
    classes = [
        {
            "name": name,
            "images": rows[i],
            "correct": matrix[i][i],
            "accuracy": matrix[i][i] / rows[i] if rows[i] else None,
        }
        for i, name in enumerate(class_names)
    ]
    scored = [c for c in classes if c["accuracy"] is not None]
    best = sorted(scored, key=lambda c: (-c["accuracy"], c["name"]))[:top]
    worst = sorted(scored, key=lambda c: (c["accuracy"], c["name"]))[:top]
    pairs = [
        {
            "true": class_names[true],
            "predicted": class_names[predicted],
            "count": count,
            "share_of_true": count / rows[true],
        }
        for true, row in enumerate(matrix)
        for predicted, count in enumerate(row)
        if count and true != predicted
    ]
    pairs.sort(key=lambda p: (-p["count"], p["true"], p["predicted"]))
    return {
        "classes": classes,
        "best": best,
        "worst": worst,
        "confused_pairs": pairs[:top],
        "confusion_matrix": matrix,
        "class_names": list(class_names),
    }


def _draw_curves(history: list[dict[str, Any]], path: Path, classes: int) -> None:
    """Loss and accuracy per epoch; top-5 only for more than 5 classes (with 5 or fewer it is 100 %)."""
    from convlens.drawing.plots import LinePanel, save_chart

    epochs = [row["epoch"] for row in history]
    loss = LinePanel(
        series={
            "train": (epochs, [r["train_loss"] for r in history]),
            "validation": (epochs, [r["val_loss"] for r in history]),
        },
        title="Cross-entropy loss",
        xlabel="epoch",
        ylabel="loss",
        integer_x=True,
        key="loss",
    )
    accuracy = LinePanel(
        series={
            name: (epochs, [100 * r[key] for r in history])
            for name, key in (
                ("train top-1", "train_top1"),
                ("validation top-1", "val_top1"),
                ("train top-5", "train_top5"),
                ("validation top-5", "val_top5"),
            )
            if classes > 5 or "top-1" in name
        },
        title="Accuracy",
        xlabel="epoch",
        ylabel="accuracy (%)",
        integer_x=True,
        key="accuracy",
    )
    save_chart([loss, accuracy], path)


def _draw_error_analysis(analysis: dict[str, Any], path: Path) -> None:
    from convlens.drawing.charts import PALETTE
    from convlens.drawing.plots import BarPanel, save_chart

    best = BarPanel(
        labels=[c["name"] for c in analysis["best"]],
        values=[100 * c["accuracy"] for c in analysis["best"]],
        title="Classes with the least error",
        xlabel="validation accuracy (%)",
        maximum=100,
        colour=PALETTE[2],
        key="best",
    )
    worst = BarPanel(
        labels=[c["name"] for c in analysis["worst"]],
        values=[100 * c["accuracy"] for c in analysis["worst"]],
        title="Classes with the most error",
        xlabel="validation accuracy (%)",
        maximum=100,
        colour=PALETTE[3],
        key="worst",
    )
    pairs = analysis["confused_pairs"]
    confused = BarPanel(
        labels=[f"{p['true']} -> {p['predicted']}" for p in pairs] or ["(no errors)"],
        values=[p["count"] for p in pairs] or [0],
        title="Most-confused pairs",
        xlabel="validation images",
        colour=PALETTE[1],
        key="confused",
    )
    save_chart([best, worst, confused], path)


@dataclass
class TrainingData:
    index: ImageIndex
    train: list[int]
    val: list[int]
    val_index: ImageIndex | None = None

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.index.class_names or ()


def prepare_data(data: str | Path, params: TrainingParams, val_data: str | Path | None = None) -> TrainingData:
    """The training and validation images: ``val_data``, ``data/train`` + ``data/val``, or a seeded split."""
    root = Path(data)
    if val_data is None and (root / "train").is_dir() and (root / "val").is_dir():
        root, val_data = root / "train", root / "val"
    index = scan_images(root)
    if index.labels is None:
        raise ConvlensError(f"{index.root} is a flat folder; training needs one sub-folder per class")
    if val_data is None:
        train, val = split_index(index, params.val_fraction, params.seed)
        return TrainingData(index, train, val)
    val_index = scan_images(val_data)
    if val_index.class_names != index.class_names:
        raise ConvlensError(
            f"the validation classes of {val_data} differ from the training classes of {data} "
            f"({_class_difference(index.class_names or (), val_index.class_names or ())})"
        )
    return TrainingData(index, list(range(len(index))), list(range(len(val_index))), val_index)


def _class_difference(train: tuple[str, ...], val: tuple[str, ...]) -> str:
    only_train = ", ".join(shown(name) for name in train if name not in val) or "none"
    only_val = ", ".join(shown(name) for name in val if name not in train) or "none"
    return f"only in training: {only_train}; only in validation: {only_val}"


def train_model(
    bundle: ModelBundle,
    data: TrainingData,
    out: str | Path,
    params: TrainingParams,
    *,
    model: dict[str, Any],
    device: Any = None,
    resume: bool = False,
    progress: bool | None = None,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train ``bundle.module`` in place and write the run folder ``out``; returns the run summary.

    ``model`` describes how the bundle was built (``{"name": ..., "params": {...}}``) for ``config.json``.
    ``on_epoch_end`` is called with each epoch's metrics after its checkpoint is written; an exception it
    raises stops the run there, and ``resume=True`` continues it later.
    """
    import torch
    from tqdm.auto import tqdm

    from convlens.models.checkpoints import load_weights, save_weights
    from convlens.runtime.device import resolve_device

    out = Path(out)
    device = resolve_device(device) if not isinstance(device, torch.device) else device
    module = bundle.module
    class_names = data.class_names
    require_readable(data.index.subset(data.train), f"the training split of {shown(data.index.root)}")
    preprocessing = Preprocessing.of(bundle)
    _check_output_size(module, preprocessing, len(class_names))
    config = {
        "command": "train-model",
        "model": model,
        "data": {
            "root": str(data.index.root),
            "classes": list(class_names),
            "train_images": len(data.train),
            "val_images": len(data.val),
            "fingerprint": data.index.fingerprint(),
            "val_root": str(data.val_index.root) if data.val_index else None,
        },
        "training": params.to_dict(),
        "preprocessing": dataclasses.asdict(preprocessing),
    }
    checkpoints = out / "checkpoints"
    state_path = checkpoints / STATE_FILE
    history: list[dict[str, Any]] = []
    optimizer = _make_optimizer(module, params)
    if resume:
        history = _resume(out, config, module, optimizer, device)
    elif state_path.exists() or (out / "metrics.jsonl").exists():
        raise ConvlensError(f"{out} already holds a training run; pass --resume to continue it or choose another --out")
    checkpoints.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "config.json", {**config, "versions": versions(), "device": str(device)})

    module.to(device)
    _optimizer_to(optimizer, device)
    train_set = ImageDataset(
        data.index.subset(data.train),
        TrainAugmentation(preprocessing, params) if params.augment else preprocessing,
    )
    val_index = data.val_index or data.index.subset(data.val)
    val_set = ImageDataset(val_index, preprocessing)
    skip_log = SkipLog()
    drop_last = len(train_set) > params.batch_size
    steps_per_epoch = len(train_set) // params.batch_size if drop_last else 1
    total_steps = steps_per_epoch * params.epochs
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=params.label_smoothing)
    started = time.perf_counter()
    analysis = None
    for epoch in range(len(history), params.epochs):
        epoch_started = time.perf_counter()
        torch.manual_seed(derive_seed(params.seed, "epoch", epoch))  # for any randomness inside the model
        if isinstance(train_set.transform, TrainAugmentation):
            train_set.transform.epoch = epoch
        order = torch.randperm(len(train_set), generator=torch_generator(params.seed, "order", epoch)).tolist()
        module.train()
        train_tally = _Tally(len(class_names))
        bar = tqdm(
            total=len(train_set),
            desc=f"epoch {epoch + 1}/{params.epochs}",
            unit="img",
            leave=False,
            disable=None if progress is None else not progress,
        )
        for step, batch in enumerate(
            image_batches(
                train_set,
                batch_size=params.batch_size,
                skip_log=skip_log,
                order=order,
                workers=params.workers,
                drop_last=drop_last,
            )
        ):
            lr = cosine_lr(params.lr, epoch * steps_per_epoch + step, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images, labels = batch.images.to(device), batch.labels.to(device)
            logits = module(images)
            loss = criterion(logits, labels)
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise ConvlensError(
                    f"the training loss became {loss_value} in epoch {epoch + 1}, step {step + 1}; lower --lr. "
                    f"Checkpoints of finished epochs are kept in {checkpoints}"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            train_tally.add(logits.detach(), labels, loss.detach())
            bar.update(len(batch) + len(batch.skipped))
            bar.set_postfix(loss=f"{loss_value:.3f}")
        bar.close()
        val_tally = evaluate(module, val_set, params, device, skip_log, criterion)
        row = {
            "epoch": epoch + 1,
            "lr": cosine_lr(params.lr, (epoch + 1) * steps_per_epoch, total_steps),
            **train_tally.metrics("train"),
            **val_tally.metrics("val"),
            "seconds": round(time.perf_counter() - epoch_started, 3),
        }
        history.append(row)
        weights_meta = {
            "model": json.dumps(model),
            "class_names": json.dumps(list(class_names)),
            "epoch": str(epoch + 1),
        }
        save_weights(module, checkpoints / f"epoch-{epoch + 1:03d}.safetensors", weights_meta)
        save_optimizer_state(state_path, optimizer, {"epoch": epoch + 1, "history": history, "config": config})
        _remove_old_checkpoints(checkpoints, epoch + 1, params.keep_checkpoints)
        write_lines_atomic(out / "metrics.jsonl", history)
        _draw_curves(history, out / "curves.png", len(class_names))
        if val_tally.confusion is not None:
            analysis = {"epoch": epoch + 1, **error_analysis(val_tally.confusion, class_names)}
        if on_epoch_end is not None:
            on_epoch_end(row)
    if analysis is None:  # resumed after the last epoch had already finished
        load_weights(module, checkpoints / f"epoch-{params.epochs:03d}.safetensors")
        module.to(device)
        val_tally = evaluate(module, val_set, params, device, skip_log, criterion)
        if val_tally.confusion is not None:
            analysis = {"epoch": params.epochs, **error_analysis(val_tally.confusion, class_names)}
    if analysis is not None:
        write_json_atomic(out / "error-analysis.json", analysis)
        _draw_error_analysis(analysis, out / "error-analysis.png")
    save_weights(
        module,
        out / "model.safetensors",
        {"model": json.dumps(model), "class_names": json.dumps(list(class_names)), "epoch": str(params.epochs)},
    )
    module.eval()
    final = history[-1]
    best = max(history, key=lambda r: r["val_top1"] if math.isfinite(r["val_top1"]) else -1)
    summary = {
        "out": str(out),
        "epochs": params.epochs,
        "train_images": len(data.train),
        "val_images": len(data.val),
        "classes": len(class_names),
        "final": final,
        "best_epoch": best["epoch"],
        "best_val_top1": best["val_top1"],
        "seconds": round(time.perf_counter() - started, 2),
        "skipped": skip_log.as_json(),
        "skipped_summary": skip_log.summary(),
    }
    write_json_atomic(out / "summary.json", summary)
    return summary


def evaluate(
    module: torch.nn.Module,
    dataset: ImageDataset,
    params: TrainingParams,
    device: Any,
    skip_log: SkipLog,
    criterion: Any,
) -> _Tally:
    """Loss, top-1/top-5 and the confusion matrix of ``module`` on ``dataset`` (eval mode, no gradients)."""
    import torch

    module.eval()
    classes = len(dataset.index.class_names or ())
    tally = _Tally(classes)
    with torch.inference_mode():
        for batch in image_batches(
            dataset, batch_size=max(params.batch_size, 128), skip_log=skip_log, workers=params.workers
        ):
            images, labels = batch.images.to(device), batch.labels.to(device)
            logits = module(images)
            tally.add(logits, labels, criterion(logits, labels), confusion=True)
    return tally


def _check_output_size(module: torch.nn.Module, preprocessing: Preprocessing, classes: int) -> None:
    import torch

    if classes < 2:
        raise ConvlensError(f"training needs at least 2 classes, found {classes}")
    was_training = module.training
    module.eval()
    with torch.no_grad():
        parameter = next(module.parameters(), None)
        probe = torch.zeros(1, 3, *preprocessing.input_size, device=parameter.device if parameter is not None else None)
        outputs = module(probe).shape[-1]
    module.train(was_training)
    if outputs != classes:
        raise ConvlensError(
            f"the model has {outputs} outputs but the data has {classes} classes; pass --num-classes {classes}"
        )


def _resume(
    out: Path, config: dict[str, Any], module: torch.nn.Module, optimizer: torch.optim.Optimizer, device: Any
) -> list[dict[str, Any]]:
    from convlens.models.checkpoints import load_weights

    state_path = out / "checkpoints" / STATE_FILE
    if not state_path.exists():
        raise ConvlensError(f"nothing to resume in {out}: {state_path} does not exist")
    optimizer_state, metadata = load_optimizer_state(state_path)
    saved = metadata["config"]
    changes = []
    for section in ("model", "data", "training", "preprocessing"):
        before, now = saved.get(section), json.loads(json.dumps(config[section]))
        if section == "data":
            before, now = _with_resolved_roots(before), _with_resolved_roots(now)
        if section == "training":
            before, now = _without_bookkeeping(before), _without_bookkeeping(now)
        if before != now:
            if isinstance(before, dict) and isinstance(now, dict):
                changes += [
                    f"{section}.{key}: {before.get(key)!r} saved, {now.get(key)!r} now"
                    for key in sorted(set(before) | set(now))
                    if before.get(key) != now.get(key)
                ]
            else:
                changes.append(f"{section} differs")
    if changes:
        raise ConvlensError(
            f"cannot resume {out}: the settings differ from the saved run ({'; '.join(changes)}); to train with "
            f"these settings, write to a new --out (the finished epochs in {out} are kept)"
        )
    epoch = int(metadata["epoch"])
    load_weights(module, out / "checkpoints" / f"epoch-{epoch:03d}.safetensors")
    optimizer.load_state_dict(optimizer_state)
    return list(metadata["history"])[:epoch]


def _remove_old_checkpoints(checkpoints: Path, epoch: int, keep: int | None) -> None:
    """Delete the epoch checkpoints before the last ``keep`` up to ``epoch`` (None: keep every one)."""
    if keep is None:
        return
    for path in checkpoints.glob("epoch-*.safetensors"):
        number = path.name[len("epoch-") : -len(".safetensors")]
        if number.isdigit() and int(number) <= epoch - keep:
            path.unlink(missing_ok=True)


def _without_bookkeeping(training: Any) -> Any:
    """The training section without the settings that do not change the weights, so that they may differ on
    resume (and runs from before they existed resume)."""
    if not isinstance(training, dict):
        return training
    return {key: value for key, value in training.items() if key not in RESUMABLE_CHANGES}


def _with_resolved_roots(data: Any) -> Any:
    """The data section with its folders resolved, so that the same folder spelled differently compares equal."""
    if not isinstance(data, dict):
        return data
    return {
        key: str(Path(value).resolve()) if key in ("root", "val_root") and isinstance(value, str) else value
        for key, value in data.items()
    }


def _optimizer_to(optimizer: torch.optim.Optimizer, device: Any) -> None:
    import torch

    for values in optimizer.state.values():
        for key, value in values.items():
            if isinstance(value, torch.Tensor) and key != "step":
                values[key] = value.to(device)
