"""The sanity checks of Adebayo et al. 2018 (course notes 002 sec. 6.3) as metrics: the Spearman rank correlation
of each image's map with the map of the same image and class under a changed model. Lower is better: a method
whose maps survive the change explains the input more than the model (an edge detector scores 1).

- cascading randomisation: the model's blocks re-initialised one after another from the output down; the value is
  the mean correlation over the steps;
- independent randomisation: one block re-initialised at a time, the others trained; the mean over the blocks;
- data randomisation: the same architecture trained on the same images with shuffled labels.
"""

from __future__ import annotations

from dataclasses import dataclass

from convlens import (
    AttributionMetric,
    MetricSpec,
    Params,
    hookimpl,
    param,
)


@dataclass(frozen=True)
class RandomisationParams(Params):
    depth: int = param(1, min=1, help="randomise modules this many levels below the model (1: its top-level blocks)")


def mean_over_steps(result):
    """Per image, the mean Spearman over the randomisation steps (the trained model's step left out)."""
    return result.spearman[1:].nanmean(dim=0)


class CascadingRandomisation(AttributionMetric):
    name = "cascading-randomisation"
    higher_is_better = False

    def score(self, case):
        from convlens import cascading_randomisation

        p = self.params or RandomisationParams()
        methods = [case.method]
        (result,) = cascading_randomisation(
            case.model, methods, case.images, case.layer, depth=p.depth, seed=case.seed, classes=case.target.classes
        )
        return mean_over_steps(result)


class IndependentRandomisation(AttributionMetric):
    name = "independent-randomisation"
    higher_is_better = False

    def score(self, case):
        from convlens import independent_randomisation

        p = self.params or RandomisationParams()
        methods = [case.method]
        (result,) = independent_randomisation(
            case.model, methods, case.images, case.layer, depth=p.depth, seed=case.seed, classes=case.target.classes
        )
        return mean_over_steps(result)


class DataRandomisation(AttributionMetric):
    name = "data-randomisation"
    higher_is_better = False
    needs_shuffled_model = True

    def score(self, case):
        from convlens import rowwise_spearman

        shuffled = case.method.explain(case.shuffled_model, case.images, case.layer, case.target)
        return rowwise_spearman(case.maps.flatten(1).cpu(), shuffled.flatten(1).cpu())


@hookimpl
def register_metrics(register):
    register(
        MetricSpec(
            name="cascading-randomisation",
            factory=CascadingRandomisation,
            params=RandomisationParams,
            summary="mean Spearman of the maps with the trained model's as its blocks are re-initialised from the "
            "output down (Adebayo et al. 2018; lower is better)",
            aliases=("cascading",),
        )
    )
    register(
        MetricSpec(
            name="independent-randomisation",
            factory=IndependentRandomisation,
            params=RandomisationParams,
            summary="mean Spearman of the maps with the trained model's, one block re-initialised at a time "
            "(Adebayo et al. 2018; lower is better)",
            aliases=("independent",),
        )
    )
    register(
        MetricSpec(
            name="data-randomisation",
            factory=DataRandomisation,
            summary="Spearman of the maps with those of the same network trained on shuffled labels "
            "(Adebayo et al. 2018; lower is better)",
            aliases=("shuffled-labels",),
        )
    )
