"""An edge detector as an attribution baseline (Adebayo et al. 2018; course notes 002 sec. 6.3, Figure 28).

The Sobel gradient magnitude of the image's grey levels: it depends on neither the model nor the target, so the
cascading-randomisation check leaves it unchanged; a method whose maps stay as unchanged explains no more than
this baseline does.
"""

from __future__ import annotations

from dataclasses import dataclass

from convlens import AttributionParams, AttributionVisualizer, ExplainTarget, VisualizerSpec, hookimpl


@dataclass(frozen=True)
class EdgeDetectorParams(AttributionParams):
    pass


class EdgeDetector(AttributionVisualizer):
    name = "edge-detector"
    cost = "no pass through the model"

    def __init__(self, params: EdgeDetectorParams | None = None):
        super().__init__(params or EdgeDetectorParams())

    def attribute(self, model, images, layer: str, target: ExplainTarget):
        import torch
        import torch.nn.functional as F

        grey = images.detach().float().mean(dim=1, keepdim=True)
        sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=images.device)
        kernels = torch.stack([sobel_x, sobel_x.T])[:, None]
        edges = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), kernels)
        return edges.square().sum(dim=1).sqrt()


@hookimpl
def register_visualizers(register):
    register(
        VisualizerSpec(
            name="edge-detector",
            factory=EdgeDetector,
            params=EdgeDetectorParams,
            summary="Sobel edge magnitude of the input: a model-independent baseline for attribution sanity checks",
            aliases=("edges", "sobel"),
        )
    )
