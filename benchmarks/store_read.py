"""Store reading: samples/s of the training iterator (``ActivationStore.batches``) against a plain read of the
same bytes.

The store: ``--samples`` random float32 vectors of ``--channels`` (default 524,288 x 512: 1 GiB), one in ten of
them validation (mixed into every shard, as extraction writes them), in shards of ``--shard-samples`` (default
65,536, the store's own default: 128 MiB files), written to a temporary folder; every figure is measured with the
files in the page cache. Measured in the same run, taking turns:

- floor: every shard file read whole into memory (``Path.read_bytes``), one after the other, as a program loading
  the files does (files above glibc's 32 MiB mmap threshold land in fresh pages each time);
- the iterator: one epoch of the training split as the SAE trainer reads it (shuffled, window 4), at each batch
  size of ``--batch-sizes`` (default 128, the trainer's default, and 4,096), every batch reaching ``--device``
  (on cuda through pinned memory; the last batch waited for). The store's checksums are verified on its first
  pass only, which is left out (its samples/s is printed as information); later passes read into the memory the
  store kept from the pass before, as a training run's epochs do;
- information: the same batches from the split held in memory (``load_into_memory``, as ``store_in_memory``
  does), and the files read into one reused buffer (the page cache's bare copy speed, no fresh pages).

Rates are samples of the training split per second: the floor reads the validation samples' bytes too, as the
iterator does. Target: the iterator >= 0.5x the floor at every batch size. Each figure is the best of
``--rounds`` rounds. Exit status 1 if a target is missed.

    python benchmarks/store_read.py [--device cpu] [--samples 524288] [--batch-sizes 128,4096] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from convlens.activations.store import ActivationStore, store_from_tensors

TARGET = 0.5


def best_seconds(run: Callable[[], None], rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def read_files(paths: list[Path]) -> None:
    for path in paths:
        path.read_bytes()


def read_into_one_buffer(paths: list[Path], buffer: torch.Tensor) -> None:
    memory = buffer.numpy()
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            handle.readinto(memory[: path.stat().st_size])


def iterate(batches, device: torch.device) -> None:
    sum(len(batch) for batch in batches)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--samples", type=int, default=524_288)
    parser.add_argument("--channels", type=int, default=512)
    parser.add_argument("--shard-samples", type=int, default=65_536)
    parser.add_argument("--batch-sizes", default="128,4096", help="comma-separated")
    parser.add_argument("--window", type=int, default=4, help="shards shuffled together (the trainer's default)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
    vectors = torch.randn(args.samples, args.channels, generator=torch.Generator().manual_seed(0))
    split = (torch.arange(args.samples) % 10 == 0).to(torch.uint8)
    train_samples = int((split == 0).sum())

    with tempfile.TemporaryDirectory(prefix="convlens-store-read-") as folder:
        store_from_tensors(Path(folder) / "store", vectors, split=split, samples_per_shard=args.shard_samples)
        del vectors
        store = ActivationStore(Path(folder) / "store")
        paths = [store.path / record["file"] for record in store.shards]
        buffer = torch.empty(max(path.stat().st_size for path in paths), dtype=torch.uint8)
        first_pass = best_seconds(lambda: iterate(store.batches(batch_sizes[-1], device=device), device), 1)
        resident = store.load_into_memory("train", device)

        def epoch(batch_size: int, **options) -> Callable[[], None]:
            return lambda: iterate(
                store.batches(batch_size, "train", seed=0, epoch=1, window=args.window, device=device, **options),
                device,
            )

        cases: dict[str, Callable[[], None]] = {
            "floor: read each file": lambda: read_files(paths),
            "information: read into one buffer": lambda: read_into_one_buffer(paths, buffer),
        }
        for size in batch_sizes:
            cases[f"iterator, batch {size}"] = epoch(size)
            cases[f"information: held in memory, batch {size}"] = epoch(size, resident=resident)
        best = dict.fromkeys(cases, float("inf"))
        for _ in range(args.rounds):
            for name, run in cases.items():
                best[name] = min(best[name], best_seconds(run, 1))

    rates = {name: train_samples / seconds for name, seconds in best.items()}
    floor = rates["floor: read each file"]
    ratios = {size: rates[f"iterator, batch {size}"] / floor for size in batch_sizes}
    result = {
        "device": str(device),
        "samples": args.samples,
        "train_samples": train_samples,
        "channels": args.channels,
        "shards": len(paths),
        "threads": args.threads,
        "samples_per_second": {name: round(rate) for name, rate in rates.items()},
        "first_pass_samples_per_second": round(train_samples / first_pass),
        "ratios": {f"batch {size}": round(ratio, 3) for size, ratio in ratios.items()},
        "target": TARGET,
    }
    if args.json:
        print(json.dumps(result, indent=1))
    gibs = train_samples * args.channels * 4 / 2**30
    print(
        "; ".join(
            f"batch {size}: {rates[f'iterator, batch {size}']:,.0f} samples/s = {ratio:.2f}x the plain read "
            f"(target >= {TARGET}), {rates[f'information: held in memory, batch {size}']:,.0f} held in memory"
            for size, ratio in ratios.items()
        )
        + f"; plain read {floor:,.0f} samples/s ({gibs * floor / train_samples:.2f} GiB/s), into one reused buffer "
        f"{rates['information: read into one buffer']:,.0f}; first pass (checksums) "
        f"{result['first_pass_samples_per_second']:,} samples/s; {device}"
    )
    return 1 if min(ratios.values()) < TARGET else 0


if __name__ == "__main__":
    sys.exit(main())
