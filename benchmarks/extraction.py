"""Extraction throughput against its floors, min(loader alone, bare forward), for each worker count (issue 21).

resnet18-smooth (random weights, 1000 classes), layer4, the magnitude filter, ``--images`` photo-like 224 px
images (JPEG by default; see benchmarks/loader.py), batch ``--batch``. Measured in the same run, each the best of
``--repeats`` rounds:

- loader alone: ``image_batches`` with the same workers, decoding and device as the extraction, nothing else;
- bare forward: the model's no-grad forward (under ``--dtype`` autocast) on batches already on the device;
- extraction: ``convlens extract``'s engine writing a store (filter, sampling, shard writing and checksums
  included), every worker count of ``--workers`` (default 0 up to the number of cores).

Targets. CPU: extraction with 2 workers >= 0.9x min(loader alone with 2 workers, bare forward), and no worker
count slower than 0 workers. GPU (``--device cuda --workers 16 --decode device``): extraction >= 0.8x the loader
alone with 16 workers and >= 2,000 images/s. Exit status 1 if a target is missed.

    python benchmarks/extraction.py [--device cpu] [--images 256] [--workers 0,1,2] [--decode auto] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

import convlens
from convlens.activations.extraction import ExtractionSettings, extract
from convlens.data.loading import ImageDataset, decode_on_device, image_batches
from loader import write_photos


def loader_rate(dataset: ImageDataset, workers: int, batch: int, device: torch.device) -> float:
    started = time.perf_counter()
    count = sum(
        len(b)
        for b in image_batches(dataset, batch_size=batch, skip_log=convlens.SkipLog(), workers=workers, device=device)
    )
    _synchronize(device)
    return count / (time.perf_counter() - started)


def forward_rate(module: torch.nn.Module, batches: list[torch.Tensor], device: torch.device, dtype: str) -> float:
    started = time.perf_counter()
    with torch.no_grad(), convlens.autocast(device, dtype):
        for images in batches:
            module(images)
    _synchronize(device)
    return sum(len(b) for b in batches) / (time.perf_counter() - started)


def extraction_rate(bundle, index, work: Path, workers: int, args: argparse.Namespace, device: torch.device) -> float:
    out = work / f"store-{workers}"
    settings = ExtractionSettings(
        model={"name": "resnet18-smooth"},
        layer="layer4",
        filter={"name": "magnitude"},
        images_per_shard=256,
        batch_size=args.batch,
        compute_dtype=args.dtype,
    )
    filter_ = convlens.registry.create("filter", "magnitude")
    started = time.perf_counter()
    extract(bundle, filter_, index, out, settings, device=device, workers=workers, decode=args.decode, progress=False)
    seconds = time.perf_counter() - started
    shutil.rmtree(out)
    return len(index) / seconds


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--format", default="jpg", choices=("jpg", "png"))
    parser.add_argument("--workers", default=",".join(str(w) for w in range(0, (os.cpu_count() or 1) + 1)))
    parser.add_argument("--decode", default="auto", choices=("auto", "cpu", "device"))
    parser.add_argument("--dtype", default="float32", choices=convlens.COMPUTE_DTYPES)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    worker_counts = [int(w) for w in args.workers.split(",")]
    device = convlens.resolve_device(args.device)
    bundle = convlens.registry.create("model", "resnet18-smooth")
    module = convlens.channels_last(bundle.module.to(device).eval(), device)
    work = Path(tempfile.mkdtemp(prefix="convlens-extraction-bench-"))
    try:
        index = convlens.scan_images(write_photos(work / "images", args.images, 224, f".{args.format}"))
        dataset = ImageDataset(
            index, convlens.Preprocessing.of(bundle), jpeg_bytes=decode_on_device(args.decode, device)
        )
        resident = [
            b.images for b in image_batches(dataset, batch_size=args.batch, skip_log=convlens.SkipLog(), device=device)
        ]
        forward_rate(module, resident[:1], device, args.dtype)  # warm-up
        rates: dict[str, float] = {}

        def keep_best(name: str, rate: float) -> None:
            rates[name] = max(rates.get(name, 0.0), rate)

        for _ in range(args.repeats):
            keep_best("bare forward", forward_rate(module, resident, device, args.dtype))
            for workers in worker_counts:
                keep_best(f"loader workers={workers}", loader_rate(dataset, workers, args.batch, device))
                keep_best(f"extraction workers={workers}", extraction_rate(bundle, index, work, workers, args, device))
    finally:
        shutil.rmtree(work)
    return report(rates, worker_counts, device, args)


def report(rates: dict[str, float], worker_counts: list[int], device: torch.device, args: argparse.Namespace) -> int:
    ratios = {
        workers: rates[f"extraction workers={workers}"] / min(rates[f"loader workers={workers}"], rates["bare forward"])
        for workers in worker_counts
    }
    missed = []
    baseline = rates.get("extraction workers=0")
    if baseline:
        missed += [
            f"extraction with {w} workers slower than with 0 ({rates[f'extraction workers={w}'] / baseline:.2f}x)"
            for w in worker_counts
            if rates[f"extraction workers={w}"] < 0.97 * baseline
        ]
    if device.type == "cpu" and 2 in ratios and ratios[2] < 0.9:
        missed.append(f"workers=2: {ratios[2]:.2f}x min(loader, bare forward) (target >= 0.9)")
    if device.type == "cuda" and 16 in worker_counts:
        against_loader = rates["extraction workers=16"] / rates["loader workers=16"]
        if against_loader < 0.8:
            missed.append(f"workers=16: {against_loader:.2f}x the loader alone (target >= 0.8)")
        if rates["extraction workers=16"] < 2000:
            missed.append(f"workers=16: {rates['extraction workers=16']:.0f} images/s (target >= 2000)")
    if args.json:
        print(json.dumps({"device": str(device), "rates": rates, "ratios": ratios, "missed": missed}))
        return 1 if missed else 0
    print(
        f"device {device}, {os.cpu_count()} cores, {args.images} {args.format} images, batch {args.batch}, {args.dtype}"
    )
    for name, rate in rates.items():
        print(f"  {name:26} {rate:9.1f} images/s")
    for workers, ratio in ratios.items():
        print(f"  extraction/min(loader, forward) workers={workers}: {ratio:.2f}x")
    print("targets met" if not missed else "MISSED: " + "; ".join(missed))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
