"""The activation store (design.md sec. 3): safetensors shards plus ``manifest.json``.

Layout::

    STORE/extraction.json           the settings the store was made with (a re-run must match them)
    STORE/shards/shard-NNNNN.safetensors
                                    vectors [S, C], image_index [S], position [S, 2] (y, x), weight [S],
                                    split [S] (0 train, 1 validation); optionally maps [B, H, W] and
                                    map_image_index [B] (every image's full filter map)
    STORE/shards/shard-NNNNN.json   the shard's sample count, images, fallbacks, skipped files, sha256
    STORE/manifest.json             everything above plus the shard list, written once all shards exist

A shard holds one fixed chunk of images, so an interrupted extraction resumes by writing the chunks whose
``.json`` is missing; a shard file is written atomically before its ``.json``. Reading verifies each shard's
checksum once and memory-maps it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from convlens.core.errors import ConvlensError
from convlens.runtime.run_records import write_json_atomic
from convlens.runtime.seeding import torch_generator
from convlens.runtime.tensor_files import save_tensors_atomic

FORMAT = "convlens-activations/1"
SPLITS = {"train": 0, "val": 1}


def shard_name(chunk: int) -> str:
    return f"shard-{chunk:05d}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_shard(store: Path, chunk: int, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> dict[str, Any]:
    """Write chunk ``chunk``'s tensors, then its ``.json`` (so a ``.json`` always describes a complete shard)."""
    shards = store / "shards"
    path = shards / f"{shard_name(chunk)}.safetensors"
    save_tensors_atomic(tensors, path)
    record = {
        "chunk": chunk,
        "file": f"shards/{path.name}",
        "samples": int(tensors["vectors"].shape[0]),
        "bytes": path.stat().st_size,
        "sha256": file_sha256(path),
        **info,
    }
    write_json_atomic(shards / f"{shard_name(chunk)}.json", record)
    return record


def finished_chunks(store: Path) -> dict[int, dict[str, Any]]:
    """The shards already written completely (their ``.json`` exists and the file size matches)."""
    done = {}
    for sidecar in sorted((store / "shards").glob("shard-*.json")):
        try:
            record = json.loads(sidecar.read_text())
        except json.JSONDecodeError:
            continue
        shard = store / record["file"]
        if shard.is_file() and shard.stat().st_size == record["bytes"]:
            done[int(record["chunk"])] = record
    return done


def read_manifest(path: Path) -> dict[str, Any]:
    """The store's ``manifest.json``, checked before anything is read by it: one message naming the file and the
    key for anything that is not a manifest this version wrote."""
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ConvlensError(f"{path} is not a store manifest: not JSON text ({exc})") from None
    if not isinstance(manifest, dict):
        raise ConvlensError(f"{path} is not a store manifest: it holds a {type(manifest).__name__}, not an object")
    if manifest.get("format") != FORMAT:
        raise ConvlensError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    channels = manifest.get("channels")
    if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
        raise ConvlensError(f"{path}: 'channels' must be a positive whole number, got {channels!r}")
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise ConvlensError(f"{path}: 'shards' must be a list of shard records, got {type(shards).__name__}")
    for number, record in enumerate(shards):
        _check_shard_record(path, number, record)
    return manifest


def _check_shard_record(path: Path, number: int, record: Any) -> None:
    where = f"{path}: shards[{number}]"
    if not isinstance(record, dict):
        raise ConvlensError(f"{where} must be an object, got {type(record).__name__}")
    file, samples, checksum = record.get("file"), record.get("samples"), record.get("sha256")
    if not isinstance(file, str) or Path(file).is_absolute() or ".." in Path(file).parts:
        raise ConvlensError(f"{where}: 'file' must be a path inside the store, got {file!r}")
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 0:
        raise ConvlensError(f"{where}: 'samples' must be a whole number >= 0, got {samples!r}")
    if not isinstance(checksum, str):
        raise ConvlensError(f"{where}: 'sha256' must be a string, got {checksum!r}")


class ActivationStore:
    """Read access to a finished store: random access, split selection, and a shuffling batch iterator."""

    def __init__(self, path: str | Path, verify: bool = True):
        self.path = Path(path)
        manifest = self.path / "manifest.json"
        if not manifest.is_file():
            hint = " (the extraction has not finished; re-run it to resume)" if (self.path / "shards").is_dir() else ""
            raise ConvlensError(f"{self.path} is not an activation store: no manifest.json{hint}")
        self.manifest = read_manifest(manifest)
        self.shards = self.manifest["shards"]
        self.verify = verify
        self._verified: set[str] = set()
        counts = torch.tensor([0] + [s["samples"] for s in self.shards])
        self._offsets = counts.cumsum(0)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def dim(self) -> int:
        return int(self.manifest["channels"])

    def _checked(self, record: dict[str, Any]) -> Path:
        path = self.path / record["file"]
        if record["file"] not in self._verified:
            if not path.is_file():
                raise ConvlensError(f"shard {record['file']} of {self.path} is missing")
            if self.verify and file_sha256(path) != record["sha256"]:
                raise ConvlensError(
                    f"shard {record['file']} of {self.path} is corrupted (checksum mismatch); "
                    f"delete it and its .json and re-run the extraction to rewrite it"
                )
            self._verified.add(record["file"])
        return path

    def read_shard(
        self, number: int, names: tuple[str, ...] = ("vectors", "image_index", "position", "weight", "split")
    ) -> dict[str, torch.Tensor]:
        """Tensors of shard ``number`` (memory-mapped by safetensors, copied on access)."""
        from safetensors import SafetensorError, safe_open

        path = self._checked(self.shards[number])
        try:
            with safe_open(str(path), framework="pt") as handle:
                tensors = {name: handle.get_tensor(name) for name in names if name in handle.keys()}
        except (SafetensorError, OSError) as exc:
            raise ConvlensError(f"cannot read shard {self.shards[number]['file']} of {self.path}: {exc}") from None
        if "vectors" in tensors:
            self._check_finite(number, tensors["vectors"])
        return tensors

    def _check_finite(self, number: int, vectors: torch.Tensor) -> None:
        if vectors.is_floating_point() and not torch.isfinite(vectors).all():
            bad = int((~torch.isfinite(vectors)).sum())
            raise ConvlensError(
                f"shard {self.shards[number]['file']} of {self.path} holds {bad} non-finite activation values "
                "(NaN or inf), which no SAE can train on; extract again into a new --out (extraction now leaves "
                "such images out)"
            )

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """Sample ``index`` (a global position over all shards) through a memory-mapped slice."""
        from safetensors import safe_open

        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for a store of {len(self)}")
        number = int(torch.searchsorted(self._offsets, torch.tensor(index), right=True)) - 1
        offset = index - int(self._offsets[number])
        with safe_open(str(self._checked(self.shards[number])), framework="pt") as handle:
            sample = {
                name: handle.get_slice(name)[offset : offset + 1][0]
                for name in ("vectors", "image_index", "position", "weight", "split")
            }
        self._check_finite(number, sample["vectors"])
        return sample

    def split(self, name: str = "train") -> dict[str, torch.Tensor]:
        """Every sample of one split, concatenated (for stores that fit in memory; use batches() otherwise)."""
        parts = [self._select(self.read_shard(i), name) for i in range(len(self.shards))]
        return {key: torch.cat([p[key] for p in parts]) for key in parts[0]} if parts else {}

    @staticmethod
    def _select(tensors: dict[str, torch.Tensor], split: str | None) -> dict[str, torch.Tensor]:
        if split is None:
            return tensors
        if split not in SPLITS:
            raise ConvlensError(f"unknown split '{split}'; use train or val")
        keep = tensors["split"] == SPLITS[split]
        return {key: value[keep] for key, value in tensors.items()}

    def batches(
        self,
        batch_size: int,
        split: str | None = "train",
        *,
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        window: int = 4,
    ) -> Iterator[torch.Tensor]:
        """Batches of activation vectors ``[B, C]``; shuffled over a window of ``window`` shards at a time.

        Memory holds at most ``window`` shards. The order depends only on (seed, epoch).
        """
        order = (
            torch.randperm(len(self.shards), generator=torch_generator(seed, "shards", epoch)).tolist()
            if shuffle
            else list(range(len(self.shards)))
        )
        carry = None
        for start in range(0, len(order), window):
            vectors = [
                self._select(self.read_shard(i, ("vectors", "split")), split)["vectors"]
                for i in order[start : start + window]
            ]
            pool = torch.cat(([carry] if carry is not None else []) + vectors)
            if shuffle:
                pool = pool[torch.randperm(len(pool), generator=torch_generator(seed, "pool", epoch, start))]
            full = len(pool) // batch_size * batch_size
            yield from pool[:full].split(batch_size)
            carry = pool[full:]
        if carry is not None and len(carry):
            yield carry


def store_from_tensors(
    out: str | Path,
    vectors: torch.Tensor,
    *,
    split: torch.Tensor | None = None,
    samples_per_shard: int = 65_536,
    description: dict[str, Any] | None = None,
) -> ActivationStore:
    """An activation store holding ``vectors [S, C]`` (e.g. activations gathered elsewhere, or planted data).

    ``split`` marks validation samples with 1 (default: all training); every sample is its own "image".
    """
    out = Path(out)
    if vectors.ndim != 2:
        raise ConvlensError(f"vectors must be [samples, channels], got shape {tuple(vectors.shape)}")
    split = torch.zeros(len(vectors), dtype=torch.uint8) if split is None else split.to(torch.uint8)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    shards = []
    for chunk, start in enumerate(range(0, len(vectors), samples_per_shard)):
        stop = min(start + samples_per_shard, len(vectors))
        record = write_shard(
            out,
            chunk,
            {
                "vectors": vectors[start:stop].contiguous(),
                "image_index": torch.arange(start, stop),
                "position": torch.zeros(stop - start, 2, dtype=torch.int16),
                "weight": torch.ones(stop - start),
                "split": split[start:stop].contiguous(),
            },
            {"first_image": start, "last_image": stop - 1},
        )
        shards.append({k: record[k] for k in ("file", "samples", "bytes", "sha256", "first_image", "last_image")})
    write_json_atomic(
        out / "manifest.json",
        {
            "format": FORMAT,
            **(description or {}),
            "channels": int(vectors.shape[1]),
            "samples": len(vectors),
            "dtype": str(vectors.dtype).removeprefix("torch."),
            "shards": shards,
        },
    )
    return ActivationStore(out)
