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

NO_TRANSFORMS: dict[str, object] = {"scale": (1.0, 1.0), "rotation": 0.0, "translation": 0.0, "flip": 0.0, "jitter": 0}

# steps at the start whose ReLU, ReLU6 and max-pool gradients are redirected (lucid's redirected ReLU; redirect.py)
REDIRECT_STEPS = 16

PRESETS: dict[str, dict[str, object]] = {
    # sec. 9.2.1: Adam on the pixels of a noise image, nothing else
    "naive": {
        "steps": 200,
        "lr_schedule": "constant",
        "lr": 0.05,
        "parameterisation": "pixels",
        "decorrelate": False,
        "tv_weight": 0.0,
        "blur": 0.0,
        **NO_TRANSFORMS,
        "init_std": 1.0,
        "redirect_steps": 0,
    },
    # sec. 9.2.2-9.2.3: total variation, blur after each step, random affine transforms, colour decorrelation
    "improved": {
        "steps": 200,
        "lr_schedule": "constant",
        "lr": 1.0,
        "parameterisation": "pixels",
        "decorrelate": True,
        "tv_weight": 1e-3,
        "blur": 0.3,
        **TRANSFORMS,
        "init_std": 1.0,
        "redirect_steps": REDIRECT_STEPS,
    },
    # 002 sec. 3.3: a 1/f-scaled Fourier basis and decorrelated colours as preconditioning, plus the transforms
    "fourier": {
        "steps": 200,
        "lr_schedule": "constant",
        "lr": 0.2,
        "parameterisation": "fourier",
        "decorrelate": True,
        "tv_weight": 0.0,
        "blur": 0.0,
        **TRANSFORMS,
        "init_std": 0.01,
        "redirect_steps": REDIRECT_STEPS,
    },
    # feature inversion (002 sec. 3.5): the Fourier basis without transforms, blur or total variation, so that the
    # image can reproduce the photo's activations where they are; on efficientnet-lite0 (_blocks.3, 8 and 12, three
    # photos, 96 px) the relative error after 1,000 steps was 0.065-0.112 (pixels at 0.1: 0.11-0.18), after 2,000
    # 0.072-0.094 on the two hardest of those
    "inversion": {
        "steps": 2000,
        "lr_schedule": "constant",
        "lr": 0.05,
        "parameterisation": "fourier",
        "decorrelate": True,
        "tv_weight": 0.0,
        "blur": 0.0,
        **NO_TRANSFORMS,
        "init_std": 0.01,
        "redirect_steps": 0,
    },
}

OBJECTIVE_FORMS = ("channel", "neuron", "layer", "class", "direction", "random-direction", "inversion", "caricature")


@dataclass(frozen=True)
class FeatureVizParams(Params):
    preset: Literal["naive", "improved", "fourier", "inversion"] = param(
        "improved",
        help="starting values of every setting below that is left unset (inversion: for --objective inversion, "
        "the Fourier basis without transforms, 2,000 steps)",
    )
    objective: Literal[
        "channel", "neuron", "layer", "class", "direction", "random-direction", "inversion", "caricature"
    ] = param(
        "channel",
        help="what each unit becomes: channel (mean over the map; an SAE latent's mean with --sae), "
        "neuron (one position), layer (mean square of the whole layer; units ignored), class (a logit), direction "
        "(with --sae: the latent's decoder atom as a direction of the layer), random-direction (the unit is the "
        "seed of a random direction); inversion and caricature (units ignored) reproduce or exaggerate the layer's "
        "activations on --image",
    )
    image: str = param(
        "",
        help="the photo of the inversion and caricature objectives, read with the model's preprocessing at the "
        "render size",
    )
    cosine_power: float = param(
        1.0, min=0.0, help="caricature: exponent of the cosine similarity that multiplies the dot product"
    )
    objectives: str = param(
        "",
        help="extra objectives separated by ';', each a weighted sum of terms, e.g. "
        "'channel:3 - 0.5*channel:7; neuron:2@4,4; latent:11; class:5; random-direction:1'",
    )
    interpolate: str = param(
        "",
        help="two objectives 'A; B' (e.g. 'channel:3; channel:7'): --frames images from A to B, (1-t) A + t B, "
        "all started from the same image so that neighbouring frames line up",
    )
    frames: int = param(6, min=2, help="images of an --interpolate, A and B included")
    position: tuple[int, int] | None = param(None, help="y,x of neuron objectives (default: the centre)")
    size: int | None = param(None, min=8, help="image size in pixels (default: the model's input size)")
    batch_size: int = param(32, min=1, help="objectives optimised together, one image each")
    steps: int | None = param(None, min=1, help="optimisation steps")
    lr: float | None = param(None, min=0.0, help="Adam learning rate")
    lr_schedule: Literal["constant", "cosine"] | None = param(
        None, help="constant, or cosine: from --lr down to 0 over the steps"
    )
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
    redirect_steps: int | None = param(
        None,
        min=0,
        help="first steps in which the gradient passes dead ReLU/ReLU6 modules and spreads over max-pool windows "
        "(lucid's redirected ReLU; the forward pass is unchanged)",
    )
    diversity: int = param(
        1,
        min=1,
        help="images per objective, pushed apart by the similarity of their layer's Gram matrices (002 sec. 3.4)",
    )
    diversity_weight: float = param(
        0.25, min=0.0, help="weight of the diversity penalty, as a share of each image's objective value"
    )
    transparency: float = param(
        0.0,
        min=0.0,
        help="> 0: images get an alpha channel (RGBA PNGs), are seen on random backgrounds while optimised, and "
        "their mean opacity costs this share of the objective (002 sec. 3.6)",
    )
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
