"""Objectives of feature visualisation: weighted sums of terms on a layer's activations, an SAE's latents or the
logits (002 sec. 3.2, Figure 7, and sec. 3.4), parsed from text and evaluated for a whole batch at once.

Grammar of one objective: ``[-] [w*]term {(+|-) [w*]term}``, a term being ``channel:C``, ``neuron:C[@y,x]``,
``layer``, ``class:K``, ``latent:K``, ``latent-neuron:K[@y,x]``, ``direction:K`` (an SAE latent's decoder atom),
``random-direction:S`` (a random unit vector drawn from seed S), ``l2`` (the mean square of the model's normalised
input: ``class:K - 0.05*l2`` is the class visualisation of Simonyan et al. with an L2 penalty, slides 003).
From Python, :meth:`Objective.direction`, :meth:`Objective.inversion` and :meth:`Objective.caricature` take a
vector or an image's activations.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re

import torch

from convlens import ConvlensError, torch_generator

# longest first, so that "latent-neuron" is not read as "latent" minus "neuron"
TERM_KINDS = (
    "random-direction",
    "latent-neuron",
    "direction",
    "channel",
    "neuron",
    "latent",
    "layer",
    "class",
    "l2",
)
_INDEXED = set(TERM_KINDS) - {"layer", "l2"}
_TARGETED = ("vector", "inversion", "caricature")  # terms made from Python with a tensor
_POSITIONED = {"neuron", "latent-neuron"}
_TERM = re.compile(
    r"\s*(?P<sign>[+-])?\s*(?:(?P<weight>\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)\s*\*\s*)?"
    r"(?P<kind>" + "|".join(re.escape(kind) for kind in TERM_KINDS) + r")"
    r"(?::(?P<index>\d+))?(?:@(?P<y>\d+),(?P<x>\d+))?\s*"
)


@dataclasses.dataclass(frozen=True)
class Term:
    kind: str
    index: int | None = None
    position: tuple[int, int] | None = None  # neuron terms; None: the centre of the map
    weight: float = 1.0
    # kind "vector": the direction [C]; "inversion" and "caricature": an image's activations [C, h, w]
    vector: torch.Tensor | None = dataclasses.field(default=None, compare=False)
    power: float = 0.0  # caricature: the exponent of the cosine similarity

    def text(self) -> str:
        if self.kind in _TARGETED:
            digest = hashlib.sha256(self.vector.detach().float().cpu().numpy().tobytes()).hexdigest()[:8]
            power = f"^{self.power:g}" if self.kind == "caricature" and self.power else ""
            return f"{self.kind}-{digest}{power}"
        body = self.kind + (f":{self.index}" if self.index is not None else "")
        if self.position is not None:
            body += f"@{self.position[0]},{self.position[1]}"
        return body


@dataclasses.dataclass(frozen=True)
class Objective:
    """A weighted sum of terms; ``seed_key``, when set, is the text its random start and transforms derive from
    instead of its label (the frames of an interpolation share one)."""

    terms: tuple[Term, ...]
    seed_key: str | None = dataclasses.field(default=None, compare=False)

    @classmethod
    def direction(cls, vector: torch.Tensor, weight: float = 1.0) -> Objective:
        """A direction in the layer's channel space given as a vector (e.g. a patch's activations)."""
        return cls((Term("vector", weight=weight, vector=torch.as_tensor(vector).detach().flatten().float().cpu()),))

    @classmethod
    def inversion(cls, activations: torch.Tensor, weight: float = 1.0) -> Objective:
        """Feature inversion (002 sec. 3.5): reproduce an image's activations ``[C, h, w]`` at the layer. Its value
        is minus the squared relative error, -||A(x) - A||^2 / ||A||^2, so 0 is a perfect reproduction."""
        return cls((Term("inversion", weight=weight, vector=_activation_map(activations)),))

    @classmethod
    def caricature(cls, activations: torch.Tensor, power: float = 1.0, weight: float = 1.0) -> Objective:
        """Caricature (002 sec. 3.5): push the layer further along an image's activations ``[C, h, w]``. Its value
        is <A(x), A> / ||A||^2 times the absolute cosine of the two to ``power``: 1 for the image itself, more for
        what exaggerates what the layer sees in it."""
        return cls((Term("caricature", weight=weight, vector=_activation_map(activations), power=power),))

    def __add__(self, other: Objective) -> Objective:
        """The sum of two objectives (e.g. two units' interaction, 002 sec. 3.2)."""
        return Objective(self.terms + other.terms)

    def __mul__(self, factor: float) -> Objective:
        return Objective(tuple(dataclasses.replace(term, weight=term.weight * factor) for term in self.terms))

    __rmul__ = __mul__

    @property
    def label(self) -> str:
        parts = []
        for term in self.terms:
            magnitude = abs(term.weight)
            body = term.text() if magnitude == 1 else f"{magnitude:g}*{term.text()}"
            sign = "-" if term.weight < 0 else "+"
            parts.append(("-" if sign == "-" else "") + body if not parts else f" {sign} {body}")
        return "".join(parts)

    @property
    def needs_logits(self) -> bool:
        return any(term.kind == "class" for term in self.terms)

    @property
    def needs_inputs(self) -> bool:
        return any(term.kind == "l2" for term in self.terms)

    @property
    def needs_sae(self) -> bool:
        return any(term.kind in ("latent", "latent-neuron", "direction") for term in self.terms)


def _activation_map(activations: torch.Tensor) -> torch.Tensor:
    activations = torch.as_tensor(activations).detach().float().cpu()
    if activations.ndim == 4 and len(activations) == 1:
        activations = activations[0]
    if activations.ndim != 3:
        raise ConvlensError(f"an image's activations are [C, h, w], got {tuple(activations.shape)}")
    return activations


def interpolation(first: Objective, last: Objective, frames: int) -> list[Objective]:
    """``frames`` objectives from ``first`` to ``last``, (1 - t) first + t last for t evenly from 0 to 1 (002 sec.
    3.2, Figure 8). They share one seed key, so every frame starts from the same image and sees the same random
    transforms: neighbouring frames stay aligned (the same layout) without coupling their optimisation."""
    if frames < 2:
        raise ConvlensError(f"an interpolation needs at least 2 frames, got {frames}")
    key = f"interpolation {first.label} -> {last.label}"
    steps = [frame / (frames - 1) for frame in range(frames)]
    return [Objective(_mixed_terms(first, 1 - t, last, t), seed_key=key) for t in steps]


def _mixed_terms(first: Objective, a: float, last: Objective, b: float) -> tuple[Term, ...]:
    """The terms of ``a * first + b * last``, leaving out a side whose weight is zero."""
    return (first * a).terms * bool(a) + (last * b).terms * bool(b)


def parse_objective(text: str) -> Objective:
    """The objective written as ``text`` (see the module docstring); one clear error for anything else."""
    terms, position = [], 0
    text = text.strip()
    if not text:
        raise ConvlensError("empty objective")
    while position < len(text):
        match = _TERM.match(text, position)
        if match is None or match.end() == position:
            raise ConvlensError(
                f"cannot read objective '{text}' at '{text[position:]}' (terms: "
                f"{', '.join(TERM_KINDS)}; e.g. 'channel:3 - 0.5*neuron:7@2,2')"
            )
        if terms and match.group("sign") is None:
            raise ConvlensError(f"objective '{text}': terms must be joined by + or - (at '{text[position:]}')")
        kind, index = match.group("kind"), match.group("index")
        if kind in _INDEXED and index is None:
            raise ConvlensError(f"objective '{text}': '{kind}' needs an index, e.g. '{kind}:0'")
        if kind not in _INDEXED and index is not None:
            raise ConvlensError(f"objective '{text}': '{kind}' takes no index")
        if match.group("y") is not None and kind not in _POSITIONED:
            raise ConvlensError(f"objective '{text}': only neuron terms take a position (@y,x)")
        weight = float(match.group("weight") or 1.0) * (-1.0 if match.group("sign") == "-" else 1.0)
        where = (int(match.group("y")), int(match.group("x"))) if match.group("y") is not None else None
        terms.append(Term(kind, None if index is None else int(index), where, weight))
        position = match.end()
    return Objective(tuple(terms))


def unit_objectives(
    form: str, units: tuple[int, ...], position: tuple[int, int] | None, with_sae: bool
) -> list[Objective]:
    """One objective per unit: a channel, neuron, class, SAE-latent direction or random direction."""
    if form == "layer":
        return [Objective((Term("layer"),))]
    if with_sae:
        kind = {"channel": "latent", "neuron": "latent-neuron", "direction": "direction"}.get(form)
        if kind is None:
            raise ConvlensError(
                f"objective form '{form}' does not apply to SAE latents (use channel, neuron or direction)"
            )
    else:
        if form == "direction":
            raise ConvlensError(
                "the direction form needs --sae (its decoder atoms are the directions); random-direction needs none"
            )
        kind = form
    return [Objective((Term(kind, unit, position if kind in _POSITIONED else None),)) for unit in units]


@dataclasses.dataclass(frozen=True)
class Shapes:
    """What the objectives are checked against: the layer's ``[C, h, w]``, classes, SAE latents."""

    channels: int
    height: int
    width: int
    classes: int | None
    latents: int | None


def check_objective(objective: Objective, shapes: Shapes, layer: str) -> None:
    """One message naming the valid range for every index or position out of it."""
    for term in objective.terms:
        if term.kind in ("channel", "neuron"):
            limit, what = shapes.channels, f"layer '{layer}' has {shapes.channels} channels"
        elif term.kind == "class":
            if shapes.classes is None:
                raise ConvlensError(f"'{objective.label}': the model's output is not a vector of class logits")
            limit, what = shapes.classes, f"the model has {shapes.classes} classes"
        elif term.kind in ("latent", "latent-neuron", "direction"):
            if shapes.latents is None:
                raise ConvlensError(f"'{objective.label}' is about SAE latents: give an SAE (--sae PATH)")
            limit, what = shapes.latents, f"the SAE has {shapes.latents} latents"
        elif term.kind == "vector":
            if term.vector.numel() != shapes.channels:
                raise ConvlensError(
                    f"'{objective.label}': the direction has {term.vector.numel()} values, layer "
                    f"'{layer}' has {shapes.channels} channels"
                )
            continue
        elif term.kind in ("inversion", "caricature"):
            expected = (shapes.channels, shapes.height, shapes.width)
            if tuple(term.vector.shape) != expected:
                raise ConvlensError(
                    f"'{objective.label}': the image's activations are {tuple(term.vector.shape)}, layer '{layer}' "
                    f"gives {expected} at this image size (render at the size the image was read at)"
                )
            continue
        else:
            continue
        if term.index >= limit:
            raise ConvlensError(f"'{objective.label}': index {term.index} is out of range ({what}: 0..{limit - 1})")
        if term.position is not None and not (
            0 <= term.position[0] < shapes.height and 0 <= term.position[1] < shapes.width
        ):
            raise ConvlensError(
                f"'{objective.label}': position {term.position} is outside the {shapes.height} x "
                f"{shapes.width} map of layer '{layer}'"
            )


def random_direction(seed: int, channels: int) -> torch.Tensor:
    vector = torch.randn(channels, generator=torch_generator(seed, "random-direction"))
    return vector / vector.norm()


class BatchObjective:
    """The objectives of one batch (objective ``i`` belongs to image ``i``), evaluated together: terms of the same
    kind become one gather over the batch, so a batch of channel objectives costs one indexing op per step."""

    def __init__(self, objectives: list[Objective], shapes: Shapes, sae=None):
        self.count = len(objectives)
        self.needs_logits = any(objective.needs_logits for objective in objectives)
        self.needs_inputs = any(objective.needs_inputs for objective in objectives)
        self.needs_latents = any(
            term.kind in ("latent", "latent-neuron") for objective in objectives for term in objective.terms
        )
        grouped: dict[str, list[tuple[int, Term]]] = {}
        for image, objective in enumerate(objectives):
            for term in objective.terms:
                grouped.setdefault(term.kind, []).append((image, term))
        self.groups = {}
        for kind, members in grouped.items():
            images = torch.tensor([image for image, _ in members])
            weights = torch.tensor([term.weight for _, term in members])
            index = torch.tensor([term.index if term.index is not None else 0 for _, term in members])
            ys = torch.tensor([(term.position or (shapes.height // 2, shapes.width // 2))[0] for _, term in members])
            xs = torch.tensor([(term.position or (shapes.height // 2, shapes.width // 2))[1] for _, term in members])
            vectors = None
            if kind == "random-direction":
                vectors = torch.stack([random_direction(term.index, shapes.channels) for _, term in members])
            elif kind == "direction":
                with torch.no_grad():
                    atoms = sae.decoder_directions().detach().float().cpu()[index]
                vectors = atoms / atoms.norm(dim=1, keepdim=True).clamp_min(1e-12)
            elif kind == "vector":
                given = torch.stack([term.vector for _, term in members])
                vectors = given / given.norm(dim=1, keepdim=True).clamp_min(1e-12)
            elif kind in ("inversion", "caricature"):
                vectors = torch.stack([term.vector for _, term in members])
            powers = torch.tensor([term.power for _, term in members])
            self.groups[kind] = (images, weights, index, ys, xs, vectors, powers)

    def to(self, device: torch.device) -> BatchObjective:
        self.groups = {
            kind: tuple(t.to(device) if t is not None else None for t in group) for kind, group in self.groups.items()
        }
        return self

    def __call__(
        self,
        activations: torch.Tensor,
        logits: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        inputs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per image, its objective's value: ``[B]`` (``activations [B, C, h, w]``, ``latents [B, L, h, w]``,
        ``inputs``: the model's normalised input ``[B, 3, H, W]``)."""
        values = activations.new_zeros(self.count)
        for kind, (images, weights, index, ys, xs, vectors, powers) in self.groups.items():
            if kind in ("inversion", "caricature"):
                term = compared(kind, activations[images], vectors.to(activations.dtype), powers)
            elif kind == "channel":
                term = activations[images, index].mean(dim=(-2, -1))
            elif kind == "neuron":
                term = activations[images, index, ys, xs]
            elif kind == "layer":
                term = activations[images].pow(2).mean(dim=(1, 2, 3))
            elif kind == "class":
                term = logits[images, index]
            elif kind == "latent":
                term = latents[images, index].mean(dim=(-2, -1))
            elif kind == "latent-neuron":
                term = latents[images, index, ys, xs]
            elif kind == "l2":
                term = inputs[images].pow(2).mean(dim=(1, 2, 3))
            else:  # a direction in channel space: the mean over positions of its dot product with the activations
                term = torch.einsum("bchw,bc->b", activations[images], vectors.to(activations.dtype))
                term = term / (activations.shape[-2] * activations.shape[-1])
            values = values.index_add(0, images, weights.to(term.dtype) * term)
        return values


def compared(kind: str, activations: torch.Tensor, targets: torch.Tensor, power: torch.Tensor) -> torch.Tensor:
    """``[n]``: minus the squared relative error of ``activations`` to ``targets`` (inversion), or their dot product
    relative to the target's squared norm times their cosine to ``power`` (caricature); both ``[n, C, h, w]``."""
    flat, target = activations.flatten(1), targets.flatten(1)
    norm_squared = target.square().sum(1).clamp_min(1e-12)
    if kind == "inversion":
        return -(flat - target).square().sum(1) / norm_squared
    dot = (flat * target).sum(1)
    cosine = dot / (flat.norm(dim=1) * norm_squared.sqrt()).clamp_min(1e-12)
    # |cosine| ** power keeps the sign of the dot product: the value rises with the alignment over [-1, 1]
    return dot / norm_squared * cosine.abs().pow(power)
