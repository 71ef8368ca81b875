"""Feature visualisation on a real network: does each render reach its start, and the channel's best photo?

efficientnet-lite0 (ImageNet-1k weights, the ``real`` extra). For each of ``--layers``, ``--channels`` channels are
drawn with ``--seed``; each channel's best photo is the largest per-image mean activation over the images of
``--data`` (e.g. the folder ``convlens data photos DIR`` writes), computed by ``unit_statistics`` with the model's
own preprocessing. Every preset of ``--presets`` then renders those channels (channel objective, the preset's
settings unless ``--steps``, ``--lr``, ``--redirect-steps`` or ``--retries`` say otherwise). Per preset and layer it
prints how many renders ended above their start and how many reached ``--share`` x the best photo (min, median),
then one line per preset over all layers. Targets: every render above its start; with the default preset at least
75 % of channels at 1.0 x their best photo. Exit status 1 if a target is missed; ``--json FILE`` keeps every value.

    python benchmarks/feature_viz_targets.py --data PHOTOS [--layers _blocks.3,_blocks.8,_blocks.15]
        [--channels 32] [--presets naive,improved,fourier] [--size 224] [--seed 0] [--device cpu] [--threads 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time

import torch

import convlens
from convlens.plugins.visualizers.feature_viz import FeatureVizParams
from convlens.plugins.visualizers.feature_viz.api import PRESETS, RenderSettings, render, unit_objectives

DEFAULT_PRESET = FeatureVizParams().preset


def pick_channels(count: int, available: int, seed: int, layer: str) -> list[int]:
    generator = convlens.torch_generator(seed, "feature-viz-targets", layer)
    return sorted(torch.randperm(available, generator=generator)[:count].tolist())


def best_photos(bundle, layer: str, data: str, device) -> list[float]:
    """Per channel of ``layer``, the largest per-image mean activation over the images of ``data``."""
    with tempfile.TemporaryDirectory() as folder:
        record = convlens.unit_statistics(
            bundle, layer, convlens.scan_images(data), folder, device=device, progress=False, batch_size=16
        )
    return [unit["max_image_mean"] for unit in record["groups"]["cnn"]["units"]]


def settings_for(preset: str, args) -> RenderSettings:
    settings = dict(PRESETS[preset])
    for key in ("steps", "lr", "lr_schedule", "redirect_steps"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    retries = FeatureVizParams().retries if args.retries is None else args.retries
    return RenderSettings(
        **settings, size=(args.size, args.size), batch_size=args.batch_size, seed=args.seed, retries=retries
    )


def render_layer(bundle, layer: str, channels: list[int], settings: RenderSettings, device) -> list[dict]:
    rendered = render(
        bundle.module,
        layer,
        unit_objectives("channel", tuple(channels), None, with_sae=False),
        settings,
        mean=bundle.mean,
        std=bundle.std,
        device=device,
        progress=False,
    )
    return [
        {"channel": c, "start": r.start_value, "final": r.final_value, "attempts": r.attempts}
        for c, r in zip(channels, rendered)
    ]


def describe(rows: list[dict], share: float) -> str:
    above = sum(row["final"] > row["start"] for row in rows)
    reached = sum(row["ratio"] >= share for row in rows)
    ratios = [row["ratio"] for row in rows]
    return (
        f"above start {above:3d}/{len(rows)}  >= {share:g}x best photo {reached:3d}/{len(rows)} "
        f"({100 * reached / len(rows):3.0f} %)  ratio min {min(ratios):6.2f} median {statistics.median(ratios):6.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="image folder whose per-channel best image is the target")
    parser.add_argument("--layers", default="_blocks.3,_blocks.8,_blocks.15")
    parser.add_argument("--channels", type=int, default=32, help="random channels per layer")
    parser.add_argument("--presets", default="naive,improved,fourier")
    parser.add_argument("--share", type=float, default=1.0, help="target share of the best photo")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=None, help="default: the preset's")
    parser.add_argument("--lr", type=float, default=None, help="default: the preset's")
    parser.add_argument("--lr-schedule", default=None, choices=["constant", "cosine"], help="default: the preset's")
    parser.add_argument("--redirect-steps", type=int, default=None, help="default: the preset's")
    parser.add_argument("--retries", type=int, default=None, help="default: feature-viz's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="write every channel's values to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    bundle = convlens.registry.create("model", "efficientnet-lite0")
    bundle.module.to(device).eval()

    results: dict[str, dict[str, list[dict]]] = {}
    started = time.perf_counter()
    for layer in args.layers.split(","):
        best = best_photos(bundle, layer, args.data, device)
        channels = pick_channels(args.channels, len(best), args.seed, layer)
        for preset in args.presets.split(","):
            settings = settings_for(preset, args)
            rows = render_layer(bundle, layer, channels, settings, device)
            for row in rows:
                row["best_photo"] = best[row["channel"]]
                row["ratio"] = row["final"] / best[row["channel"]] if best[row["channel"]] > 0 else float("inf")
            results.setdefault(preset, {})[layer] = rows
            print(f"{preset:9} {layer:11} {describe(rows, args.share)}", flush=True)
    seconds = time.perf_counter() - started

    missed = []
    for preset, layers in results.items():
        rows = [row for layer_rows in layers.values() for row in layer_rows]
        print(f"{preset:9} {'all':11} {describe(rows, args.share)}")
        if any(row["final"] <= row["start"] for row in rows):
            missed.append(f"{preset}: a render ended at or below its start")
        reached = sum(row["ratio"] >= args.share for row in rows) / len(rows)
        if preset == DEFAULT_PRESET and reached < 0.75:
            missed.append(f"{preset}: {100 * reached:.0f} % of channels at {args.share:g}x their best photo (< 75 %)")
    summary = {
        "model": "efficientnet-lite0 (ImageNet-1k)",
        "settings": {p: dataclasses.asdict(settings_for(p, args)) for p in results},
        "size": args.size,
        "seed": args.seed,
        "device": str(device),
        "torch": torch.__version__,
        "seconds": round(seconds, 1),
    }
    if args.json:
        with open(args.json, "w") as file:
            json.dump({**summary, "results": results}, file, indent=1, default=str)
    print(
        f"{len(results)} presets x {len(args.layers.split(','))} layers in {seconds:.0f} s; "
        + ("; ".join(missed) or "every target met")
    )
    if missed:
        sys.exit(1)


if __name__ == "__main__":
    main()
