"""Planted dictionaries: synthetic activations ``x = c D + noise`` whose atoms an SAE should recover.

The dictionary ``D`` holds ``atoms`` unit-norm rows of dimension ``input_dim``. Atoms fire independently, atom
``i`` on a share ``f_i`` of the samples; the shares follow a power law over the atoms' ranks
(``f ∝ rank^-frequency_exponent``, Zipf-like; 0 gives every atom the same share) scaled so that ``active`` atoms
fire per sample on average, and the ranks are a random permutation of the atoms. A firing atom's magnitude is
uniform in [0.5, 1.5]. Some atoms come in correlated groups: the members of a group share a component, so that
each pair in it has a cosine similarity drawn uniformly from ``correlation``. Gaussian noise is added with a root
mean square norm of ``noise`` times the clean samples' (0.05: 5 % noise).

Everything is drawn from seeded generators, one per part, so a spec and a seed always give the same data, and the
same spec without noise gives the same clean samples.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from convlens.core.errors import ConvlensError

MAGNITUDE_RANGE = (0.5, 1.5)
CHUNK_ROWS = 8192  # samples drawn at a time: bounds the [rows, atoms] mask in memory
ATOMS, FREQUENCIES, CODES, NOISE = range(4)  # the generator streams of one seed


@dataclasses.dataclass(frozen=True)
class PlantedSpec:
    """What to plant. ``atoms_per_dim``: atoms as a multiple of ``input_dim``; ``active``: mean atoms firing per
    sample; ``noise``: relative noise level; ``correlated_share``: share of the atoms in correlated groups of
    ``group_size``."""

    input_dim: int
    atoms_per_dim: float
    active: float
    noise: float = 0.0
    frequency_exponent: float = 0.0
    correlated_share: float = 0.0
    correlation: tuple[float, float] = (0.2, 0.5)
    group_size: int = 2

    def __post_init__(self) -> None:
        problems = []
        if self.input_dim < 2 or self.atoms < 2:
            problems.append(f"input_dim {self.input_dim} and atoms {self.atoms} must be at least 2")
        if not 0 < self.active < self.atoms:
            problems.append(f"active {self.active} must lie between 0 and the {self.atoms} atoms")
        if self.noise < 0 or self.frequency_exponent < 0:
            problems.append("noise and frequency_exponent must not be negative")
        if not 0 <= self.correlated_share <= 1:
            problems.append(f"correlated_share {self.correlated_share} must lie in [0, 1]")
        low, high = self.correlation
        if not 0 <= low <= high < 1:
            problems.append(f"correlation {self.correlation} must be a range within [0, 1)")
        if not 2 <= self.group_size < self.input_dim:
            problems.append(f"group_size {self.group_size} must lie between 2 and input_dim - 1")
        if not problems and float(self.firing_shares().max()) > 1:
            problems.append(
                f"with {self.active} active atoms and frequency exponent {self.frequency_exponent}, the most "
                "frequent atom would fire on more than every sample: lower the exponent or the active count"
            )
        if problems:
            raise ConvlensError("planted dictionary: " + "; ".join(problems))

    @property
    def atoms(self) -> int:
        return round(self.atoms_per_dim * self.input_dim)

    @property
    def groups(self) -> int:
        return int(self.correlated_share * self.atoms) // self.group_size

    def firing_shares(self) -> torch.Tensor:
        """``[atoms]`` in rank order: the share of samples the r-th most frequent atom fires on (float64)."""
        ranks = torch.arange(1, self.atoms + 1, dtype=torch.float64)
        weights = ranks.pow(-self.frequency_exponent)
        return self.active * weights / weights.sum()


@dataclasses.dataclass(frozen=True)
class PlantedData:
    """``samples [S, input_dim]`` (float32), their ``codes`` (a sparse ``[S, atoms]`` tensor: the magnitude of
    every atom that fired; without noise ``samples = codes @ dictionary``), the ``dictionary [atoms, input_dim]``
    (unit rows), each atom's planted firing share ``frequencies [atoms]``, its correlated ``group [atoms]`` (-1:
    none), each group's planted ``group_cosines [groups]``, and ``true_l0``: the mean number of atoms firing per
    drawn sample."""

    samples: torch.Tensor
    codes: torch.Tensor
    dictionary: torch.Tensor
    frequencies: torch.Tensor
    group: torch.Tensor
    group_cosines: torch.Tensor
    true_l0: float


def plant(spec: PlantedSpec, samples: int, seed: int = 0) -> PlantedData:
    """``samples`` samples of a dictionary planted as ``spec`` says (see the module), drawn from ``seed``."""
    if samples < 1:
        raise ConvlensError(f"planted dictionary: samples must be positive, got {samples}")
    dictionary, group, group_cosines = _dictionary(spec, _generator(seed, ATOMS))
    order = torch.randperm(spec.atoms, generator=_generator(seed, FREQUENCIES))
    frequencies = torch.empty(spec.atoms, dtype=torch.float64)
    frequencies[order] = spec.firing_shares()
    codes = _codes(frequencies.float(), samples, _generator(seed, CODES))
    clean = torch.sparse.mm(codes, dictionary)
    return PlantedData(
        samples=_add_noise(clean, spec.noise, _generator(seed, NOISE)),
        codes=codes,
        dictionary=dictionary,
        frequencies=frequencies.float(),
        group=group,
        group_cosines=group_cosines,
        true_l0=codes._nnz() / samples,
    )


def _generator(seed: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 16 + stream)


def _dictionary(spec: PlantedSpec, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unit-norm atoms; the first ``groups * group_size`` in groups. A group's members are ``sqrt(c) s + sqrt(1 - c)
    o_j`` with ``s`` and the ``o_j`` orthonormal (a QR of Gaussian columns), so each pair has cosine ``c``
    exactly."""
    atoms = torch.randn(spec.atoms, spec.input_dim, generator=generator, dtype=torch.float64)
    atoms /= atoms.norm(dim=1, keepdim=True)
    groups, size = spec.groups, spec.group_size
    low, high = spec.correlation
    cosines = low + (high - low) * torch.rand(groups, generator=generator, dtype=torch.float64)
    group = torch.full((spec.atoms,), -1, dtype=torch.int64)
    if groups:
        columns = torch.randn(groups, spec.input_dim, size + 1, generator=generator, dtype=torch.float64)
        basis = torch.linalg.qr(columns).Q.transpose(1, 2)  # [groups, size + 1, input_dim], orthonormal rows
        shared, own = basis[:, :1], basis[:, 1:]
        members = cosines.sqrt()[:, None, None] * shared + (1 - cosines).sqrt()[:, None, None] * own
        atoms[: groups * size] = members.reshape(groups * size, spec.input_dim)
        group[: groups * size] = torch.arange(groups).repeat_interleave(size)
    return atoms.float(), group, cosines.float()


def _codes(frequencies: torch.Tensor, samples: int, generator: torch.Generator) -> torch.Tensor:
    """A sparse ``[samples, atoms]`` tensor: atom ``i`` fires on each sample with probability ``frequencies[i]``,
    with a magnitude uniform in :data:`MAGNITUDE_RANGE`."""
    low, high = MAGNITUDE_RANGE
    indices = []
    for start in range(0, samples, CHUNK_ROWS):
        rows = min(CHUNK_ROWS, samples - start)
        fired = (torch.rand(rows, len(frequencies), generator=generator) < frequencies).nonzero()
        indices.append(fired.add_(torch.tensor([start, 0])).T)
    index = torch.cat(indices, dim=1)
    magnitudes = torch.rand(index.shape[1], generator=generator).mul_(high - low).add_(low)
    return torch.sparse_coo_tensor(
        index, magnitudes, (samples, len(frequencies)), is_coalesced=True, check_invariants=False
    )


def _add_noise(clean: torch.Tensor, level: float, generator: torch.Generator) -> torch.Tensor:
    """``clean`` plus Gaussian noise whose mean squared norm is ``level^2`` times the clean samples'."""
    if level == 0:
        return clean
    signal_power = float(clean.double().pow(2).sum(1).mean())
    sigma = level * math.sqrt(signal_power / clean.shape[1])
    return clean.add_(torch.randn(clean.shape, generator=generator), alpha=sigma)
