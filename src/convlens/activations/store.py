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
checksum once; the batch iterator reads whole shards in sequence in a background thread (random access to one
sample memory-maps its shard), and a split held in memory gives the same batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import queue
import threading
from collections.abc import Callable, Generator, Iterator
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


# the safetensors element types a shard may hold, by the format's names
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
# what parsing a malformed header or reading a damaged file raises
_UNREADABLE = (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError)


@dataclasses.dataclass(frozen=True)
class TensorLayout:
    """Where one tensor of a safetensors file lies."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # bytes from the start of the file
    nbytes: int


def tensor_layouts(path: Path) -> dict[str, TensorLayout]:
    """The layout of every tensor of the safetensors file ``path``, from its header (ValueError if malformed)."""
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        file_size = os.fstat(handle.fileno()).st_size
        if not 0 < size <= file_size - 8:
            raise ValueError("the file has no safetensors header")
        header = json.loads(handle.read(size))
    if not isinstance(header, dict):
        raise ValueError("the safetensors header is not a JSON object")
    return {
        name: _tensor_layout(name, entry, 8 + size, file_size)
        for name, entry in header.items()
        if name != "__metadata__"
    }


def _tensor_layout(name: str, entry: dict[str, Any], data_start: int, file_size: int) -> TensorLayout:
    dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
    if dtype is None:
        raise ValueError(f"tensor '{name}' has the unsupported type {entry['dtype']!r}")
    shape, (begin, end) = entry["shape"], entry["data_offsets"]
    if not all(isinstance(size, int) and size >= 0 for size in shape):
        raise ValueError(f"tensor '{name}' has the invalid shape {shape!r}")
    nbytes = math.prod(shape) * dtype.itemsize
    if not (isinstance(begin, int) and begin >= 0 and end - begin == nbytes and data_start + end <= file_size):
        raise ValueError(f"tensor '{name}' does not lie within the file")
    return TensorLayout(dtype, tuple(shape), data_start + begin, nbytes)


def read_tensor_into(path: Path, layout: TensorLayout, target: torch.Tensor) -> None:
    """Read the tensor at ``layout`` of the file ``path`` into the contiguous CPU tensor ``target`` of as many bytes
    (pinned memory too) in one sequential read, with no intermediate copy."""
    if not layout.nbytes:
        return
    memory = memoryview(target.view(torch.uint8).numpy()).cast("B")
    with open(path, "rb", buffering=0) as handle:
        handle.seek(layout.offset)
        done = 0
        while done < layout.nbytes:
            got = handle.readinto(memory[done:])
            if not got:
                raise ValueError("the file ends inside a tensor")
            done += got


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device``: the GPU's free memory on cuda, the available RAM (``/proc/meminfo``) on cpu."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConvlensError(f"unknown split '{split}'; use train or val")


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
        self._buffers = _Buffers()  # kept from one complete pass to the next (the trainer's epochs)
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

    @contextlib.contextmanager
    def _reading(self, number: int) -> Iterator[Path]:
        """The path of shard ``number`` (checked); anything unreadable while it is read is one message."""
        path = self._checked(self.shards[number])
        try:
            yield path
        except _UNREADABLE as exc:
            raise ConvlensError(f"cannot read shard {self.shards[number]['file']} of {self.path}: {exc}") from None

    def _layouts(self, number: int) -> dict[str, TensorLayout]:
        with self._reading(number) as path:
            return tensor_layouts(path)

    def _read_into(self, number: int, layout: TensorLayout, target: torch.Tensor) -> None:
        with self._reading(number) as path:
            read_tensor_into(path, layout, target)

    def read_shard(
        self, number: int, names: tuple[str, ...] = ("vectors", "image_index", "position", "weight", "split")
    ) -> dict[str, torch.Tensor]:
        """Tensors ``names`` of shard ``number`` (those it holds), each read whole."""
        layouts = self._layouts(number)
        tensors = {}
        for name in (name for name in names if name in layouts):
            tensors[name] = torch.empty(layouts[name].shape, dtype=layouts[name].dtype)
            self._read_into(number, layouts[name], tensors[name])
        if "vectors" in tensors:
            self._check_finite(number, tensors["vectors"])
        return tensors

    def _check_finite(self, number: int, vectors: torch.Tensor) -> None:
        if not vectors.is_floating_point() or not vectors.numel():
            return
        low, high = torch.aminmax(vectors)  # one pass and no mask; a NaN comes out as both
        if not bool(torch.isfinite(low) & torch.isfinite(high)):
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
        _check_split(split)
        keep = tensors["split"] == SPLITS[split]
        return {key: value[keep] for key, value in tensors.items()}

    def split_rows(self, split: str | None) -> list[torch.Tensor]:
        """Per shard, the positions of its samples of ``split`` (every sample when ``split`` is None)."""
        return [self._split_positions(number, split) for number in range(len(self.shards))]

    def _split_positions(self, number: int, split: str | None) -> torch.Tensor:
        if split is None:
            return torch.arange(self._vector_layout(number).shape[0])
        _check_split(split)
        tensors = self.read_shard(number, ("split",))
        if "split" not in tensors:
            raise ConvlensError(f"shard {self.shards[number]['file']} of {self.path} has no 'split' tensor")
        return (tensors["split"] == SPLITS[split]).nonzero().squeeze(1)

    def _vector_layout(self, number: int) -> TensorLayout:
        layout = self._layouts(number).get("vectors")
        if layout is None or len(layout.shape) != 2 or layout.shape[1] != self.dim:
            found = "no 'vectors' tensor" if layout is None else f"vectors of shape {list(layout.shape)}"
            raise ConvlensError(
                f"shard {self.shards[number]['file']} of {self.path} holds {found}; the manifest says "
                f"{self.dim} channels"
            )
        return layout

    def vector_bytes(self) -> int:
        """Bytes of one stored activation vector (0 for a store without shards)."""
        return self.dim * self._vector_layout(0).dtype.itemsize if self.shards else 0

    def batches(
        self,
        batch_size: int,
        split: str | None = "train",
        *,
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        window: int = 4,
        device: torch.device | str | None = None,
        resident: ResidentSplit | None = None,
    ) -> Iterator[torch.Tensor]:
        """Batches of activation vectors ``[B, C]`` on ``device`` (default cpu), shuffled over a window of
        ``window`` shards at a time. The order depends only on (seed, epoch, window, batch_size, split).

        A background thread reads the shards whole, one after the other, a window ahead of the batches given, into
        memory reused window after window (at most three windows; after a complete pass two stay for the next one,
        after a pass stopped early none); on cuda into pinned memory, copied to the device without waiting. With
        ``resident`` (the split held in memory by :meth:`load_into_memory`) the same batches come from there.
        """
        if split is not None:
            _check_split(split)
        order = (
            torch.randperm(len(self.shards), generator=torch_generator(seed, "shards", epoch)).tolist()
            if shuffle
            else list(range(len(self.shards)))
        )
        windows = [order[start : start + window] for start in range(0, len(order), window)]
        if resident is None:
            pools = self._read_pools(windows, split, batch_size, torch.device(device or "cpu"))
        else:
            resident.check_source(self, split)
            pools = (resident.pool(numbers) for numbers in windows)
        shuffles = (
            (lambda number: torch_generator(seed, "pool", epoch, number * window)) if shuffle else (lambda _: None)
        )
        with contextlib.closing(pools):
            yield from _pool_batches(pools, batch_size, shuffles)

    def _read_pools(
        self, windows: list[list[int]], split: str | None, reserve: int, device: torch.device
    ) -> Generator[_Pool, None, None]:
        """Each window's shards, read by a background thread, as rows on ``device`` after ``reserve`` free rows."""
        buffers = _Buffers(pinned=True) if device.type == "cuda" else self._buffers
        read = functools.partial(self._read_window, split=split, reserve=0 if buffers.pinned else reserve)
        prefetch = _Prefetch(functools.partial(read, buffers=buffers), windows)
        complete = False
        try:
            for rows, positions, shards in prefetch:
                for number, part in shards:
                    self._check_finite(number, rows[part])
                if buffers.pinned:
                    on_device = torch.empty((reserve + len(rows), self.dim), dtype=rows.dtype, device=device)
                    on_device[reserve:].copy_(rows, non_blocking=True)  # the caching allocator keeps rows till done
                    yield _Pool(on_device, positions + reserve, reserve)
                else:
                    yield _Pool(rows, positions, reserve, functools.partial(buffers.give_back, rows))
            complete = True
        finally:
            prefetch.close()
            if not complete:
                buffers.clear()

    def _read_window(
        self, numbers: list[int], stop: threading.Event, *, split: str | None, reserve: int, buffers: _Buffers
    ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, slice]]] | None:
        """Shards ``numbers`` read one after the other into one tensor of vectors, after ``reserve`` free rows, the
        positions there of their samples of ``split``, and where each shard lies; None when ``stop`` is set
        meanwhile. The caller checks that the vectors are finite: a large torch reduction in this thread would
        compete with the caller's compute threads."""
        layouts = [self._vector_layout(number) for number in numbers]
        dtype = layouts[0].dtype
        shape = (reserve + sum(layout.shape[0] for layout in layouts), self.dim)
        rows = buffers.take(shape, dtype)
        positions, shards, at = [], [], reserve
        for number, layout in zip(numbers, layouts):
            if stop.is_set():
                return None
            if layout.dtype != dtype:
                raise ConvlensError(
                    f"shard {self.shards[number]['file']} of {self.path} holds {layout.dtype} vectors, the "
                    f"shards before it {dtype}"
                )
            shards.append((number, slice(at, at + layout.shape[0])))
            self._read_into(number, layout, rows[shards[-1][1]])
            positions.append(self._split_positions(number, split) + at)
            at += layout.shape[0]
        return rows, torch.cat(positions), shards

    def load_into_memory(self, split: str | None, device: torch.device | str) -> ResidentSplit:
        """The samples of ``split`` read whole into memory on ``device`` (in shard order), for
        :meth:`batches` ``resident=``: the same batches, without reading the store again."""
        device = torch.device(device)
        counts = [len(positions) for positions in self.split_rows(split)]
        starts = [0, *itertools.accumulate(counts)]
        dtype = self._vector_layout(0).dtype if self.shards else torch.float32
        vectors = torch.empty((starts[-1], self.dim), dtype=dtype, device=device)
        buffers = _Buffers(pinned=device.type == "cuda")
        read = functools.partial(self._read_window, split=split, reserve=0, buffers=buffers)
        prefetch = _Prefetch(read, [[number] for number in range(len(self.shards))])
        try:
            for number, (rows, positions, _) in enumerate(prefetch):
                self._check_finite(number, rows)
                target = vectors[starts[number] : starts[number + 1]]
                torch.index_select(rows.to(device, non_blocking=True), 0, _to_device(positions, device), out=target)
                buffers.give_back(rows)
        finally:
            prefetch.close()
        return ResidentSplit(self.path, split, vectors, tuple(starts[:-1]), tuple(counts))


@dataclasses.dataclass(frozen=True)
class ResidentSplit:
    """One split of a store held in memory (by :meth:`ActivationStore.load_into_memory`)."""

    store: Path
    split: str | None
    vectors: torch.Tensor  # [samples of the split, C], shard after shard
    starts: tuple[int, ...]  # per shard, the row of its first sample in vectors
    counts: tuple[int, ...]  # per shard, its samples of the split

    def check_source(self, store: ActivationStore, split: str | None) -> None:
        if (self.store, self.split) != (store.path, split):
            raise ConvlensError(
                f"the {self.split} samples of {self.store} held in memory cannot give the {split} samples of "
                f"{store.path}"
            )

    def pool(self, numbers: list[int]) -> _Pool:
        positions = [torch.arange(self.starts[n], self.starts[n] + self.counts[n]) for n in numbers]
        return _Pool(self.vectors, torch.cat(positions))


@dataclasses.dataclass
class _Carry:
    """The samples of a window left over after its last full batch: ``rows[positions]``."""

    rows: torch.Tensor
    positions: torch.Tensor  # on the CPU
    on_device: torch.Tensor  # the same, on the rows' device

    def gather(self) -> torch.Tensor:
        return self.rows.index_select(0, self.on_device)


@dataclasses.dataclass
class _Pool:
    """A window's samples of the split, ``rows[positions]`` in shard order; when the previous window's carry lies in
    other rows, it is copied into the ``reserve`` free rows at the front of ``rows``. ``release`` hands the rows
    back for reuse once every batch of the window is gathered."""

    rows: torch.Tensor
    positions: torch.Tensor  # on the CPU
    reserve: int = 0
    release: Callable[[], None] = lambda: None

    def positions_after(self, carry: _Carry | None) -> torch.Tensor:
        """The positions of the carry, then of the window's own samples: the order the window shuffles."""
        if carry is None or not len(carry.positions):
            return self.positions
        if carry.rows is self.rows:
            return torch.cat([carry.positions, self.positions])
        begin = self.reserve - len(carry.positions)
        self.rows[begin : self.reserve] = carry.gather()
        return torch.cat([torch.arange(begin, self.reserve), self.positions])


def _pool_batches(
    pools: Iterator[_Pool], batch_size: int, shuffles: Callable[[int], torch.Generator | None]
) -> Iterator[torch.Tensor]:
    """Batches of each window's pool (the previous window's carry, then its own samples), permuted by the
    generator ``shuffles(window number)`` gives (None: in order); what is left after the last full batch of a
    window is carried into the next one, and given as the last batch."""
    carry: _Carry | None = None
    previous: _Pool | None = None
    for number, pool in enumerate(pools):
        positions = pool.positions_after(carry)
        if previous is not None:
            previous.release()
        generator = shuffles(number)
        if generator is not None:
            positions = positions[torch.randperm(len(positions), generator=generator)]
        on_device = _to_device(positions, pool.rows.device)
        full = len(positions) // batch_size * batch_size
        for begin in range(0, full, batch_size):
            yield pool.rows.index_select(0, on_device[begin : begin + batch_size])
        carry, previous = _Carry(pool.rows, positions[full:], on_device[full:]), pool
    if carry is not None and len(carry.positions):
        yield carry.gather()
    if previous is not None:
        previous.release()


class _Buffers:
    """Host memory for the windows of one pass over a store, reused window after window: fresh memory costs a page
    fault at the first touch of every page, several times the read itself. Keeps at most ``keep`` buffers (the
    largest) for reuse. Pinned memory (for cuda) comes from torch's caching allocator, which reuses it once the
    copies from it are done."""

    def __init__(self, pinned: bool = False, keep: int = 2):
        self.pinned, self.keep = pinned, keep
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` and ``dtype``, in a reused buffer when one is large enough."""
        if self.pinned:
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        nbytes = math.prod(shape) * dtype.itemsize
        with self._lock:
            fitting = [number for number, buffer in enumerate(self._free) if buffer.numel() >= nbytes]
            buffer = self._free.pop(fitting[-1]) if fitting else torch.empty(nbytes, dtype=torch.uint8)
        return buffer[:nbytes].view(dtype).view(shape)

    def clear(self) -> None:
        with self._lock:
            self._free = []

    def give_back(self, rows: torch.Tensor) -> None:
        """``rows`` (from :meth:`take`) may be reused: nothing reads them any more."""
        if self.pinned:
            return
        buffer = torch.empty(0, dtype=torch.uint8).set_(rows.untyped_storage())
        with self._lock:
            self._free = sorted([*self._free, buffer], key=torch.Tensor.numel, reverse=True)[: self.keep]


def _to_device(positions: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``positions`` on ``device``; to cuda through pinned memory, without waiting for the device."""
    if device.type != "cuda":
        return positions
    return positions.pin_memory().to(device, non_blocking=True)


class _Prefetch:
    """``read(item, stop)`` of every item in turn, in a background thread one item ahead of the consumer. An
    exception in the thread is raised in the consumer; :meth:`close` stops the thread (after the shard it reads)."""

    _END = object()

    def __init__(self, read: Callable[[Any, threading.Event], Any], items: list[Any]):
        self._results: queue.SimpleQueue = queue.SimpleQueue()
        self._ahead = threading.Semaphore(1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, args=(read, items), name="convlens-store-reader")
        self._thread.daemon = True
        self._thread.start()

    def _work(self, read: Callable[[Any, threading.Event], Any], items: list[Any]) -> None:
        try:
            for item in items:
                self._ahead.acquire()
                if self._stop.is_set():
                    return
                self._results.put((read(item, self._stop), None))
            self._results.put((self._END, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            self._results.put((None, exc))

    def __iter__(self) -> Iterator[Any]:
        while True:
            result, error = self._results.get()
            if error is not None:
                raise error
            if result is self._END:
                return
            self._ahead.release()
            yield result

    def close(self) -> None:
        self._stop.set()
        self._ahead.release()
        self._thread.join()


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
