"""Grad-CAM cost against a bare no-grad forward of the same batch, and against pytorch-grad-cam (issue 7).

torchvision's resnet18 (random init, eval mode), a batch of 16 images of 224 px, Grad-CAM at ``layer4`` for the
predicted classes. Three timings, interleaved and repeated, best of each kept so a busy moment does not decide:

- floor: ``module(images)`` under ``torch.no_grad()``;
- convlens: the ``gradcam`` visualizer's ``explain`` (forward with frozen weights, backward from the logits to
  ``layer4`` only);
- pytorch-grad-cam: ``GradCAM(model, [layer4])(images)`` (its backward reaches the weights and the input).

With ``--dtype bfloat16`` (or float16, CUDA only) the floor and convlens run under the same autocast
(pytorch-grad-cam cannot: it stays float32), and on CUDA the model is in channels-last memory format, as
``convlens visualize --dtype`` runs it.

Targets: convlens <= 1.15 x the floor, and >= 2.5 x faster than pytorch-grad-cam; on a GPU the same 1.15 x with
``--device cuda --dtype bfloat16 --batch 64`` (measured on an H200 before this was tuned: 1.45 x).

    python benchmarks/gradcam.py [--batch 16] [--size 224] [--repeats 5] [--threads 2] [--device cpu]
                                 [--dtype float32]
"""

from __future__ import annotations

import argparse
import time

import torch

import convlens
from convlens.attribution.base import ExplainTarget


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=convlens.COMPUTE_DTYPES)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from pytorch_grad_cam import GradCAM

    device = torch.device(args.device)
    bundle = convlens.registry.create("model", "torchvision", arch="resnet18")
    module = convlens.channels_last(bundle.module.to(device).eval(), device)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)).to(device)
    gradcam = convlens.registry.create("visualizer", "gradcam")

    def synchronise() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def floor() -> None:
        with torch.no_grad():
            module(images)

    def ours() -> None:
        gradcam.explain(bundle, images, "layer4", ExplainTarget())

    def peer() -> None:
        with GradCAM(model=module, target_layers=[module.layer4]) as cam:
            cam(input_tensor=images, targets=None)
        module.zero_grad(set_to_none=True)

    cases = {  # name: (run, compute precision)
        "bare no-grad forward (floor)": (floor, args.dtype),
        "convlens gradcam": (ours, args.dtype),
        "pytorch-grad-cam GradCAM": (peer, "float32"),
    }
    for run, dtype in cases.values():  # warm-up
        with convlens.autocast(device, dtype):
            run()
    best = {name: float("inf") for name in cases}
    for _ in range(args.repeats):
        for name, (run, dtype) in cases.items():
            synchronise()
            started = time.perf_counter()
            with convlens.autocast(device, dtype):
                run()
            synchronise()
            best[name] = min(best[name], time.perf_counter() - started)
    floor_seconds = best["bare no-grad forward (floor)"]
    print(
        f"resnet18 layer4, batch {args.batch} at {args.size} px, {args.device}, {args.dtype}, {args.threads} threads, "
        f"best of {args.repeats}"
    )
    print(f"{'case':<30} {'ms/batch':>9} {'x floor':>8}")
    for name, seconds in best.items():
        print(f"{name:<30} {1000 * seconds:>9.1f} {seconds / floor_seconds:>8.2f}")
    ratio = best["convlens gradcam"] / floor_seconds
    speedup = best["pytorch-grad-cam GradCAM"] / best["convlens gradcam"]
    print(f"convlens gradcam / floor: {ratio:.2f} (target <= 1.15: {'met' if ratio <= 1.15 else 'NOT met'})")
    verdict = "met" if speedup >= 2.5 else "NOT met"
    print(f"pytorch-grad-cam / convlens gradcam: {speedup:.2f}x (target >= 2.5: {verdict})")


if __name__ == "__main__":
    main()
