"""Seeds derived from a run seed and keys (epoch, image index, a purpose), stable across runs and processes."""

from __future__ import annotations

import hashlib

import numpy as np


def derive_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed for ``(seed, *keys)``; the same inputs give the same seed on every machine."""
    words = [int(seed) & 0xFFFFFFFFFFFFFFFF]
    for key in keys:
        if isinstance(key, str):
            words.append(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little"))
        else:
            words.append(int(key) & 0xFFFFFFFFFFFFFFFF)
    state = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def torch_generator(seed: int, *keys: int | str):
    """A CPU ``torch.Generator`` seeded with :func:`derive_seed`."""
    import torch

    return torch.Generator().manual_seed(derive_seed(seed, *keys))
