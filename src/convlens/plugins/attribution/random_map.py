"""A random map: uniform noise per input pixel, the floor every attribution method should clear (a metric that
cannot tell a method from it measures nothing). The noise is a function of the image's content and the seed, so
the same image always gets the same map, whatever the model: like the edge detector, it keeps a correlation of 1
under the randomisation checks. Cost: no pass through the model."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from convlens import AttributionParams, AttributionVisualizer, VisualizerSpec, derive_seed, hookimpl, param

NAME = "random-map"


@dataclass(frozen=True)
class RandomMapParams(AttributionParams):
    seed: int = param(0, help="seed of the noise (combined with each image's content)")


def content_key(image) -> int:
    """A 63-bit number from the image's values."""
    digest = hashlib.blake2b(image.detach().float().cpu().numpy().tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def random_maps(images, seed):
    """Uniform noise ``[N, H, W]`` in [0, 1), each map drawn from a generator seeded by the image and ``seed``."""
    import torch

    maps = []
    for image in images:
        generator = torch.Generator().manual_seed(derive_seed(seed, content_key(image)))
        maps.append(torch.rand(image.shape[1:], generator=generator))
    return torch.stack(maps).to(images.device)


class RandomMap(AttributionVisualizer):
    name = NAME
    cost = "no pass through the model"

    def __init__(self, params: RandomMapParams | None = None):
        super().__init__(params or RandomMapParams())

    def attribute(self, model, images, layer, target):
        return random_maps(images, self.params.seed)


@hookimpl
def register_visualizers(register):
    register(
        VisualizerSpec(
            name=NAME,
            factory=RandomMap,
            params=RandomMapParams,
            summary="uniform noise per pixel, fixed per image: the floor an attribution method must clear",
            aliases=("random", "random-baseline"),
        )
    )
