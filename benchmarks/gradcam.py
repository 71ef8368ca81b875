"""Grad-CAM cost against a bare no-grad forward of the same batch, and against pytorch-grad-cam (issue 7).

torchvision's resnet18 (random init, eval mode), a batch of 16 images of 224 px, Grad-CAM at ``layer4`` for the
predicted classes. Three timings, interleaved and repeated, best of each kept so a busy moment does not decide:

- floor: ``module(images)`` under ``torch.no_grad()``;
- convlens: the ``gradcam`` visualizer's ``explain`` (forward with frozen weights, backward from the logits to
  ``layer4`` only);
- pytorch-grad-cam: ``GradCAM(model, [layer4])(images)`` (its backward reaches the weights and the input).

Targets: convlens <= 1.15 x the floor, and >= 2.5 x faster than pytorch-grad-cam.

    python benchmarks/gradcam.py [--batch 16] [--size 224] [--repeats 5] [--threads 2] [--device cpu]
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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from pytorch_grad_cam import GradCAM

    device = torch.device(args.device)
    bundle = convlens.registry.create("model", "torchvision", arch="resnet18")
    module = bundle.module.to(device).eval()
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

    cases = {"bare no-grad forward (floor)": floor, "convlens gradcam": ours, "pytorch-grad-cam GradCAM": peer}
    for run in cases.values():  # warm-up
        run()
    best = {name: float("inf") for name in cases}
    for _ in range(args.repeats):
        for name, run in cases.items():
            synchronise()
            started = time.perf_counter()
            run()
            synchronise()
            best[name] = min(best[name], time.perf_counter() - started)
    floor_seconds = best["bare no-grad forward (floor)"]
    print(
        f"resnet18 layer4, batch {args.batch} at {args.size} px, {args.device}, {args.threads} threads, "
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
