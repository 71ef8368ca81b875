"""What a model, a filter, a visualizer and an attribution metric object must provide (the SAE base is
:class:`convlens.SparseAutoencoder`, in the sae stage).

:meth:`Visualizer.visualize` returns a run's results in memory as well as in files: :func:`capture_outputs` reads
back every picture, tensor file and JSON record written into its output folder, whoever wrote it.

This module imports no torch at load time, so plugin modules can subclass these bases and still be listed
without importing torch.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import json
import tempfile
import types
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional

from convlens.core.errors import ContractError
from convlens.core.params import Params, param

if TYPE_CHECKING:
    import torch
    from PIL import Image
    from torch import nn


@dataclasses.dataclass
class ModelBundle:
    """A network plus everything needed to feed it images."""

    module: nn.Module
    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    default_layer: str
    class_names: tuple[str, ...] | None = None
    crop_fraction: float = 1.0  # eval transform: resize the shorter side to size / crop_fraction, crop the centre

    def named_layers(self) -> dict[str, nn.Module]:
        """Every named sub-module, by its dotted name."""
        return {name: module for name, module in self.module.named_modules() if name}


@dataclasses.dataclass
class FilterContext:
    """What a filter may need beyond the activations. Every field is optional."""

    model: ModelBundle | None = None
    images: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    layer: str | None = None
    gradients: torch.Tensor | None = None  # d target / d activations, when the filter needs_gradients


class ActivationFilter(abc.ABC):
    """Maps activations ``A[N, C, H, W]`` to non-negative patch weights ``W[N, H, W]``.

    Subclasses implement :meth:`weights`; calling the filter checks the input and the output shape and
    sign, so a broken third-party filter fails with its name rather than corrupting a sampling run.
    """

    name: str = "filter"
    #: A filter that needs the gradient of a target with respect to the activations sets this and implements
    #: :meth:`gradient_target`; the extraction pipeline then computes both in one pass and passes
    #: ``context.gradients``.
    needs_gradients: bool = False

    def __init__(self, params: Any = None):
        self.params = params

    def gradient_target(self, logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Per image, the value whose gradient the filter needs (only when :attr:`needs_gradients`)."""
        raise ContractError(f"filter '{self.name}' sets needs_gradients but does not define gradient_target")

    @abc.abstractmethod
    def weights(self, activations: torch.Tensor, context: FilterContext) -> torch.Tensor:
        """Patch weights ``W[N, H, W]`` for activations ``A[N, C, H, W]``."""

    def __call__(self, activations: torch.Tensor, context: FilterContext | None = None) -> torch.Tensor:
        if activations.ndim != 4:
            raise ContractError(
                f"filter '{self.name}' expects activations of shape [N, C, H, W], got {tuple(activations.shape)}"
            )
        result = self.weights(activations, context or FilterContext())
        expected = (activations.shape[0], activations.shape[2], activations.shape[3])
        if tuple(result.shape) != expected:
            raise ContractError(
                f"filter '{self.name}' returned weights of shape {tuple(result.shape)}, expected {expected}"
            )
        if bool((result < 0).any()):
            raise ContractError(f"filter '{self.name}' returned negative weights")
        return result


@dataclasses.dataclass
class VisualTarget:
    """What a visualizer looks at: units of one layer of a model, optionally through an SAE, and images.

    ``data`` is an image file or folder, or a list of image files (see :func:`convlens.images_at`); visualizers
    that read images set :attr:`Visualizer.needs_data`.
    """

    model: ModelBundle
    layer: str
    units: tuple[int, ...] = ()
    sae: Any = None
    data: str | Path | Sequence[str | Path] | None = None
    #: The compute precision (``--dtype``): "float32", or "bfloat16" / "float16" run under
    #: :func:`convlens.autocast`; results are written in float32 either way.
    dtype: str = "float32"


#: What :func:`capture_outputs` reads back, by suffix: pictures, tensors and JSON records.
OUTPUT_SUFFIXES = frozenset({".png", ".safetensors", ".json"})


@dataclasses.dataclass(eq=False)
class Outputs:
    """The files written under ``folder`` while :func:`capture_outputs` watched it, read back: ``images`` maps each
    PNG's path relative to ``folder`` (``/``-separated) to its PIL image, ``tensors`` each safetensors file's path to
    its ``{name: tensor}`` (on the CPU), ``records`` each JSON file's path to its value; in path order."""

    folder: Path
    images: dict[str, Image.Image] = dataclasses.field(default_factory=dict)
    tensors: dict[str, dict[str, torch.Tensor]] = dataclasses.field(default_factory=dict)
    records: dict[str, Any] = dataclasses.field(default_factory=dict)


@contextlib.contextmanager
def capture_outputs(folder: str | Path) -> Iterator[Outputs]:
    """Read back every PNG, safetensors and JSON file the block writes (creates or replaces) under ``folder``,
    whoever writes it, when the block ends; files that were there before and stay untouched are left out. Works
    around any call, e.g. ``with capture_outputs(out) as outputs: convlens.compare_filters(..., out, ...)``."""
    outputs = Outputs(Path(folder))
    before = _file_stamps(outputs.folder)
    yield outputs
    after = _file_stamps(outputs.folder)
    for relative in sorted(path for path, stamp in after.items() if before.get(path) != stamp):
        _read_back(outputs, relative)


def _file_stamps(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Each output file under ``folder``: its path relative to it, and what changes when it is written."""
    if not folder.is_dir():
        return {}
    stamps: dict[str, tuple[int, int, int]] = {}
    for path in folder.rglob("*"):
        if path.suffix in OUTPUT_SUFFIXES and not path.name.startswith(".") and path.is_file():
            status = path.stat()
            stamps[path.relative_to(folder).as_posix()] = (status.st_ino, status.st_mtime_ns, status.st_size)
    return stamps


def _read_back(outputs: Outputs, relative: str) -> None:
    path = outputs.folder / relative
    if path.suffix == ".png":
        from PIL import Image

        with Image.open(path) as picture:
            outputs.images[relative] = picture.copy()
    elif path.suffix == ".safetensors":
        from safetensors.torch import load_file

        outputs.tensors[relative] = load_file(str(path))
    else:
        outputs.records[relative] = json.loads(path.read_text())


@dataclasses.dataclass(eq=False)
class Visualization:
    """A visualizer run in memory (:meth:`Visualizer.visualize`): its JSON ``record`` (as its file holds it), and
    every picture, tensor file and JSON file it wrote, by its path in the output folder (see :class:`Outputs`).
    ``out_dir`` is the folder that holds the files, or None when they went to a temporary folder, removed since."""

    name: str
    record: dict[str, Any]
    images: dict[str, Image.Image]
    tensors: dict[str, dict[str, torch.Tensor]]
    records: dict[str, Any]
    out_dir: Path | None

    @property
    def summary(self) -> str:
        """The record's one-line summary ('' when it has none)."""
        return str(self.record.get("summary") or "")

    def __repr__(self) -> str:
        return (
            f"<Visualization {self.name}: {len(self.images)} images, {len(self.tensors)} tensor files, "
            f"out_dir={str(self.out_dir) if self.out_dir else None}{'; ' + self.summary if self.summary else ''}>"
        )


class Visualizer(abc.ABC):
    """Writes PNG images and a JSON record about a :class:`VisualTarget` into a folder (:meth:`run`), or returns
    them in memory as well (:meth:`visualize`)."""

    name: str = "visualizer"
    #: Set when :meth:`run` reads images from ``target.data``; the CLI then requires ``--data``
    #: (:class:`convlens.ImageVisualizer` sets it and adds the image batching).
    needs_data: bool = False
    #: Set when the visualizer explains one unit at a time on images it is given (an attribution map); the
    #: workflow then runs it once per top unit, on that unit's own top images.
    explains_units_on_images: bool = False
    #: Parameters that take the output folder of another visualizer, by that visualizer's registry name; the
    #: workflow fills each one it was not given with that visualizer's folder in the same run, when it ran first.
    reads_outputs_of: Mapping[str, str] = types.MappingProxyType({})

    def __init__(self, params: Any = None):
        self.params = params
        #: ``None``: a progress bar when the output is a terminal; ``False``: never (set by the CLI for --json).
        self.progress: bool | None = None

    @abc.abstractmethod
    def run(self, target: VisualTarget, out_dir: Path) -> dict[str, Any]:
        """Write the artifacts into ``out_dir`` and return the JSON record that was written.

        A record may carry a one-line ``"summary"``, which ``convlens visualize`` prints at the end.
        """

    def visualize(self, target: VisualTarget, out_dir: str | Path | None = None) -> Visualization:
        """:meth:`run`, returning the record with every picture, tensor file and JSON file the run wrote, read back
        into memory. Without ``out_dir`` the files go to a temporary folder that is removed before this returns
        (what was read stays; :attr:`Visualization.out_dir` is None)."""
        if out_dir is not None:
            return self._visualized(target, Path(out_dir))
        with tempfile.TemporaryDirectory(prefix=f"convlens-{self.name}-") as scratch:
            return dataclasses.replace(self._visualized(target, Path(scratch)), out_dir=None)

    def _visualized(self, target: VisualTarget, out_dir: Path) -> Visualization:
        with capture_outputs(out_dir) as outputs:
            record = self.run(target, out_dir)
        # the record as its JSON file holds it (tuples as lists); a value JSON cannot hold is kept as its text
        written = json.loads(json.dumps(record, default=str))
        return Visualization(self.name, written, outputs.images, outputs.tensors, outputs.records, out_dir)


@dataclasses.dataclass
class MetricCase:
    """What an attribution metric scores: ``method`` (an attribution visualizer) explained ``images`` (normalised,
    ``[N, C, H, W]``) of ``model`` at ``layer`` for ``target`` (an ``ExplainTarget`` with its classes fixed), giving
    ``maps`` ``[N, h, w]``. ``masks`` (bool ``[N, H, W]`` at the input's size) are the objects' foreground, when the
    data has them; ``shuffled_model`` is the same architecture trained on the same images with shuffled labels,
    when one was trained. Perturbation metrics score copies ``batch_size`` at a time; ``seed`` seeds any draw."""

    model: ModelBundle
    method: Any
    images: torch.Tensor
    layer: str
    target: Any
    maps: torch.Tensor
    masks: torch.Tensor | None = None
    shuffled_model: ModelBundle | None = None
    batch_size: int = 64
    seed: int = 0


class AttributionMetric(abc.ABC):
    """Scores an attribution method's maps, one value per image (:meth:`score`)."""

    name: str = "metric"
    #: Whether a larger value means a better attribution (a more faithful or better localised one, or one that
    #: depends more on the model: the randomisation checks report a correlation, where lower is better).
    higher_is_better: bool = True
    #: Set when :meth:`score` reads ``case.masks``; without masks the metric does not apply.
    needs_masks: bool = False
    #: Set when :meth:`score` reads ``case.shuffled_model``; without one the metric does not apply.
    needs_shuffled_model: bool = False

    def __init__(self, params: Any = None):
        self.params = params

    @abc.abstractmethod
    def score(self, case: MetricCase) -> torch.Tensor:
        """Per image, the metric's value ``[N]`` (NaN where it is undefined)."""

    def applies_to(self, case: MetricCase) -> bool:
        """Whether ``case`` carries what the metric needs."""
        return (case.masks is not None or not self.needs_masks) and (
            case.shuffled_model is not None or not self.needs_shuffled_model
        )


@dataclasses.dataclass(frozen=True)
class SAEParams(Params):
    """Dimensions every SAE plugin's parameters start with; plugins subclass this and add their own."""

    input_dim: int = param(512, min=1, help="channels of the activations (the trainer sets it from the store)")
    latent_dim: Optional[int] = param(None, min=1, help="latent dimension (default: expansion x input_dim)")
    expansion: float = param(
        8.0,
        min=0.001,
        help="latent dimension as a multiple of input_dim, when latent_dim "
        "is not given (x8 in the paper's runs, sec. 8.3)",
    )
    seed: int = param(0, help="seed of the random initialisation")
    init_directions: Literal["random", "data"] = param(
        "random",
        help="random: the decoder atoms and encoder rows start as random unit directions; data: as distinct training "
        "rows (unit norm), which helped on planted sparse data and lowered variance explained on conv activations",
    )

    @property
    def latents(self) -> int:
        return self.latent_dim if self.latent_dim is not None else max(1, round(self.expansion * self.input_dim))
