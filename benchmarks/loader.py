"""Image-loader throughput for 0, 1, 2, ... workers against a single-core decode floor (issue 21).

Photo-like images (smooth colour fields with sensor noise, 4:2:0 JPEG at quality 90, or PNG) of ``--size`` px,
``--images`` of them, loaded as a model of 224 px input with a 0.875 centre crop sees them: decode, resize,
crop, uint8 to the device, normalise there. Measured in the same run:

- floor: one core decoding and resizing the same files in a plain loop (``open_rgb`` + ``eval_pixels``), no
  loader, no batching: what one worker can at best do;
- the loader (``convlens`` ``image_batches``, batch ``--batch``) with each worker count of ``--workers`` (default
  0 up to the number of cores), worker start-up included (the default 2,048 images amortise it as a folder of
  real size would), every batch reaching ``--device``;
- on CUDA also ``decode=device``: JPEGs decoded by nvJPEG, resized and cropped on the GPU.

Targets: on a machine with >= 2 cores, 2 workers >= 1.7x the images/s of 0 workers (each format); no worker count
slower than 0 workers. Every figure is the best of ``--repeats`` rounds. Exit status 1 if a target is missed.

    python benchmarks/loader.py [--device cpu] [--images 2048] [--size 224] [--workers 0,1,2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import convlens
from convlens.data.loading import ImageDataset, image_batches

MODEL_GEOMETRY = convlens.Preprocessing((224, 224), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 0.875)


def write_photos(folder: Path, count: int, size: int, suffix: str, seed: int = 0) -> Path:
    """``count`` photo-like images of ``size`` px: smooth colour fields plus noise (they compress like photos)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for number in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((size, size), Image.BICUBIC), dtype=np.int16)
        noisy = np.clip(smooth + rng.integers(-12, 13, smooth.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"{number:05d}{suffix}", quality=90)
    return folder


def floor_rate(index: convlens.ImageIndex) -> float:
    """Images/s of one core decoding and resizing every file in a plain loop."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        started = time.perf_counter()
        for path in index.paths:
            MODEL_GEOMETRY.eval_pixels(convlens.open_rgb(path))
        return len(index) / (time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)


def loader_rate(index: convlens.ImageIndex, workers: int, batch: int, device: torch.device, decode: bool) -> float:
    dataset = ImageDataset(index, MODEL_GEOMETRY, jpeg_bytes=decode)
    started = time.perf_counter()
    count = 0
    for images in image_batches(dataset, batch_size=batch, skip_log=convlens.SkipLog(), workers=workers, device=device):
        count += len(images)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return count / (time.perf_counter() - started)


def measure(index: convlens.ImageIndex, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    cases = {f"workers={w}": (w, False) for w in args.workers}
    if device.type == "cuda":
        cases.update({f"workers={w} decode=device": (w, True) for w in args.workers})
    best = {"floor (1 core)": 0.0, **dict.fromkeys(cases, 0.0)}
    loader_rate(index, 0, args.batch, device, False)  # warm-up: imports, caches
    for _ in range(args.repeats):
        best["floor (1 core)"] = max(best["floor (1 core)"], floor_rate(index))
        for name, (workers, decode) in cases.items():
            best[name] = max(best[name], loader_rate(index, workers, args.batch, device, decode))
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", default=",".join(str(w) for w in range(0, (os.cpu_count() or 1) + 1)))
    parser.add_argument("--formats", default="png,jpg")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    args.workers = [int(w) for w in args.workers.split(",")]
    device = convlens.resolve_device(args.device)
    results, missed = {}, []
    with tempfile.TemporaryDirectory(prefix="convlens-loader-bench-") as work:
        for suffix in args.formats.split(","):
            folder = write_photos(Path(work) / suffix, args.images, args.size, f".{suffix}")
            rates = measure(convlens.scan_images(folder), args, device)
            baseline = rates["workers=0"]
            results[suffix] = {
                name: {"images_per_second": round(rate, 1), "vs_workers_0": round(rate / baseline, 3)}
                for name, rate in rates.items()
            }
            if 2 in args.workers and (os.cpu_count() or 1) >= 2 and rates["workers=2"] < 1.7 * baseline:
                missed.append(f"{suffix}: 2 workers {rates['workers=2'] / baseline:.2f}x workers 0 (target >= 1.7)")
            missed += [
                f"{suffix}: {name} slower than workers=0"
                for name, rate in rates.items()
                if name.startswith("workers=") and "decode" not in name and rate < 0.97 * baseline
            ]
    if args.json:
        print(json.dumps({"device": str(device), "cpus": os.cpu_count(), "results": results, "missed": missed}))
    else:
        print(f"device {device}, {os.cpu_count()} cores, {args.images} images of {args.size} px, batch {args.batch}")
        for suffix, rows in results.items():
            for name, row in rows.items():
                print(f"  {suffix:4} {name:26} {row['images_per_second']:8.1f} images/s  {row['vs_workers_0']:5.2f}x")
        print("targets met" if not missed else "MISSED: " + "; ".join(missed))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
