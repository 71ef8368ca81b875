"""The base every sparse-autoencoder plugin derives from (paper 001, sec. 8.7), and SAE checkpoints.

An SAE acts on the channel axis (axis 1): ``[N, C]`` vectors or ``[N, C, H, W]`` conv maps alike. Subclasses
implement :meth:`encode_vectors` and :meth:`decode_vectors` on ``[B, C]`` rows, :meth:`loss_terms` and
:meth:`decoder_directions`; the base moves the channel axis so the same SAE applies to a conv map position by
position, applies the optional input normalisation (kept in the checkpoint, so a loaded SAE takes raw
activations), and counts for every latent how many samples have passed since it last fired.

Checkpoints are safetensors: the state dict plus one JSON metadata entry (plugin, parameters, dimensions,
model, layer, store, metrics). :func:`load_sae` rebuilds the SAE through the registry; nothing is unpickled.
"""

from __future__ import annotations

import abc
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from convlens.core.contracts import SAEParams  # noqa: F401  (re-exported: plugins import it from here or convlens)
from convlens.core.errors import ContractError, ConvlensError
from convlens.core.params import coerce

CHECKPOINT_FORMAT = "convlens-sae/1"
METADATA_KEY = "convlens_sae"


def squared_error(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``||reconstruction - target||^2`` (the reconstruction term of sec. 8.2.1), one fused
    kernel forward and one backward."""
    return F.mse_loss(reconstruction, target, reduction="sum") / max(len(target), 1)


class SparseLatents:
    """Latents given by the only ones that may be non-zero: ``values [B, k]`` of the latents ``index [B, k]``
    (distinct within a row). Called, it builds the dense ``[B, latent_dim]`` latents; counting the active latents
    (:meth:`SAEOutput.latent_activity`) needs only the pairs. A plugin may return it from ``encode_decode``."""

    def __init__(self, index: torch.Tensor, values: torch.Tensor, latent_dim: int):
        self.index, self.values, self.latent_dim = index, values, latent_dim

    def __call__(self) -> torch.Tensor:
        dense = torch.zeros(len(self.index), self.latent_dim, dtype=self.values.dtype, device=self.values.device)
        return dense.scatter_(1, self.index, self.values)

    def activity(self) -> tuple[torch.Tensor, torch.Tensor]:
        active = self.values.detach() != 0
        rows_active = torch.zeros(self.latent_dim, dtype=torch.int64, device=active.device)
        rows_active.index_add_(0, self.index.reshape(-1), active.reshape(-1).to(torch.int64))
        return active.sum(), rows_active


class SAEOutput:
    """Reconstruction, latents and named loss terms of a forward pass. ``latents`` may be given as a
    zero-argument function; it is then built on first access (an SAE whose loss does not read its latents,
    like TopK, so never materialises a dense ``[B, latent_dim]`` tensor that nobody reads). ``activity``, when
    given, counts the active latents without them (see :meth:`latent_activity`)."""

    def __init__(
        self,
        reconstruction: torch.Tensor,
        latents: torch.Tensor | Callable[[], torch.Tensor],
        losses: dict[str, torch.Tensor],
        activity: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None,
    ):
        self.reconstruction = reconstruction
        self._latents = latents
        self.losses = losses
        self._activity = activity

    @property
    def latents(self) -> torch.Tensor:
        if callable(self._latents):
            self._latents = self._latents()
        return self._latents

    @property
    def loss(self) -> torch.Tensor:
        return sum(self.losses.values(), torch.zeros((), device=self.reconstruction.device))

    def latent_activity(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The non-zero latents over all rows (samples, or positions of a map), and per latent the rows it is
        non-zero on ``[latent_dim]`` (int64 tensors on the latents' device; nothing waits for the device)."""
        if self._activity is not None:
            return self._activity()
        latents = self.latents.detach()
        active = latents.movedim(1, -1).reshape(-1, latents.shape[1]) != 0
        return active.sum(), active.sum(0)


class SparseAutoencoder(nn.Module, abc.ABC):
    axis: int = 1
    #: The loss term that is the sparsity penalty (e.g. ``"l1"``). The base multiplies it by :attr:`penalty_scale`,
    #: which the trainer sets: a warm-up from 0 and, given a target L0, a controller (:mod:`convlens.sae.training`).
    #: None for an SAE whose sparsity is structural (TopK's k is its own target).
    penalty_term: str | None = None
    #: State-dict entries that checkpoints of an earlier version may lack; they then keep their initial values.
    optional_state: tuple[str, ...] = ()

    def __init__(self, input_dim: int, latent_dim: int):
        super().__init__()
        if input_dim < 1 or latent_dim < 1:
            raise ContractError(f"SAE dimensions must be positive (input {input_dim}, latent {latent_dim})")
        self.input_dim = input_dim
        self.latent_dim = latent_dim
        #: a float or a 0-d tensor on the SAE's device; not saved (it only shapes training)
        self.penalty_scale: float | torch.Tensor = 1.0
        #: the share of the training run's steps done before the step now running, set by the trainer before each
        #: step; 1.0 outside a run. A plugin may change how it trains with it (BatchTopK's per-sample warm-up)
        self.training_progress: float = 1.0
        self.register_buffer("input_mean", torch.zeros(input_dim))
        self.register_buffer("input_scale", torch.ones(()))
        self.register_buffer("samples_since_fired", torch.zeros(latent_dim, dtype=torch.int64))

    # --- what a plugin implements -------------------------------------------------------------------------
    @abc.abstractmethod
    def encode_vectors(self, x: torch.Tensor) -> torch.Tensor:
        """Latents ``[B, latent_dim]`` for (normalised) rows ``[B, input_dim]``."""

    @abc.abstractmethod
    def decode_vectors(self, latents: torch.Tensor) -> torch.Tensor:
        """(Normalised) reconstruction ``[B, input_dim]`` for latents ``[B, latent_dim]``."""

    @abc.abstractmethod
    def loss_terms(
        self, x: torch.Tensor, reconstruction: torch.Tensor, latents: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Named scalar loss terms (on normalised rows) whose sum is the training loss."""

    def decoder_directions(self) -> torch.Tensor:
        """The decoder's atoms as rows ``[latent_dim, input_dim]``, as a view of the parameter when possible."""
        raise ContractError(f"{type(self).__name__} does not expose its decoder directions")

    def preactivation_vectors(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder outputs ``[B, latent_dim]`` before the sparsifying non-linearity: what feature visualisation
        maximises for a latent, since a latent that is off passes no gradient. Default: the latents themselves."""
        return self.encode_vectors(x)

    def encode_decode(self, x: torch.Tensor) -> tuple[torch.Tensor | Callable[[], torch.Tensor], torch.Tensor]:
        """``(latents, reconstruction)`` of normalised rows; a plugin may fuse the two (TopK decodes sparsely).
        ``latents`` may be a zero-argument function building them, when :meth:`loss_terms` does not read them
        (it then receives that function), e.g. a :class:`SparseLatents`."""
        latents = self.encode_vectors(x)
        return latents, self.decode_vectors(latents)

    @property
    def sparsity(self) -> dict[str, float]:
        """The sparsity setting, e.g. ``{"l1": 1e-3}`` or ``{"k": 32}``."""
        return {}

    def after_step(self) -> None:
        """Called by the trainer after each optimiser step (e.g. to keep constrained weights consistent)."""

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The optimiser's parameter groups; a group's ``lr_scale`` multiplies the learning rate for its parameters
        (e.g. thresholds that must move faster than weights), and ``lr_decay: False`` exempts it from the final
        decay of the learning rate. Default: one group of every parameter."""
        return [{"params": list(self.parameters())}]

    def initialise_from_data(self, x: torch.Tensor, target_l0: float | None = None) -> None:
        """Called once before training (not when resuming) with normalised training rows ``[N, input_dim]`` and
        the run's target L0 if it has one: an SAE may set its biases or thresholds from the data (e.g. JumpReLU's
        thresholds). Default: nothing."""

    @torch.no_grad()
    def start_on_data_directions_(self, x: torch.Tensor, seed: int, *rows: torch.Tensor) -> int:
        """For :meth:`initialise_from_data` (``init_directions = "data"``): set the latents' rows of each of
        ``rows`` (e.g. the decoder atoms and the encoder rows, ``[latents, input_dim]``) to :func:`data_directions`
        of the normalised training rows ``x``; latents beyond the distinct non-zero rows keep theirs. Returns how
        many latents it set."""
        directions = data_directions(x, self.latent_dim, seed)
        for tensor in rows:
            tensor[: len(directions)] = directions.to(tensor.dtype)
        return len(directions)

    def resample_latents_(self, latents: torch.Tensor, directions: torch.Tensor) -> list[nn.Parameter]:
        """Give the dead ``latents`` (indices) new unit ``directions [n, input_dim]`` (in normalised units: what
        the SAE reconstructs worst) as decoder atoms and matching encoder rows, their biases reset (Bricken et al.
        2023, "Towards Monosemanticity", resampling). Returns the parameters whose rows (first axis: latents) it
        changed, so the trainer resets their optimiser state. Implementing it makes :attr:`supports_resampling`
        true."""
        raise ContractError(f"{type(self).__name__} does not resample dead latents")

    @property
    def supports_resampling(self) -> bool:
        return type(self).resample_latents_ is not SparseAutoencoder.resample_latents_

    def validation_metrics(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Extra sums over the rows of a validation batch ``x [B, input_dim]`` (raw, as :meth:`forward` takes
        them), which the trainer's evaluation reports divided by the number of samples beside MSE and L0 (e.g.
        Matryoshka's reconstruction error of each prefix). Called without gradients. Default: none."""
        return {}

    # --- what the base provides ---------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        rows, restore = self._to_rows(x, self.input_dim)
        return restore(self.encode_vectors(self.normalise(rows)))

    def preactivations(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`preactivation_vectors` of ``x`` (features on axis 1, like :meth:`encode`)."""
        rows, restore = self._to_rows(x, self.input_dim)
        return restore(self.preactivation_vectors(self.normalise(rows)))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        rows, restore = self._to_rows(latents, self.latent_dim)
        return restore(self.denormalise(self.decode_vectors(rows)))

    def forward(self, x: torch.Tensor) -> SAEOutput:
        rows, restore = self._to_rows(x, self.input_dim)
        normalised = self.normalise(rows)
        latents, reconstruction = self.encode_decode(normalised)
        losses = self.loss_terms(normalised, reconstruction, latents)
        if self.penalty_term in losses and not (isinstance(self.penalty_scale, float) and self.penalty_scale == 1.0):
            losses[self.penalty_term] = losses[self.penalty_term] * self.penalty_scale
        restored = (lambda: restore(latents())) if callable(latents) else restore(latents)
        activity = latents.activity if isinstance(latents, SparseLatents) else None
        return SAEOutput(restore(self.denormalise(reconstruction)), restored, losses, activity)

    def normalise(self, rows: torch.Tensor) -> torch.Tensor:
        return (rows - self.input_mean) / self.input_scale

    def denormalise(self, rows: torch.Tensor) -> torch.Tensor:
        return rows * self.input_scale + self.input_mean

    def set_normalisation(self, mean: torch.Tensor, scale: float | torch.Tensor) -> None:
        """Inputs are centred by ``mean`` and divided by ``scale`` before encoding (and the reverse after)."""
        with torch.no_grad():
            self.input_mean.copy_(torch.as_tensor(mean, dtype=self.input_mean.dtype))
            self.input_scale.copy_(torch.as_tensor(scale, dtype=self.input_scale.dtype))

    def record_activity(self, fired: torch.Tensor, samples: int) -> None:
        """Latents in ``fired`` (bool ``[latent_dim]``) fired in the last ``samples`` samples."""
        with torch.no_grad():
            self.samples_since_fired.add_(samples)
            self.samples_since_fired.masked_fill_(fired.to(self.samples_since_fired.device), 0)

    def dead_latents(self, after_samples: int) -> torch.Tensor:
        """Bool ``[latent_dim]``: latents that have not fired in the last ``after_samples`` samples."""
        return self.samples_since_fired >= after_samples

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Scale every decoder atom to unit norm (in place)."""
        directions = self.decoder_directions()
        directions.div_(directions.norm(dim=1, keepdim=True).clamp_min(1e-12))

    def _to_rows(self, x: torch.Tensor, dim: int):
        """Rows ``[B, dim]`` of ``x`` (axis 1 is the feature axis) and a function mapping rows back."""
        if x.ndim < 2 or x.shape[1] != dim:
            raise ContractError(f"{type(self).__name__} expects {dim} features on axis 1, got shape {tuple(x.shape)}")
        if x.ndim == 2:
            return x, lambda rows: rows
        moved = x.movedim(1, -1)
        spatial = moved.shape[:-1]

        def restore(rows: torch.Tensor) -> torch.Tensor:
            return rows.reshape(*spatial, rows.shape[-1]).movedim(-1, 1)

        return moved.reshape(-1, dim), restore


def save_sae(
    sae: SparseAutoencoder, path: str | Path, *, name: str, params: dict[str, Any], extra: dict[str, Any] | None = None
) -> None:
    """Write ``sae`` as safetensors with the metadata :func:`load_sae` needs (``name``: the registry name)."""
    from convlens.runtime.tensor_files import save_tensors_atomic

    metadata = {
        "format": CHECKPOINT_FORMAT,
        "sae": name,
        "params": params,
        "input_dim": sae.input_dim,
        "latent_dim": sae.latent_dim,
        **(extra or {}),
    }
    tensors = {key: value.detach().contiguous() for key, value in sae.state_dict().items()}
    save_tensors_atomic(tensors, Path(path), {METADATA_KEY: json.dumps(metadata)})


def read_sae_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of an SAE checkpoint, its shape checked; anything else is one clear error."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(METADATA_KEY)
    except (SafetensorError, OSError) as exc:
        raise ConvlensError(f"cannot read {path} as an SAE checkpoint: {exc}") from None
    if raw is None:
        raise ConvlensError(
            f"{path} is a safetensors file but not a convlens SAE checkpoint (no '{METADATA_KEY}' metadata)"
        )
    try:
        metadata = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        reason = "it is nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise ConvlensError(f"{path}: the '{METADATA_KEY}' metadata is not valid JSON ({reason})") from None
    _check_metadata(path, metadata)
    return metadata


# what each metadata key must hold; None is allowed for the optional ones
REQUIRED_METADATA = {"sae": (str,), "params": (dict,), "input_dim": (int,), "latent_dim": (int,)}
OPTIONAL_METADATA = {"format": (str,), "layer": (str,), "model": (dict, str), "store": (dict,), "metrics": (dict,)}
MAX_METADATA_DEPTH = 8


def _check_metadata(path: Path, metadata: Any) -> None:
    if not isinstance(metadata, dict):
        raise ConvlensError(f"{path}: the '{METADATA_KEY}' metadata must be a JSON object, not {_json_kind(metadata)}")
    for key, kinds in {**REQUIRED_METADATA, **OPTIONAL_METADATA}.items():
        if key not in metadata:
            if key in REQUIRED_METADATA:
                raise ConvlensError(f"{path}: the '{METADATA_KEY}' metadata has no '{key}'")
            continue
        value = metadata[key]
        if value is None and key in OPTIONAL_METADATA:
            continue
        if not isinstance(value, kinds) or isinstance(value, bool):
            expected = " or ".join(_KIND_NAMES[kind] for kind in kinds)
            raise ConvlensError(f"{path}: metadata key '{key}' must be {expected}, not {_json_kind(value)}")
    for key in ("input_dim", "latent_dim"):
        if metadata[key] < 1:
            raise ConvlensError(f"{path}: metadata key '{key}' must be positive, not {metadata[key]}")
    if metadata.get("format", CHECKPOINT_FORMAT) != CHECKPOINT_FORMAT:
        raise ConvlensError(f"{path}: metadata key 'format' is {metadata['format']!r}, expected {CHECKPOINT_FORMAT!r}")
    for name, value in metadata["params"].items():
        items = value if isinstance(value, list) else [value]
        if not all(item is None or isinstance(item, (str, int, float)) for item in items):
            raise ConvlensError(
                f"{path}: metadata key 'params.{name}' must be a number, text, true/false or a list of them, "
                f"not {_json_kind(value)}"
            )
    for key, value in metadata.items():
        if _deeper_than(value, MAX_METADATA_DEPTH):
            raise ConvlensError(f"{path}: metadata key '{key}' is nested more than {MAX_METADATA_DEPTH} levels deep")


_KIND_NAMES = {str: "text", dict: "a JSON object", int: "an integer", list: "a list"}


def _json_kind(value: Any) -> str:
    kinds = {dict: "an object", list: "a list", str: "text", bool: "true/false", int: "a number", float: "a number"}
    return kinds.get(type(value), "null")


def _deeper_than(value: Any, depth: int) -> bool:
    if not isinstance(value, (dict, list)):
        return False
    if depth == 0:
        return True
    children = value.values() if isinstance(value, dict) else value
    return any(_deeper_than(child, depth - 1) for child in children)


def load_sae(
    path: str | Path, *, input_dim: int | None = None, device: Any = None, registry: Any = None
) -> SparseAutoencoder:
    """Rebuild the SAE saved at ``path`` through the registry; ``input_dim`` (the store's or layer's channels)
    is checked against the checkpoint's. The metadata's dimensions are checked against the stored tensors before
    anything is built, and every tensor's shape, type and values before it is loaded."""
    from safetensors.torch import load_file

    from convlens.core.component_registry import default_registry

    path = Path(path)
    metadata = read_sae_metadata(path)
    if input_dim is not None and metadata["input_dim"] != input_dim:
        raise ConvlensError(
            f"{path} is an SAE for {metadata['input_dim']}-dimensional inputs, but the activations "
            f"here have {input_dim} channels"
        )
    registry = registry or default_registry()
    shapes = stored_shapes(path)
    _check_dimensions(path, metadata, shapes, registry)
    try:
        sae = registry.create("sae", metadata["sae"], **metadata["params"])
    except ConvlensError as exc:
        raise type(exc)(f"{path}: {exc}") from None
    _check_tensor_shapes(path, metadata["sae"], sae, shapes)
    state = load_file(str(path))
    # tensors that checkpoints of an earlier version do not hold keep their initial values
    state = {**{key: value for key, value in sae.state_dict().items() if key in sae.optional_state}, **state}
    _check_tensor_values(path, sae, state)
    sae.load_state_dict(state)
    return sae.to(device) if device is not None else sae


def stored_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor in a safetensors file, read from its header (nothing is loaded)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError) as exc:
        raise ConvlensError(f"cannot read {path} as an SAE checkpoint: {exc}") from None


def _check_dimensions(path: Path, metadata: dict[str, Any], shapes: dict[str, tuple[int, ...]], registry: Any) -> None:
    """The metadata's and the parameters' dimensions against the base's buffers ``input_mean [input_dim]`` and
    ``samples_since_fired [latent_dim]``, so a forged size is refused before anything of that size exists."""
    stored = {}
    for key, buffer in (("input_dim", "input_mean"), ("latent_dim", "samples_since_fired")):
        if len(shapes.get(buffer, ())) != 1:
            raise ConvlensError(
                f"{path}: tensor '{buffer}' must be one-dimensional ({key}); found {shapes.get(buffer)}"
            )
        stored[key] = shapes[buffer][0]
        if metadata[key] != stored[key]:
            raise ConvlensError(
                f"{path}: metadata key '{key}' is {metadata[key]}, but the stored tensor '{buffer}' has "
                f"shape {shapes[buffer]}"
            )
    if stored["input_dim"] * stored["latent_dim"] > sum(math.prod(shape) for shape in shapes.values()):
        raise ConvlensError(
            f"{path}: metadata keys 'input_dim' and 'latent_dim' ({stored['input_dim']} x {stored['latent_dim']}) "
            "are larger than the tensors stored in the file"
        )
    try:
        params = coerce(registry.get("sae", metadata["sae"]).spec.params, metadata["params"])
    except ConvlensError as exc:
        raise type(exc)(f"{path}: metadata key 'params': {exc}") from None
    if isinstance(params, SAEParams):
        built = {"input_dim": params.input_dim, "latent_dim": params.latents}
        for key, size in built.items():
            if size != stored[key]:
                raise ConvlensError(
                    f"{path}: metadata key 'params' gives {key} {size}, but the stored tensors have {stored[key]}"
                )


def _check_tensor_shapes(path: Path, name: str, sae: SparseAutoencoder, shapes: dict[str, tuple[int, ...]]) -> None:
    expected = {key: tuple(value.shape) for key, value in sae.state_dict().items()}
    missing, unexpected = set(expected) - set(shapes) - set(sae.optional_state), set(shapes) - set(expected)
    if missing or unexpected:
        raise ConvlensError(
            f"{path} does not match SAE '{name}': missing {sorted(missing)}, unexpected {sorted(unexpected)}"
        )
    for key, shape in expected.items():
        if key in shapes and shapes[key] != shape:
            raise ConvlensError(f"{path}: tensor '{key}' has shape {shapes[key]}, but SAE '{name}' needs {shape}")


def _check_tensor_values(path: Path, sae: SparseAutoencoder, state: dict[str, torch.Tensor]) -> None:
    for key, expected in sae.state_dict().items():
        tensor = state[key]
        if not expected.is_floating_point():
            continue
        if not tensor.is_floating_point():
            kind = str(tensor.dtype).removeprefix("torch.")
            raise ConvlensError(f"{path}: tensor '{key}' is {kind}; SAE weights must be floating point")
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise ConvlensError(
                f"{path}: tensor '{key}' holds {bad} non-finite values (NaN or inf) of {tensor.numel()}"
            )


def data_directions(x: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """Up to ``count`` distinct rows of ``x [N, D]`` drawn from ``seed``, scaled to unit norm; rows of (nearly) zero
    norm are never drawn, so fewer come back when ``x`` has fewer others. Dictionary learning commonly starts its
    atoms at training examples (K-SVD, Aharon, Elad and Bruckstein 2006, sec. V).

    As the start of an SAE's latents (``init_directions = "data"``) it helps where the data are sparse mixtures of
    many directions and hurts on the convolutional activations measured, so it is not the default. Planted dictionary
    (32 dimensions, 512 atoms, 2 active, 20,480 steps), MMCS random -> data: BatchTopK 0.87 -> 0.95, Matryoshka
    0.82 -> 0.91, JumpReLU 0.75 -> 0.83, ReLU-L1 0.92 -> 0.99 and TopK 0.99 -> 1.00 (these two measured with the
    rows uncentred). Validation FVE after 2,000 steps at
    L0 = channels / 8 on a trained tiny-cnn's block 3 (shapes) and efficientnet-lite0's block 3 (20 ImageNet photos),
    random -> data: BatchTopK 0.86 -> 0.80 and 0.70 -> 0.69, Matryoshka 0.86 -> 0.81 and 0.71 -> 0.71, TopK 0.87 ->
    0.86 and 0.71 -> 0.70, JumpReLU 0.86 -> 0.85 and 0.71 -> 0.71, ReLU-L1 0.61 -> 0.64 and 0.47 -> 0.50 (with more
    dead latents); drawing the rows far apart (k-means++ seeding) did not recover BatchTopK's 0.86 (0.81)."""
    norms = x.norm(dim=1)
    usable = (norms > 1e-6 * norms.max().clamp_min(1e-30)).nonzero().squeeze(1)
    generator = torch.Generator().manual_seed(seed)
    chosen = usable[torch.randperm(len(usable), generator=generator)[:count].to(usable.device)]
    return x[chosen] / norms[chosen, None]


def unit_rows(rows: int, columns: int, seed: int) -> torch.Tensor:
    """Random directions ``[rows, columns]`` of unit norm, from ``seed``."""
    directions = torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed))
    return directions / directions.norm(dim=1, keepdim=True)
