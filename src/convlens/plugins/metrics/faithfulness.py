"""Faithfulness metrics: how the model's score for the explained class falls when the pixels a map ranks first are
removed (deletion, RISE, Petsiuk et al. 2018, sec. 4.1), rises when they are inserted into a blurred image
(insertion), and ROAD's debiased version of both (Rong et al. 2022: removed pixels are imputed from their
neighbours, so the removal itself leaks no shape). Scores are the softmax probability of the class by default."""

from __future__ import annotations

from dataclasses import dataclass

from convlens import (
    AttributionMetric,
    MetricSpec,
    Params,
    hookimpl,
    param,
    target_scorer,
)

SCORES = ("probability", "logit")


@dataclass(frozen=True)
class CurveParams(Params):
    steps: int = param(32, min=2, help="points of the curve: pixels removed or inserted in this many equal steps")
    score: str = param("probability", choices=SCORES, help="the class's softmax probability or its logit")


@dataclass(frozen=True)
class ROADParams(Params):
    percentiles: str = param("10,20,30,40,50,60,70,80,90", help="the removal percentiles, comma-separated")
    noise: float = param(0.01, min=0.0, help="standard deviation of the noise added to imputed pixels")
    score: str = param("probability", choices=SCORES, help="the class's softmax probability or its logit")


def scorer_of(case, score):
    return target_scorer(case.model, case.target, probability=score == "probability")


class Deletion(AttributionMetric):
    """Area under the deletion curve (lower: the map finds the pixels the score depends on)."""

    name = "deletion"
    higher_is_better = False

    def score(self, case):
        from convlens import deletion_insertion

        p = self.params or CurveParams()
        scorer = scorer_of(case, p.score)
        curves = deletion_insertion(
            scorer, case.images, case.maps, steps=p.steps, batch_size=case.batch_size, curves=("deletion",)
        )
        return curves["deletion_auc"]


class Insertion(AttributionMetric):
    """Area under the insertion curve (higher: the map's first pixels restore the score)."""

    name = "insertion"

    def score(self, case):
        from convlens import deletion_insertion

        p = self.params or CurveParams()
        scorer = scorer_of(case, p.score)
        curves = deletion_insertion(
            scorer, case.images, case.maps, steps=p.steps, batch_size=case.batch_size, curves=("insertion",)
        )
        return curves["insertion_auc"]


class ROAD(AttributionMetric):
    """ROAD combined: the mean over percentiles of (LeRF - MoRF) / 2 (higher is better)."""

    name = "road"

    def score(self, case):
        import torch

        from convlens import road

        p = self.params or ROADParams()
        percentiles = [float(value) for value in p.percentiles.split(",") if value.strip()]
        generator = torch.Generator(device=case.images.device).manual_seed(case.seed)
        result = road(
            scorer_of(case, p.score),
            case.images,
            case.maps,
            percentiles=percentiles,
            noise=p.noise,
            generator=generator,
            batch_size=case.batch_size,
        )
        return result["combined"]


@hookimpl
def register_metrics(register):
    register(
        MetricSpec(
            name="deletion",
            factory=Deletion,
            params=CurveParams,
            summary="area under the deletion curve: the class probability as the map's top pixels are removed "
            "(RISE; lower is better)",
        )
    )
    register(
        MetricSpec(
            name="insertion",
            factory=Insertion,
            params=CurveParams,
            summary="area under the insertion curve: the class probability as the map's top pixels are put back "
            "into a blurred image (RISE; higher is better)",
        )
    )
    register(
        MetricSpec(
            name="road",
            factory=ROAD,
            params=ROADParams,
            summary="ROAD: removal with noisy linear imputation, (LeRF - MoRF) / 2 over percentiles "
            "(Rong et al. 2022; higher is better)",
            aliases=("remove-and-debias",),
        )
    )
