"""Gradient saliency (Simonyan et al. 2014; course notes 002 sec. 6.1): |d target / d input|, the largest over
the colour channels, per input pixel. One of the two methods that pass the sanity checks of Adebayo et al.
(002 sec. 6.3). The target is a class logit, or an SAE latent summed over the layer's positions."""

from __future__ import annotations

from dataclasses import dataclass

from convlens import VisualizerSpec, hookimpl
from convlens.core.attribution import AttributionParams, AttributionVisualizer, ExplainTarget
from convlens.core.errors import ConvlensError


@dataclass(frozen=True)
class SaliencyParams(AttributionParams):
    pass


class SaliencyVisualizer(AttributionVisualizer):
    name = "saliency"

    def __init__(self, params: SaliencyParams | None = None):
        super().__init__(params or SaliencyParams())

    def attribute(self, model, images, layer: str, target: ExplainTarget):
        import torch

        from convlens.core.layers import first_tensor, hooked_outputs

        module = model.module
        frozen = [p for p in module.parameters() if p.requires_grad]
        pixels = images.detach().requires_grad_(True)
        try:
            for parameter in frozen:
                parameter.requires_grad_(False)
            with torch.enable_grad(), hooked_outputs(module, [layer]) as outputs:
                logits = first_tensor(module(pixels))
                if target.sae is not None:
                    if target.latent is None or not 0 <= target.latent < target.sae.latent_dim:
                        raise ConvlensError(f"latent {target.latent} is out of range: the SAE has latents "
                                            f"0..{target.sae.latent_dim - 1}")
                    value = target.sae.encode(outputs[layer])[:, target.latent].sum()
                else:
                    classes = logits.argmax(dim=1) if target.classes is None else target.classes.to(logits.device)
                    value = logits.gather(1, classes.long()[:, None]).sum()
                (gradient,) = torch.autograd.grad(value, [pixels])
        finally:
            for parameter in frozen:
                parameter.requires_grad_(True)
        return gradient.abs().amax(dim=1)


@hookimpl
def register_visualizers(register):
    register(VisualizerSpec(
        name="saliency",
        factory=SaliencyVisualizer,
        params=SaliencyParams,
        summary="gradient saliency: |d class logit (or SAE latent) / d input pixel|, per pixel",
        aliases=("gradient", "vanilla-gradient"),
    ))
