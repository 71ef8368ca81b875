"""Feature visualisation by optimisation (paper 001 sec. 9.2; course notes 002 sec. 3; slides 003).

Images are optimised so that objectives (a unit, a channel, a layer, a direction, an SAE latent, a class logit, or
weighted sums of those) become large; presets give the paper's naive and improved approaches and a Fourier
variant. Every parameter left unset takes the preset's value. The torch side lives in ``feature_viz_*`` modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from convlens import Params, VisualizerSpec, hookimpl, param

# The random transforms of the improved and Fourier presets, lucid's (its standard transforms: scale 0.9-1.1, rotation
# up to 10 degrees, jitter of 8 and then 4 pixels at 224, here 5 % of the size) and no flip: under a flip half of
# the time the objective is the mean over an image and its mirror, so an orientation- or handedness-selective unit
# is drawn mirrored or both ways. On the planted detectors of tests/test_feature_viz_planted.py the earlier scale
# 0.8-1.2, rotation 15, translation 20 % and flip 0.5 drew the 45- and 30-degree gratings at 136 and 157 degrees and
# lost the colour sequence's handedness, at 0.54-0.90x (improved) and 0.52-0.56x (fourier) of the objective of the
# detector's own pattern; these transforms give every orientation within 6 degrees, the handedness, and 1.13-1.25x
# (improved) and, with the Fourier learning rate raised from 0.1 to 0.2, 0.86-0.87x (fourier).
TRANSFORMS: dict[str, object] = {"scale": (0.9, 1.1), "rotation": 10.0, "translation": 0.05, "flip": 0.0, "jitter": 0}

PRESETS: dict[str, dict[str, object]] = {
    # sec. 9.2.1: Adam on the pixels of a noise image, nothing else
    "naive": {
        "steps": 200,
        "lr": 0.05,
        "parameterisation": "pixels",
        "decorrelate": False,
        "tv_weight": 0.0,
        "blur": 0.0,
        "scale": (1.0, 1.0),
        "rotation": 0.0,
        "translation": 0.0,
        "flip": 0.0,
        "jitter": 0,
        "init_std": 1.0,
    },
    # sec. 9.2.2-9.2.3: total variation, blur after each step, random affine transforms, colour decorrelation
    "improved": {
        "steps": 200,
        "lr": 1.0,
        "parameterisation": "pixels",
        "decorrelate": True,
        "tv_weight": 1e-3,
        "blur": 0.3,
        **TRANSFORMS,
        "init_std": 1.0,
    },
    # 002 sec. 3.3: a 1/f-scaled Fourier basis and decorrelated colours as preconditioning, plus the transforms
    "fourier": {
        "steps": 200,
        "lr": 0.2,
        "parameterisation": "fourier",
        "decorrelate": True,
        "tv_weight": 0.0,
        "blur": 0.0,
        **TRANSFORMS,
        "init_std": 0.01,
    },
}

OBJECTIVE_FORMS = ("channel", "neuron", "layer", "class", "direction", "random-direction")


@dataclass(frozen=True)
class FeatureVizParams(Params):
    preset: Literal["naive", "improved", "fourier"] = param(
        "improved", help="starting values of every setting below that is left unset"
    )
    objective: Literal["channel", "neuron", "layer", "class", "direction", "random-direction"] = param(
        "channel",
        help="what each unit becomes: channel (mean over the map; an SAE latent's mean with --sae), "
        "neuron (one position), layer (mean square of the whole layer; units ignored), class (a logit), direction "
        "(with --sae: the latent's decoder atom as a direction of the layer), random-direction (the unit is the "
        "seed of a random direction)",
    )
    objectives: str = param(
        "",
        help="extra objectives separated by ';', each a weighted sum of terms, e.g. "
        "'channel:3 - 0.5*channel:7; neuron:2@4,4; latent:11; class:5; random-direction:1'",
    )
    position: tuple[int, int] | None = param(None, help="y,x of neuron objectives (default: the centre)")
    size: int | None = param(None, min=8, help="image size in pixels (default: the model's input size)")
    batch_size: int = param(32, min=1, help="objectives optimised together, one image each")
    steps: int | None = param(None, min=1, help="optimisation steps")
    lr: float | None = param(None, min=0.0, help="Adam learning rate")
    parameterisation: Literal["pixels", "fourier"] | None = param(
        None, help="pixels, or Fourier coefficients scaled by 1/frequency"
    )
    decorrelate: bool | None = param(
        None, help="optimise in decorrelated colour space (Cholesky factor of the colour covariance)"
    )
    colour_data: str = param(
        "", help="image folder to estimate the colour covariance from (default: a built-in ImageNet estimate)"
    )
    tv_weight: float | None = param(None, min=0.0, help="weight of the total-variation penalty")
    blur: float | None = param(
        None, min=0.0, help="standard deviation in pixels of a Gaussian blur of the image after each step (0: off)"
    )
    scale: tuple[float, float] | None = param(None, help="range of the random scaling, e.g. 0.8,1.2")
    rotation: float | None = param(None, min=0.0, max=180.0, help="random rotation up to +- this many degrees")
    translation: float | None = param(
        None, min=0.0, max=1.0, help="random translation up to this fraction of the image size"
    )
    flip: float | None = param(
        None,
        min=0.0,
        max=1.0,
        help="probability of a horizontal flip (no preset flips: it draws orientation- and handedness-selective units "
        "mirrored or both ways)",
    )
    jitter: int | None = param(None, min=0, help="random shift up to this many pixels")
    init_std: float | None = param(None, min=0.0, help="standard deviation of the starting noise")
    snapshots: tuple[int, ...] = param((), help="steps at which to keep the image too (0: the start), e.g. 0,10,50,200")
    retries: int = param(
        2,
        min=0,
        help="a render that ends no higher than its start is run again from another seed up to this many times; "
        "the highest is kept",
    )
    grid: bool = param(True, help="also write every image in one grid.png")
    seed: int = param(0, help="seed; each objective's randomness derives from it and the objective's text")

    def resolved(self) -> dict[str, object]:
        """The optimisation settings: the preset's values, overridden by those given."""
        settings = dict(PRESETS[self.preset])
        for key in settings:
            value = getattr(self, key)
            if value is not None:
                settings[key] = value
        return settings


@hookimpl
def register_visualizers(register):
    register(
        VisualizerSpec(
            name="feature-viz",
            factory="convlens.plugins.visualizers.feature_viz.render:FeatureVisualizer",
            params=FeatureVizParams,
            summary="images optimised to excite units, directions, SAE latents or classes; naive, improved and "
            "Fourier presets (paper sec. 9.2)",
            aliases=("feature-visualisation", "feature-visualization"),
        )
    )
