"""Feature-visualisation speed: a rendering step against a bare forward+backward, and convlens against lucent.

resnet18 (torchvision architecture, random init: no download), layer ``layer4``, float32, measured in one run:

- step vs floor: the marginal cost of one step of convlens's ``improved`` preset (pixels + colour decorrelation,
  random affine + flip, total variation, blur after the step) rendering ``--batch`` channels at 224 px, taken as
  ``(time of 2S steps - time of S steps) / S`` so the set-up and the final evaluation do not count, against a bare
  forward of the same batch up to ``layer4`` plus a backward of its sum with weight gradients on (the input takes
  no gradient). Target: <= 1.0x: the frozen weights must pay for the parameterisation, transforms and
  regularisers. The same with a full forward (through the classifier) as the floor is printed too.
- vs lucent (torch-lucent, installed by the ``bench`` extra; it pins kornia 0.4.1, which is why it is nowhere in
  convlens's own dependencies): per channel, convlens's ``fourier`` preset (Fourier basis, colour decorrelation,
  random transforms) rendering ``--channels`` channels of ``layer4`` in one batch, against lucent's ``render_vis``
  with its defaults (Fourier image with decorrelated colours, its standard transforms, Adam) one channel at a time,
  both for ``--steps`` steps. At 224 px (target: convlens >= 1.5x cheaper per channel) and at 128 px, where lucent
  upsamples the image to 224 before the model and convlens does not (target: >= 2.5x). On a GPU (``--device cuda``)
  the target is >= 5x at 32 channels (``--channels 32``).

With ``--dtype bfloat16`` (float16: CUDA only) the renders and the floors run under the same autocast, and on
CUDA the model is in channels-last memory format, as ``convlens visualize --dtype`` runs it. The GPU target of
the step is the same <= 1.0x with ``--device cuda --dtype bfloat16`` (measured on an H200 before this was
tuned: 1.41x). For information, the step is also put against a forward plus a backward to the input with the
weights frozen (the model's share of a step).

Every figure is the best of ``--repeats`` rounds. Exit status 1 if a target is missed.

    python benchmarks/feature_viz.py [--threads 2] [--batch 8] [--channels 8] [--steps 8] [--device cpu]
                                     [--dtype float32] [--no-lucent]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import convlens
from convlens.plugins.visualizers.feature_viz import PRESETS
from convlens.plugins.visualizers.feature_viz.objectives import parse_objective
from convlens.plugins.visualizers.feature_viz.render import RenderSettings, render

LAYER = "layer4"


def best_of(repeats: int, run) -> float:
    timings = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        run()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - started)
    return min(timings)


def convlens_render(bundle, channels, preset: str, size: int, steps: int, device, dtype: str) -> None:
    settings = RenderSettings(**{**PRESETS[preset], "steps": steps}, size=(size, size), batch_size=len(channels))
    render(
        bundle.module,
        LAYER,
        [parse_objective(f"channel:{c}") for c in channels],
        settings,
        mean=bundle.mean,
        std=bundle.std,
        device=device,
        progress=False,
        dtype=dtype,
    )


def floor_step(module, batch: torch.Tensor, full: bool, dtype: str) -> None:
    """A bare forward of the batch (to layer4, or through the classifier) and a backward with weight gradients."""
    captured = []
    handle = module.layer4.register_forward_hook(lambda _m, _i, output: captured.append(output))
    try:
        with convlens.autocast(batch.device, dtype):
            output = module(batch)
    finally:
        handle.remove()
    (output if full else captured[0]).float().sum().backward()
    module.zero_grad(set_to_none=True)


def input_gradient_step(module, batch: torch.Tensor, dtype: str) -> None:
    """A forward to layer4 and a backward of its sum to the input, the weights frozen: the model's share of a step."""
    pixels = batch.detach().requires_grad_(True)
    captured = []
    handle = module.layer4.register_forward_hook(lambda _m, _i, output: captured.append(output))
    weights = list(module.parameters())
    try:
        for weight in weights:
            weight.requires_grad_(False)
        with convlens.autocast(batch.device, dtype):
            module(pixels)
        torch.autograd.grad(captured[0].float().sum(), [pixels])
    finally:
        handle.remove()
        for weight in weights:
            weight.requires_grad_(True)


def lucent_render(module, channel: int, size: int, steps: int) -> None:
    from lucent.optvis import param
    from lucent.optvis import render as lucent

    lucent.render_vis(
        module,
        f"{LAYER}:{channel}",
        param_f=lambda: param.image(size),
        thresholds=(steps,),
        show_image=False,
        progress=False,
        verbose=False,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="channels per batch for the step-vs-floor ratio")
    parser.add_argument("--channels", type=int, default=8, help="channels rendered for the lucent comparison")
    parser.add_argument("--steps", type=int, default=8, help="steps per render in the lucent comparison")
    parser.add_argument("--step-steps", type=int, default=10, help="S of the marginal step cost (2S - S steps)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=convlens.COMPUTE_DTYPES)
    parser.add_argument("--no-lucent", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = args.dtype
    bundle = convlens.registry.create("model", "torchvision", arch="resnet18", weights="none")
    module = convlens.channels_last(bundle.module.to(device).eval(), device)
    figures: dict[str, float] = {}
    ratios: dict[str, float] = {}

    channels = list(range(args.batch))
    steps = args.step_steps
    convlens_render(bundle, channels, "improved", 224, 2, device, dtype)  # warm-up
    short = best_of(args.repeats, lambda: convlens_render(bundle, channels, "improved", 224, steps, device, dtype))
    long = best_of(args.repeats, lambda: convlens_render(bundle, channels, "improved", 224, 2 * steps, device, dtype))
    figures["improved step, s"] = (long - short) / steps
    batch = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(device)
    for full in (False, True):
        floor_step(module, batch, full, dtype)  # warm-up
        figures[f"floor fwd+bwd to {'logits' if full else LAYER}, s"] = best_of(
            args.repeats * 3, lambda full=full: floor_step(module, batch, full, dtype)
        )
    input_gradient_step(module, batch, dtype)  # warm-up
    figures["fwd to layer4 + bwd to the input, frozen weights, s"] = best_of(
        args.repeats * 3, lambda: input_gradient_step(module, batch, dtype)
    )
    ratios["step_vs_floor"] = figures["improved step, s"] / figures[f"floor fwd+bwd to {LAYER}, s"]
    ratios["step_vs_full_floor"] = figures["improved step, s"] / figures["floor fwd+bwd to logits, s"]
    ratios["step_vs_input_gradient"] = (
        figures["improved step, s"] / figures["fwd to layer4 + bwd to the input, frozen weights, s"]
    )

    lucent_error = None
    if not args.no_lucent:
        try:
            import lucent  # noqa: F401
        except ImportError as exc:
            lucent_error = f"lucent not installed ({exc}); pip install -e '.[bench]'"
    if args.no_lucent or lucent_error:
        lucent_error = lucent_error or "--no-lucent"
    else:
        channels = list(range(args.channels))
        for size in (224, 128):
            ours = best_of(
                args.repeats,
                lambda size=size: convlens_render(bundle, channels, "fourier", size, args.steps, device, dtype),
            ) / len(channels)
            theirs = best_of(
                args.repeats, lambda size=size: [lucent_render(module, c, size, args.steps) for c in channels]
            ) / len(channels)
            figures[f"convlens fourier per channel at {size} px, s"] = ours
            figures[f"lucent per channel at {size} px, s"] = theirs
            ratios[f"lucent_vs_convlens_{size}px"] = theirs / ours

    targets = {"step_vs_floor": ("<=", 1.0)}
    if device.type == "cuda":
        targets["lucent_vs_convlens_224px"] = (">=", 5.0)
    else:
        targets.update({"lucent_vs_convlens_224px": (">=", 1.5), "lucent_vs_convlens_128px": (">=", 2.5)})
    print(
        json.dumps(
            {
                "model": "resnet18 (random init)",
                "layer": LAYER,
                "device": str(device),
                "dtype": dtype,
                "threads": args.threads,
                "batch": args.batch,
                "channels": args.channels,
                "steps": args.steps,
                "torch": torch.__version__,
                "lucent": lucent_error or "measured",
                "figures": {k: round(v, 4) for k, v in figures.items()},
                "ratios": {k: round(v, 3) for k, v in ratios.items()},
            },
            indent=1,
        )
    )
    missed = []
    for name, (relation, target) in targets.items():
        if name not in ratios:
            continue
        value = ratios[name]
        ok = value <= target if relation == "<=" else value >= target
        print(f"{name}: {value:.2f} (target {relation} {target}){'' if ok else '  MISSED'}")
        missed += [] if ok else [name]
    if lucent_error:
        print(f"lucent comparison not measured: {lucent_error}")
    if missed:
        sys.exit(1)


if __name__ == "__main__":
    main()
