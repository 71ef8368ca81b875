"""Localisation against the objects' foreground masks (datasets with masks, such as ``shapes``): the share of a
map's energy inside the mask (the energy-based pointing game, Wang et al. 2020), relevance rank accuracy (the share
of the mask-sized set of top pixels inside the mask, Arras et al. 2022) and the pointing game (whether the map's
peak lies on the object, Zhang et al. 2018). Maps are resized to the input (bilinear) first."""

from __future__ import annotations

from convlens import AttributionMetric, MetricSpec, hookimpl, input_peaks


class MaskEnergy(AttributionMetric):
    name = "mask-energy"
    needs_masks = True

    def score(self, case):
        from convlens import mask_energy

        return mask_energy(case.maps, case.masks)


class RelevanceRank(AttributionMetric):
    name = "relevance-rank"
    needs_masks = True

    def score(self, case):
        from convlens import relevance_rank_accuracy

        return relevance_rank_accuracy(case.maps, case.masks)


class PointingGame(AttributionMetric):
    name = "pointing-game"
    needs_masks = True

    def score(self, case):
        import torch

        masks = case.masks.to(case.maps.device)
        peaks = input_peaks(case.maps.float(), tuple(masks.shape[-2:]))
        rows = torch.arange(len(peaks), device=peaks.device)
        return masks[rows, peaks[:, 0], peaks[:, 1]].float()


@hookimpl
def register_metrics(register):
    register(
        MetricSpec(
            name="mask-energy",
            factory=MaskEnergy,
            summary="share of the map's (non-negative) energy inside the object's mask (energy-based pointing game; "
            "higher is better)",
            aliases=("energy-pointing-game",),
        )
    )
    register(
        MetricSpec(
            name="relevance-rank",
            factory=RelevanceRank,
            summary="relevance rank accuracy: share of the map's top-K pixels inside the mask, K its size "
            "(Arras et al. 2022; higher is better)",
            aliases=("relevance-rank-accuracy",),
        )
    )
    register(
        MetricSpec(
            name="pointing-game",
            factory=PointingGame,
            summary="whether the map's peak lies on the object's mask (Zhang et al. 2018; higher is better)",
        )
    )
