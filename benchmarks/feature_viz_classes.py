"""Feature visualisation of class logits on a real network: do the images show the model its target class?

efficientnet-lite0 (ImageNet-1k weights, the ``real`` extra), ``--classes`` classes drawn with ``--seed``. Each
class logit is rendered with the ``fourier`` preset at 224 px, all classes as one batch, then the plain rendered
image (no random transforms; the model's own normalisation) is classified by the model in eval mode. Per class it
prints the target, the top-1 class and the target's probability; then the hits (top-1 = target) out of the classes
and the wall time. Target: at least 8 of 10 hits. Exit status 1 if it is missed.

    python benchmarks/feature_viz_classes.py [--seed 0] [--classes 10] [--device cpu] [--threads 2]
                                            [--preset fourier] [--steps N] [--size 224]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

import torch

import convlens
from convlens.plugins.visualizers.feature_viz.api import PRESETS, RenderSettings, render, unit_objectives


def pick_classes(count: int, total: int, seed: int) -> list[int]:
    return sorted(random.Random(seed).sample(range(total), count))


def render_classes(bundle, classes: list[int], args, device) -> list[torch.Tensor]:
    preset = dict(PRESETS[args.preset])
    if args.steps:
        preset["steps"] = args.steps
    settings = RenderSettings(**preset, size=(args.size, args.size), batch_size=len(classes), seed=args.seed)
    rendered = render(
        bundle.module,
        bundle.default_layer,
        unit_objectives("class", tuple(classes), None, with_sae=False),
        settings,
        mean=bundle.mean,
        std=bundle.std,
        device=device,
        progress=False,
    )
    return [r.image for r in rendered]


@torch.no_grad()
def classify(bundle, images: list[torch.Tensor], device) -> torch.Tensor:
    """Class probabilities ``[N, classes]`` of the images ``[3, H, W]`` in [0, 1], rounded to 8 bits as saved."""
    batch = torch.stack(images).clamp(0, 1).mul(255).round().div(255).to(device)
    mean = torch.tensor(bundle.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(bundle.std, device=device).view(1, 3, 1, 1)
    return bundle.module.eval()((batch - mean) / std).softmax(dim=1).cpu()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="draws the classes and seeds the renders")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--target", type=int, default=8, help="hits needed (top-1 = target class)")
    parser.add_argument("--preset", default="fourier", choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, default=None, help="default: the preset's")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    bundle = convlens.registry.create("model", "efficientnet-lite0")
    bundle.module.to(device).eval()
    names = bundle.class_names
    classes = pick_classes(args.classes, len(names), args.seed)

    started = time.perf_counter()
    images = render_classes(bundle, classes, args, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    probabilities = classify(bundle, images, device)

    hits = 0
    for number, target in enumerate(classes):
        top = int(probabilities[number].argmax())
        hits += top == target
        print(
            f"{'hit ' if top == target else 'miss'}  target {target:4d} {names[target]!r:32} top-1 {top:4d} "
            f"{names[top]!r:32} p(target) {float(probabilities[number, target]):.3f}"
        )
    summary = {
        "model": "efficientnet-lite0 (ImageNet-1k)",
        "preset": args.preset,
        "steps": args.steps or PRESETS[args.preset]["steps"],
        "size": args.size,
        "seed": args.seed,
        "device": str(device),
        "threads": args.threads,
        "torch": torch.__version__,
        "classes": " ".join(map(str, classes)),
        "hits": hits,
        "render_s": round(seconds, 1),
    }
    print(json.dumps(summary, indent=1))
    ok = hits >= args.target
    print(f"hits: {hits}/{len(classes)} (target >= {args.target}) in {seconds:.1f} s{'' if ok else '  MISSED'}")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
