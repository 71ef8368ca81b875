"""What the attribution methods cost against the passes they cannot avoid (issue 26), all measured in one run.

torchvision's resnet18 (random init, eval mode) on a batch of random images, each timing the best of ``--repeats``
interleaved rounds, so a busy moment does not decide:

- every CAM built on gradients (Grad-CAM, HiResCAM, LayerCAM, XGradCAM, and Grad-CAM++ when its example plugin is
  installed) at ``layer4`` against a bare no-grad forward of the same batch: target <= 1.2 x;
- Integrated Gradients with 32 steps against 32 forward+backward passes (frozen weights, gradient to the input)
  of the same batch: target <= 1.1 x;
- ScoreCAM at ``layer4`` (512 channels) on ``--scorecam-images`` images against the ``N x 512 / 64`` no-grad
  forwards of 64 images its masked copies need: target <= 1.1 x;
- and, for the record, every other method against the bare forward.

    python benchmarks/attribution_cost.py [--batch 8] [--size 160] [--repeats 3] [--threads 2] [--device cpu]
                                          [--dtype float32] [--scorecam-images 2]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

import convlens
from convlens import ExplainTarget

GRADIENT_CAMS = ("gradcam", "hirescam", "layercam", "xgradcam", "gradcam++")
OTHERS = ("saliency", "input-x-gradient", "guided-backprop", "guided-gradcam", "eigencam", "smoothgrad", "occlusion")
PERTURBATION_BATCH = 64
IG_STEPS = 32


def best_times(cases: dict[str, Callable[[], None]], repeats: int, device: torch.device, dtype: str) -> dict:
    """The fastest of ``repeats`` interleaved runs of each case, after one warm-up run each."""

    def timed(run: Callable[[], None]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        with convlens.autocast(device, dtype):
            run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    for run in cases.values():
        timed(run)
    best = {name: float("inf") for name in cases}
    for _ in range(repeats):
        for name, run in cases.items():
            best[name] = min(best[name], timed(run))
    return best


def forward_backward(module: torch.nn.Module, images: torch.Tensor) -> None:
    """One forward and one backward pass to the input, the weights frozen (what a gradient method needs)."""
    leaf = images.detach().requires_grad_(True)
    logits = module(leaf)
    torch.autograd.grad(logits.gather(1, logits.argmax(1, keepdim=True)).sum(), leaf)


def report(title: str, best: dict[str, float], floor: str, target: float | None = None, checked=()) -> None:
    print(f"\n{title}")
    print(f"{'case':<44} {'ms':>9} {'x floor':>8}")
    for name, seconds in best.items():
        print(f"{name:<44} {1000 * seconds:>9.1f} {seconds / best[floor]:>8.2f}")
    for name in checked:
        ratio = best[name] / best[floor]
        print(f"{name} / floor: {ratio:.2f} (target <= {target}: {'met' if ratio <= target else 'NOT met'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=convlens.COMPUTE_DTYPES)
    parser.add_argument("--scorecam-images", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    bundle = convlens.registry.create("model", "torchvision", arch="resnet18")
    module = convlens.channels_last(bundle.module.to(device).eval(), device)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=generator).to(device)
    with torch.no_grad():
        classes = module(images).argmax(1)
    target = ExplainTarget(classes=classes)
    installed = {c.name for c in convlens.registry.list("visualizer")}
    print(f"resnet18, batch {args.batch} at {args.size} px, {args.device}, {args.dtype}, {args.threads} threads")

    def method(name: str, **params) -> Callable[[], None]:
        visualizer = convlens.registry.create("visualizer", name, **params)
        return lambda: visualizer.explain(bundle, images, "layer4", target)

    def floor() -> None:
        with torch.no_grad():
            module(images)

    cams = {"bare no-grad forward (floor)": floor}
    cams |= {name: method(name) for name in GRADIENT_CAMS if name in installed}
    best = best_times(cams, args.repeats, device, args.dtype)
    report(
        "CAMs built on gradients, layer4",
        best,
        "bare no-grad forward (floor)",
        1.2,
        [n for n in cams if n in GRADIENT_CAMS],
    )

    # path points per pass: the floor's batch, so both run the same passes
    ig = convlens.registry.create("visualizer", "integrated-gradients", steps=IG_STEPS, internal_batch_size=args.batch)
    path = {
        f"{IG_STEPS} forward+backward passes (floor)": lambda: [
            forward_backward(module, images) for _ in range(IG_STEPS)
        ],
        f"integrated-gradients, {IG_STEPS} steps": lambda: ig.explain(bundle, images, "layer4", target),
    }
    floor_name = f"{IG_STEPS} forward+backward passes (floor)"
    report("Integrated Gradients", best_times(path, args.repeats, device, args.dtype), floor_name, 1.1,
           [f"integrated-gradients, {IG_STEPS} steps"])  # fmt: skip

    few = images[: args.scorecam_images]
    few_target = ExplainTarget(classes=classes[: args.scorecam_images])
    scorecam = convlens.registry.create("visualizer", "scorecam", perturbation_batch=PERTURBATION_BATCH)
    copies = len(few) * 512
    chunk = images[:1].expand(PERTURBATION_BATCH, -1, -1, -1).contiguous()

    def masked_forwards() -> None:
        with torch.no_grad():
            for first in range(0, copies, PERTURBATION_BATCH):
                module(chunk[: min(PERTURBATION_BATCH, copies - first)])

    floor_name = f"{copies // PERTURBATION_BATCH} no-grad forwards of {PERTURBATION_BATCH} (floor)"
    score = {floor_name: masked_forwards, "scorecam": lambda: scorecam.explain(bundle, few, "layer4", few_target)}
    report(f"ScoreCAM, layer4 (512 channels), {len(few)} images", best_times(score, args.repeats, device, args.dtype),
           floor_name, 1.1, ["scorecam"])  # fmt: skip

    rest = {"bare no-grad forward (floor)": floor} | {name: method(name) for name in OTHERS}
    report(
        "The other methods (for the record)", best_times(rest, 1, device, args.dtype), "bare no-grad forward (floor)"
    )


if __name__ == "__main__":
    main()
