"""Extraction throughput against a bare no-grad forward pass over the same images (issue 4's benchmark).

resnet18-smooth (random init) on `shapes` images of 224 px. Two floors, measured in the same run:

- loader + forward: the same image loader (decode, resize, crop, normalise) feeding a bare no-grad forward of
  the full network, with nothing else; extraction adds the filter, sampling, gathering and shard writing
  (checksums included), and stops the forward at the layer. This is the floor the issue's ratios refer to.
- forward only: the bare forward on tensors already in memory, to show what decoding costs on its own.

Every figure is the best of ``--repeats`` rounds, so a busy machine does not decide the ratio.

    python benchmarks/extract_throughput.py [--n 256] [--batch 32] [--threads 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

import convlens
from convlens.activations.extraction import ExtractionSettings, extract
from convlens.data.images import Preprocessing, SkipLog, scan_images
from convlens.data.loading import ImageDataset, image_batches
from convlens.data.shapes import write_shapes

CASES = (("layer4", "magnitude"), ("layer1", "magnitude"), ("layer4", "gradcam"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="convlens-extract-bench-"))
    write_shapes(work / "shapes", n=args.n, size=224, seed=0)
    bundle = convlens.registry.create("model", "resnet18-smooth", num_classes=8)
    module = bundle.module.eval()
    index = scan_images(work / "shapes")
    dataset = ImageDataset(index, Preprocessing.of(bundle))
    in_memory = [b.images for b in image_batches(dataset, batch_size=args.batch, skip_log=SkipLog())]

    def loader_forward() -> float:
        started = time.perf_counter()
        with torch.no_grad():
            for batch in image_batches(dataset, batch_size=args.batch, skip_log=SkipLog()):
                module(batch.images)
        return time.perf_counter() - started

    def forward_only() -> float:
        started = time.perf_counter()
        with torch.no_grad():
            for images in in_memory:
                module(images)
        return time.perf_counter() - started

    def extraction(layer: str, filter_name: str) -> float:
        out = work / f"store-{layer}-{filter_name}"
        settings = ExtractionSettings(
            model={"name": "resnet18-smooth"},
            layer=layer,
            filter={"name": filter_name},
            images_per_shard=args.n,
            batch_size=args.batch,
        )
        summary = extract(bundle, convlens.registry.create("filter", filter_name), index, out, settings, progress=False)
        shutil.rmtree(out)
        return summary["seconds"]

    with torch.no_grad():
        module(in_memory[0])  # warm-up
    best: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, run in [("loader+forward", loader_forward), ("forward only", forward_only)] + [
            (f"{f}@{layer}", lambda layer=layer, f=f: extraction(layer, f)) for layer, f in CASES
        ]:
            best[name] = min(best.get(name, float("inf")), run())
    rate = {name: args.n / seconds for name, seconds in best.items()}
    floor = rate["loader+forward"]
    results = {
        name: {
            "images_per_second": round(value, 1),
            "ratio_to_loader_forward": round(value / floor, 3),
            "ratio_to_forward_only": round(value / rate["forward only"], 3),
        }
        for name, value in rate.items()
    }
    print(json.dumps(results, indent=1))
    ratio = {name: results[name]["ratio_to_loader_forward"] for name in results}
    print(
        f"against loader+forward ({floor:.1f} images/s): magnitude@layer4 {ratio['magnitude@layer4']:.2f}x "
        f"(target >= 0.9); magnitude@layer1 {ratio['magnitude@layer1']:.2f}x (target > 1); gradcam@layer4 costs "
        f"{1 / ratio['gradcam@layer4']:.2f}x (target <= 1.3)"
    )
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
