"""Extraction throughput against a bare no-grad forward pass over the same images (issue 4's benchmark).

resnet18-smooth (random init) on `shapes` images of 224 px. The floor is a bare no-grad forward of the full
network on tensors already in memory; extraction includes decoding, the filter, sampling and shard writing.

    python benchmarks/extract_throughput.py [--n 128] [--batch 32] [--threads 2]
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
from convlens.core.extraction import ExtractionSettings, extract
from convlens.core.images import ImageDataset, Preprocessing, SkipLog, image_batches, scan_images
from convlens.core.shapes import write_shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="convlens-extract-bench-"))
    write_shapes(work / "shapes", n=args.n, size=224, seed=0)
    bundle = convlens.registry.create("model", "resnet18-smooth", num_classes=8)
    index = scan_images(work / "shapes")
    dataset = ImageDataset(index, Preprocessing.of(bundle).eval_transform)
    images = [b.images for b in image_batches(dataset, batch_size=args.batch, skip_log=SkipLog())]
    module = bundle.module.eval()
    with torch.no_grad():
        module(images[0])  # warm-up
        started = time.perf_counter()
        for batch in images:
            module(batch)
    floor = args.n / (time.perf_counter() - started)

    results = {"floor_images_per_second": round(floor, 1)}
    for layer, filter_name in (("layer4", "magnitude"), ("layer1", "magnitude"), ("layer4", "gradcam")):
        out = work / f"store-{layer}-{filter_name}"
        settings = ExtractionSettings(model={"name": "resnet18-smooth"}, layer=layer, filter={"name": filter_name},
                                      images_per_shard=args.n, batch_size=args.batch)
        filter_ = convlens.registry.create("filter", filter_name)
        summary = extract(bundle, filter_, index, out, settings, progress=False)
        rate = summary["images"] / summary["seconds"]
        results[f"{filter_name}@{layer}"] = {"images_per_second": round(rate, 1), "ratio_to_floor": round(rate / floor, 3)}
        shutil.rmtree(out)
    print(json.dumps(results, indent=1))
    print(f"magnitude@layer4 runs at {results['magnitude@layer4']['ratio_to_floor']:.2f}x the bare forward "
          f"(target >= 0.9); magnitude@layer1 at {results['magnitude@layer1']['ratio_to_floor']:.2f}x (target > 1); "
          f"gradcam@layer4 costs {1 / results['gradcam@layer4']['ratio_to_floor']:.2f}x the bare forward "
          f"(target <= 1.3)")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
