"""The cost of the target-L0 controller: ``train_sae`` of a relu-l1 SAE with ``target_l0`` against the same run
without it, measured in the same process, taking turns.

A relu-l1 SAE, 512 -> 4,096 latents on cpu (16,384 on cuda), batch 4,096, float32, on ``--samples`` random vectors
(10 % validation) in a temporary store; the trainer's defaults otherwise (warm-ups, learning-rate decay,
resampling: the same in both runs). Seconds per step from the end of step ``--warmup`` to the end of the last step
(the ``on_step`` callback); each figure is the best of ``--rounds`` runs.

Target: with the controller at most 1.05x the seconds per step without it. Exit status 1 if missed.

    python benchmarks/sae_target_l0.py [--device cpu] [--rounds 3] [--steps 40] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

import convlens
from convlens.activations.store import store_from_tensors
from convlens.sae.training import SAETrainingParams, train_sae

TARGET = 1.05
BATCH = 4096


def seconds_per_step(args: argparse.Namespace, device: torch.device, store, out: Path, target: float | None) -> float:
    params = {"input_dim": args.input_dim, "latent_dim": args.latents, "l1": 1.0}
    sae = convlens.registry.create("sae", "relu-l1", **params)
    settings = SAETrainingParams(steps=args.steps, batch_size=BATCH, target_l0=target, log_every=10_000)
    marks: dict[int, float] = {}

    def on_step(step: int) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        marks[step] = time.perf_counter()

    train_sae(
        sae, {"name": "relu-l1", "params": params}, store, out, settings, device=device, progress=False, on_step=on_step
    )
    return (marks[args.steps] - marks[args.warmup]) / (args.steps - args.warmup)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--input-dim", type=int, default=512)
    parser.add_argument("--latents", type=int, default=None, help="default: 4,096 on cpu, 16,384 on cuda")
    parser.add_argument("--samples", type=int, default=65_536)
    parser.add_argument("--steps", type=int, default=None, help="default: 40 on cpu, 300 on cuda")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--target-l0", type=float, default=32.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    args.latents = args.latents or (16_384 if device.type == "cuda" else 4_096)
    args.steps = args.steps or (300 if device.type == "cuda" else 40)
    vectors = torch.randn(args.samples, args.input_dim, generator=torch.Generator().manual_seed(0))
    split = (torch.arange(args.samples) % 10 == 0).to(torch.uint8)
    plain = controlled = float("inf")
    with tempfile.TemporaryDirectory(prefix="convlens-target-l0-") as folder:
        store = store_from_tensors(Path(folder) / "store", vectors, split=split, samples_per_shard=16_384)
        for number in range(args.rounds):
            plain = min(plain, seconds_per_step(args, device, store, Path(folder) / f"plain-{number}", None))
            controlled = min(
                controlled,
                seconds_per_step(args, device, store, Path(folder) / f"target-{number}", args.target_l0),
            )
    ratio = controlled / plain
    result = {
        "device": str(device),
        "shape": {"input_dim": args.input_dim, "latents": args.latents, "batch": BATCH},
        "steps": args.steps,
        "cpus": os.cpu_count(),
        "seconds_per_step": {"without_target": plain, "with_target": controlled},
        "ratio": ratio,
        "target": TARGET,
        "met": ratio <= TARGET,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"{device}: relu-l1 {args.input_dim} -> {args.latents}, batch {BATCH}: {1000 * plain:.1f} ms/step without "
            f"a target L0, {1000 * controlled:.1f} ms/step with one: {ratio:.3f}x (target <= {TARGET}x)"
        )
    return 0 if ratio <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
