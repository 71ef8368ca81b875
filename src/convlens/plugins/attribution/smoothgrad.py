"""SmoothGrad (Smilkov et al. 2017) around any input attribution: the mean of the base method's attributions of
``samples`` noisy copies of each image, ``x + N(0, s^2)`` with ``s = noise_level x (max(x) - min(x))`` per image
(the paper's noise level, 0.1 to 0.2). ``nt_type`` ``smoothgrad_sq`` averages the squares and ``vargrad`` takes
the variance, as captum's ``NoiseTunnel`` names them; with the same noise draw (``torch.normal`` of a generator
seeded with ``seed``) the result equals ``NoiseTunnel`` with ``stdevs = s``.

Cost: ``samples`` times the base method's cost, the copies run ``internal_batch_size`` at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

from convlens import (
    ConvlensError,
    InputAttribution,
    InputAttributionParams,
    VisualizerSpec,
    for_rows,
    hookimpl,
    index_chunks,
    param,
    with_classes,
)

NAME = "smoothgrad"
NT_TYPES = ("smoothgrad", "smoothgrad_sq", "vargrad")


@dataclass(frozen=True)
class SmoothGradParams(InputAttributionParams):
    base: str = param(
        "saliency",
        help="the attribution averaged over noisy copies: any installed input attribution (saliency, "
        "integrated-gradients, input-x-gradient, guided-backprop, guided-gradcam, ...), with its default options",
    )
    samples: int = param(16, min=1, help="noisy copies per image")
    noise_level: float = param(0.15, min=0.0, help="noise standard deviation as a share of each image's range")
    nt_type: str = param("smoothgrad", choices=NT_TYPES, help="mean, mean of squares, or variance of the copies")
    internal_batch_size: int = param(64, min=1, help="noisy copies per call of the base method")
    seed: int = param(0, help="seed of the noise")


def noisy_copies(images, samples, noise_level, seed):
    """``samples`` consecutive noisy copies of each image, ``[N x samples, C, H, W]``."""
    import torch

    spread = (images.flatten(1).amax(dim=1) - images.flatten(1).amin(dim=1)) * noise_level
    copies = images.repeat_interleave(samples, dim=0)
    std = spread.repeat_interleave(samples).view(-1, 1, 1, 1).expand_as(copies).contiguous()
    generator = torch.Generator(device=images.device).manual_seed(seed)
    return copies + torch.normal(0.0, std, generator=generator)


def combined(attributions, samples, nt_type):
    """The per-image mean (of squares, or variance) of ``attributions [N x samples, ...]``."""
    grouped = attributions.view(-1, samples, *attributions.shape[1:])
    if nt_type == "smoothgrad":
        return grouped.mean(dim=1)
    squares = grouped.square().mean(dim=1)
    return squares if nt_type == "smoothgrad_sq" else squares - grouped.mean(dim=1).square()


class SmoothGrad(InputAttribution):
    name = NAME
    cost = "samples x the base method"

    def __init__(self, params: SmoothGradParams | None = None):
        super().__init__(params or SmoothGradParams())
        self._base = None

    @property
    def base(self):
        if self._base is None:
            import convlens.registry

            base = convlens.registry.create("visualizer", self.params.base)
            if not isinstance(base, InputAttribution):
                raise ConvlensError(
                    f"smoothgrad averages input attributions; '{self.params.base}' is not one (choose e.g. saliency, "
                    "integrated-gradients, input-x-gradient or guided-backprop)"
                )
            self._base = base
        return self._base

    def input_attribution(self, model, images, layer, target):
        import torch

        p = self.params
        target = with_classes(model, images, target.read_at(layer))
        copies = noisy_copies(images, p.samples, p.noise_level, p.seed)
        parts = []
        for indices in index_chunks(len(copies), p.internal_batch_size, images.device):
            rows = indices // p.samples
            parts.append(self.base.input_attribution(model, copies[indices], layer, for_rows(target, rows)).float())
        return combined(torch.cat(parts), p.samples, p.nt_type)


@hookimpl
def register_visualizers(register):
    register(
        VisualizerSpec(
            name=NAME,
            factory=SmoothGrad,
            params=SmoothGradParams,
            summary="SmoothGrad: any input attribution averaged over noisy copies of the image (Smilkov et al. 2017)",
            aliases=("smooth-grad", "noise-tunnel"),
        )
    )
