"""Gradient flow of resnet18 vs resnet18-smooth for neuron objectives (paper 001, sec. 5.1).

For many (unit, random start image) pairs at layer2 and layer4 of a seeded random-init resnet18, the
fraction whose input gradient is exactly zero (gradient ascent cannot start) and the gradient norms.

    python benchmarks/gradient_flow.py [--pairs 128] [--size 224] [--seed 0]
"""

from __future__ import annotations

import argparse
import json

import torch

import convlens
from convlens.models.gradient_flow import zero_gradient_fraction


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--pairs", type=int, default=128)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    torch.set_grad_enabled(True)
    models = {
        "resnet18": convlens.registry.create("model", "torchvision", arch="resnet18", seed=args.seed).module,
        "resnet18-smooth": convlens.registry.create("model", "resnet18-smooth", seed=args.seed).module,
    }
    results = []
    for layer, channels in (("layer2", 128), ("layer4", 512)):
        generator = torch.Generator().manual_seed(args.seed)
        images = torch.randn(args.pairs, 3, args.size, args.size, generator=generator)
        units = torch.randint(0, channels, (args.pairs,), generator=generator)
        for name, module in models.items():
            norms = []
            for start in range(0, args.pairs, args.batch):
                part = slice(start, start + args.batch)
                norms.append(zero_gradient_fraction(module, layer, images[part], units[part])[1])
            norms = torch.cat(norms)
            zero = float((norms == 0).float().mean())
            nonzero = norms[norms > 0]
            results.append(
                {
                    "model": name,
                    "layer": layer,
                    "pairs": args.pairs,
                    "zero_gradient_fraction": zero,
                    "median_gradient_norm": float(norms.median()),
                    "median_nonzero_gradient_norm": float(nonzero.median()) if len(nonzero) else 0.0,
                }
            )
            print(
                f"{name:16s} {layer}: {zero:6.1%} of {args.pairs} (unit, image) pairs have zero input gradient; "
                f"median |grad| {float(norms.median()):.3e}"
            )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
