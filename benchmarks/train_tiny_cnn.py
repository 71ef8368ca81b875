"""tiny-cnn trained with `convlens train-model` on 4,000 `shapes` images of 64 px (issue 3's acceptance).

Generates the dataset, runs the real CLI in a subprocess, and reports validation top-1 and the wall time
against the 5-minute budget. The floor, measured in the same run, is the bare optimisation work: forward,
backward and AdamW step of tiny-cnn on random tensors for as many images and steps as the training run
takes. The ratio (training time / floor) is the cost of decoding, augmentation, validation and checkpoints.

    python benchmarks/train_tiny_cnn.py [--n 4000] [--epochs 10] [--threads 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import convlens
from convlens.data.shapes import write_shapes

BUDGET_SECONDS = 300.0
TARGET_TOP1 = 0.90


def optimisation_floor(steps: int, batch_size: int, size: int) -> float:
    """Seconds for ``steps`` bare training steps of tiny-cnn on random tensors (after one warm-up step)."""
    module = convlens.registry.create("model", "tiny-cnn", input_size=size).module.train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    images = torch.randn(batch_size, 3, size, size)
    labels = torch.randint(0, 8, (batch_size,))
    measured = min(steps, 40)
    for step in range(measured + 1):
        if step == 1:
            started = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(module(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - started) / measured * steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the budget is for 2 CPU cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, default=None, help="keep the dataset and run folder here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = args.keep or Path(tempfile.mkdtemp(prefix="convlens-bench-"))
    data, run = work / "shapes", work / "run"

    started = time.perf_counter()
    write_shapes(data, n=args.n, size=args.size, seed=args.seed)
    generate_seconds = time.perf_counter() - started

    command = [
        sys.executable,
        "-m",
        "convlens",
        "train-model",
        "tiny-cnn",
        "--data",
        str(data),
        "--out",
        str(run),
        "--epochs",
        str(args.epochs),
        "--batch-size",
        str(args.batch_size),
        "--seed",
        str(args.seed),
        "--device",
        "cpu",
        "--json",
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=environment)
    train_seconds = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"train-model failed:\n{result.stderr}{result.stdout}")
    summary = json.loads(result.stdout)

    steps = args.epochs * (summary["train_images"] // args.batch_size)
    floor = optimisation_floor(steps, args.batch_size, args.size)
    top1 = summary["final"]["val_top1"]
    print(
        json.dumps(
            {
                "images": args.n,
                "size": args.size,
                "epochs": args.epochs,
                "threads": args.threads,
                "generate_seconds": round(generate_seconds, 1),
                "train_seconds": round(train_seconds, 1),
                "floor_seconds": round(floor, 1),
                "val_top1": top1,
                "val_top5": summary["final"]["val_top5"],
                "per_epoch": [round(r, 1) for r in _epoch_seconds(run)],
            },
            indent=1,
        )
    )
    print(
        f"val top-1 {100 * top1:.1f} % (target >= {100 * TARGET_TOP1:.0f} %) in {train_seconds:.0f} s: "
        f"{train_seconds / BUDGET_SECONDS:.2f} of the {BUDGET_SECONDS:.0f} s budget; "
        f"{train_seconds / floor:.2f}x the bare optimisation floor of {floor:.0f} s"
    )
    if top1 < TARGET_TOP1 or train_seconds > BUDGET_SECONDS:
        sys.exit(1)


def _epoch_seconds(run: Path) -> list[float]:
    return [json.loads(line)["seconds"] for line in (run / "metrics.jsonl").read_text().splitlines()]


if __name__ == "__main__":
    main()
