"""Spliced evaluation of an SAE inside its model (the check paper 001 sec. 8.6 names as missing).

The model runs three ways on the same images: alone; with the layer's output replaced by the SAE's
reconstruction; with the layer's output zeroed (the floor). Reported: top-1 of each, the KL divergence
KL(model || spliced) of the class distributions, and the share of the zero-ablation KL the SAE recovers.
Latent ablation splices the SAE with one latent set to zero and reports the mean change of every class logit
against the plain splice, over the images on which that latent fires.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from convlens.core.errors import ConvlensError
from convlens.data.images import ImageIndex, Preprocessing, SkipLog
from convlens.data.loading import ImageDataset, decode_on_device, image_batches
from convlens.models.layers import first_tensor, resolve_layer
from convlens.runtime.seeding import torch_generator

if TYPE_CHECKING:
    from convlens.core.contracts import ModelBundle
    from convlens.sae.base import SparseAutoencoder


@contextlib.contextmanager
def replaced_output(
    module: torch.nn.Module, layer: str, replace: Callable[[torch.Tensor], torch.Tensor], model_name: str = "model"
) -> Iterator[None]:
    """Inside the block, ``layer``'s output is ``replace(output)``; the hook is removed on exit."""
    target = resolve_layer(module, layer, model_name)

    def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> torch.Tensor:
        tensor = first_tensor(output)
        if not isinstance(output, torch.Tensor) or tensor is None:
            raise ConvlensError(f"layer '{layer}' of {model_name} does not return a single tensor to replace")
        return replace(tensor)

    handle = target.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def kl_divergence(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per image, KL(softmax(reference) || softmax(logits)) in nats (float64)."""
    reference, other = reference_logits.double().log_softmax(dim=1), logits.double().log_softmax(dim=1)
    return (reference.exp() * (reference - other)).sum(dim=1)


def evaluate_splice(
    bundle: ModelBundle,
    sae: SparseAutoencoder,
    layer: str,
    index: ImageIndex,
    *,
    batch_size: int = 64,
    max_images: int | None = None,
    ablate: Sequence[int] | int = 0,
    ablation_images: int = 512,
    seed: int = 0,
    device: torch.device | None = None,
    workers: int = 0,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Top-1 and KL of the model alone, with the SAE spliced in at ``layer`` and with the layer zeroed; and the
    class-logit effect of zeroing latents (``ablate``: latent ids, or how many of the most active to take) on
    the first ``ablation_images`` images."""
    from tqdm.auto import tqdm

    device = device or torch.device("cpu")
    module = bundle.module.to(device).eval()
    sae = sae.to(device).eval()
    chosen = list(range(len(index)))
    if max_images is not None and max_images < len(index):
        picked = torch.randperm(len(index), generator=torch_generator(seed, "evaluate-sae"))[:max_images]
        chosen = sorted(picked.tolist())
    dataset = ImageDataset(index, Preprocessing.of(bundle), jpeg_bytes=decode_on_device("auto", device))
    skip_log = SkipLog(index.root)
    captured: dict[str, torch.Tensor] = {}

    def through_sae(output: torch.Tensor) -> torch.Tensor:
        if output.ndim < 2 or output.shape[1] != sae.input_dim:
            raise ConvlensError(
                f"the SAE takes {sae.input_dim}-dimensional inputs, but layer '{layer}' gives "
                f"{output.shape[1] if output.ndim > 1 else output.shape} channels"
            )
        captured["layer"] = output
        latents = sae.encode(output)
        captured["latents"] = latents
        return sae.decode(latents)

    totals = {
        "images": 0,
        "labelled": 0,
        "correct_model": 0,
        "correct_sae": 0,
        "correct_zero": 0,
        "agree_sae": 0,
        "kl_sae": 0.0,
        "kl_zero": 0.0,
        "squared_error": 0.0,
        "variance_sum": None,
        "square_sum": None,
        "positions": 0,
        "l0": 0.0,
    }
    batches: list[tuple[torch.Tensor, torch.Tensor]] = []
    started = time.perf_counter()
    bar = tqdm(
        total=len(chosen),
        desc=f"evaluate SAE at {layer}",
        unit="img",
        leave=False,
        disable=None if progress is None else not progress,
    )
    with torch.no_grad():
        for batch in image_batches(
            dataset, batch_size=batch_size, skip_log=skip_log, order=chosen, workers=workers, device=device
        ):
            images, labels = batch.images.to(device), batch.labels.to(device)
            logits = first_tensor(module(images))
            with replaced_output(module, layer, through_sae):
                spliced = first_tensor(module(images))
            with replaced_output(module, layer, torch.zeros_like):
                zeroed = first_tensor(module(images))
            activations, latents = captured["layer"], captured["latents"]
            reconstruction = sae.decode(latents)
            rows = activations.movedim(1, -1).reshape(-1, sae.input_dim).double()
            totals["squared_error"] += float((reconstruction.double() - activations.double()).pow(2).sum())
            totals["variance_sum"] = (
                rows.sum(0) if totals["variance_sum"] is None else totals["variance_sum"] + rows.sum(0)
            )
            totals["square_sum"] = (
                rows.pow(2).sum(0) if totals["square_sum"] is None else totals["square_sum"] + rows.pow(2).sum(0)
            )
            totals["positions"] += rows.shape[0]
            totals["l0"] += float((latents != 0).sum())
            known = labels >= 0
            totals["images"] += len(images)
            totals["labelled"] += int(known.sum())
            for name, output in (("model", logits), ("sae", spliced), ("zero", zeroed)):
                totals[f"correct_{name}"] += int((output.argmax(1) == labels)[known].sum())
            totals["agree_sae"] += int((spliced.argmax(1) == logits.argmax(1)).sum())
            totals["kl_sae"] += float(kl_divergence(logits, spliced).sum())
            totals["kl_zero"] += float(kl_divergence(logits, zeroed).sum())
            if ablate and sum(len(kept) for _, kept in batches) < ablation_images:
                batches.append((batch.positions, images.cpu()))
            bar.update(len(batch) + len(batch.skipped))
    bar.close()
    if not totals["images"]:
        raise ConvlensError(f"no readable images among the {len(chosen)} chosen under {index.root}")
    n, labelled = totals["images"], totals["labelled"]
    variance = float((totals["square_sum"] - totals["variance_sum"].pow(2) / totals["positions"]).sum())
    top1 = {name: totals[f"correct_{name}"] / labelled if labelled else None for name in ("model", "sae", "zero")}
    kl_sae, kl_zero = totals["kl_sae"] / n, totals["kl_zero"] / n
    result = {
        "layer": layer,
        "images": n,
        "labelled_images": labelled,
        "top1": top1,
        "top1_drop": top1["model"] - top1["sae"] if labelled else None,
        "prediction_agreement": totals["agree_sae"] / n,
        "kl_sae": kl_sae,
        "kl_zero_ablation": kl_zero,
        "kl_recovered": 1 - kl_sae / kl_zero if kl_zero > 0 else None,
        "layer_fve": 1 - totals["squared_error"] / variance if variance > 0 else None,
        "layer_l0": totals["l0"] / totals["positions"],
        "skipped": skip_log.as_json(),
    }
    if ablate:
        result["ablation"] = ablate_latents(module, sae, layer, batches, ablate, bundle.class_names)
        result["ablation_images"] = sum(len(kept) for _, kept in batches)
    result["seconds"] = round(time.perf_counter() - started, 3)
    return result


def ablate_latents(
    module: torch.nn.Module,
    sae: SparseAutoencoder,
    layer: str,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    ablate: Sequence[int] | int,
    class_names: Sequence[str] | None,
) -> list[dict[str, Any]]:
    """Per latent: mean change of each class logit when it is zeroed in the splice, over images where it fires."""
    device = next(iter(sae.buffers())).device
    activity = torch.zeros(sae.latent_dim, dtype=torch.float64)
    with torch.no_grad():
        for _, images in batches:
            with replaced_output(module, layer, lambda output: _record(output, sae, activity)):
                module(images.to(device))
    if isinstance(ablate, int):
        latents = activity.argsort(descending=True)[:ablate].tolist()
    else:
        latents = list(ablate)
        bad = [latent for latent in latents if not 0 <= latent < sae.latent_dim]
        if bad:
            raise ConvlensError(f"latent(s) {bad} out of range for an SAE with {sae.latent_dim} latents")
    report = []
    with torch.no_grad():
        for latent in latents:
            change, images_on = None, 0
            for _, images in batches:
                images = images.to(device)
                fires: dict[str, torch.Tensor] = {}
                with replaced_output(module, layer, lambda output: _splice(output, sae, None, fires)):
                    spliced = first_tensor(module(images))
                with replaced_output(module, layer, lambda output, latent=latent: _splice(output, sae, latent, fires)):
                    ablated = first_tensor(module(images))
                on = fires["active"]
                images_on += int(on.sum())
                delta = (ablated - spliced)[on].double().sum(0)
                change = delta if change is None else change + delta
            mean_change = (change / images_on).tolist() if images_on else None
            entry = {
                "latent": int(latent),
                "images_active": images_on,
                "mean_activation": float(activity[latent]) / max(sum(len(i) for _, i in batches), 1),
                "logit_change": mean_change,
            }
            if mean_change is not None:
                order = sorted(range(len(mean_change)), key=lambda c: mean_change[c])
                name = (lambda c: class_names[c]) if class_names else str
                entry["most_lowered"] = [{"class": name(c), "change": mean_change[c]} for c in order[:3]]
            report.append(entry)
    return report


def _record(output: torch.Tensor, sae: SparseAutoencoder, activity: torch.Tensor) -> torch.Tensor:
    latents = sae.encode(output)
    activity += latents.movedim(1, -1).reshape(-1, sae.latent_dim).double().sum(0).cpu()
    return sae.decode(latents)


def _splice(
    output: torch.Tensor, sae: SparseAutoencoder, latent: int | None, fires: dict[str, torch.Tensor]
) -> torch.Tensor:
    latents = sae.encode(output)
    if latent is None:
        return sae.decode(latents)
    fires["active"] = (latents[:, latent] != 0).reshape(len(latents), -1).any(dim=1)
    ablated = latents.clone()
    ablated[:, latent] = 0
    return sae.decode(ablated)
