"""Batches of model inputs from an image index, as fast as the cores and the device allow.

Loader workers (one torch thread each) decode, resize and crop, and send uint8 pixels, a quarter of the bytes of
float inputs. For a GPU they send small worker batches that all of them share (so the first batch is not one
worker's work alone), which the main process copies from pinned memory without blocking, gathers and normalises
on the device. For the CPU each worker stacks whole batches into a :class:`PixelPool` slot (shared memory reused in
turn), and the main process normalises each into a float batch whose memory it reuses once nothing refers to it
(fresh memory of that size costs more in page faults than the normalisation).

With ``decode="device"`` JPEG files travel as their bytes and are decoded on the device in one batched call
(torchvision's ``decode_jpeg``, nvJPEG on CUDA), then resized and cropped there; other files, and JPEGs the device
decoder refuses, take the CPU path. A file that cannot be decoded is skipped and recorded in the
:class:`~convlens.data.images.SkipLog` with the same reason whichever path it took.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from convlens.core.errors import ConvlensError
from convlens.data.images import (
    ImageIndex,
    Preprocessing,
    SkipLog,
    UnreadableImageError,
    open_rgb,
    shown,
)

if TYPE_CHECKING:
    import torch

DecodeMode = Literal["auto", "cpu", "device"]
DECODE_MODES: tuple[str, ...] = ("auto", "cpu", "device")
Transform = Callable[[Any, int], Any]
WORKER_BATCH_RANGE = (4, 32)  # images per worker batch: small enough to share a batch, large enough to amortise IPC


def decode_on_device(decode: str, device: torch.device | str) -> bool:
    """Whether ``decode`` (auto, cpu, device) decodes JPEGs on ``device``: auto does so on CUDA only."""
    import torch

    if decode not in DECODE_MODES:
        raise ConvlensError(f"unknown --decode '{decode}'; use one of {', '.join(DECODE_MODES)}")
    return decode == "device" or (decode == "auto" and torch.device(device).type == "cuda")


class ImageDataset:
    """A map-style dataset over an :class:`ImageIndex`; an undecodable file yields ``image=None`` and its reason.

    Given a :class:`Preprocessing`, items are the model's eval geometry as uint8 pixels ``[3, H, W]`` (normalised
    later, on the device, by :func:`image_batches`), and with ``jpeg_bytes`` plain JPEG files are passed on
    undecoded for the device. Given a callable ``transform(image, index)``, items are whatever it returns (e.g. a
    training augmentation drawing its randomness from the image's position in the index).
    """

    def __init__(self, index: ImageIndex, transform: Preprocessing | Transform, *, jpeg_bytes: bool = False):
        self.index = index
        self.preprocessing = transform if isinstance(transform, Preprocessing) else None
        self.transform: Transform = transform.eval_pixels if isinstance(transform, Preprocessing) else transform
        self.jpeg_bytes = jpeg_bytes and self.preprocessing is not None

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, position: int) -> dict[str, Any]:
        path = self.index.paths[position]
        label = self.index.labels[position] if self.index.labels is not None else -1
        item: dict[str, Any] = {"image": None, "encoded": None, "label": label, "position": position, "error": None}
        if self.jpeg_bytes:
            item["encoded"] = plain_jpeg_bytes(path)
            if item["encoded"] is not None:
                return item
        try:
            item["image"] = self.transform(open_rgb(path), position)
        except UnreadableImageError as exc:
            item["error"] = str(exc).removeprefix(f"{shown(path)}: ")
        return item


def plain_jpeg_bytes(path: Path) -> torch.Tensor | None:
    """The bytes of ``path`` as a uint8 tensor when it is a complete RGB or grey JPEG (what the device decoder
    takes); None otherwise: the file then takes the CPU path, which names any fault."""
    import torch
    from PIL import Image

    try:
        data = path.read_bytes()
        if not data.startswith(b"\xff\xd8\xff") or not data.rstrip(b"\0").endswith(b"\xff\xd9"):
            return None
        with Image.open(io.BytesIO(data)) as header:
            if header.format != "JPEG" or header.mode not in ("RGB", "L"):
                return None
    except Exception:  # any fault is named by the CPU path
        return None
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


@dataclasses.dataclass
class ImageBatch:
    """Model inputs ``images [N, 3, H, W]`` with their labels and index positions; ``skipped`` holds the
    (position, reason) of the files of this batch that could not be decoded."""

    images: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor
    skipped: list[tuple[int, str]]

    def __len__(self) -> int:
        return len(self.positions)


@dataclasses.dataclass
class WorkerBatch:
    """What a loader worker sends: decoded pixels stacked, JPEG bytes for the device, in the sampler's order.

    Pixels written into a :class:`PixelPool` slot travel as the slot's number alone (``pixels`` is then None
    until the receiving process takes them from its pool)."""

    pixels: torch.Tensor | None  # the decoded items, stacked
    encoded: list[torch.Tensor]  # the undecoded JPEGs
    is_encoded: list[bool]  # per good item, in order: which of the two it is in
    labels: list[int]
    positions: list[int]
    skipped: list[tuple[int, str]]
    slot: int | None = None  # the PixelPool slot holding the decoded items
    number: int = 0  # the worker batch's place in the loader's order

    @property
    def decoded_count(self) -> int:
        return self.is_encoded.count(False)

    def pin_memory(self) -> WorkerBatch:
        """A copy in page-locked memory (the DataLoader's pinning thread calls this for CUDA), so that the copy to
        the GPU does not block."""
        pixels = self.pixels.pin_memory() if self.pixels is not None else None
        return dataclasses.replace(self, pixels=pixels, encoded=[data.pin_memory() for data in self.encoded])


def collate_images(items: list[dict[str, Any]], into: torch.Tensor | None = None) -> WorkerBatch:
    """Dataset items as one :class:`WorkerBatch`; the decoded pixels stacked into ``into`` (a pool slot) when
    given, else into new memory (shared memory in a worker)."""
    import torch
    from torch.utils.data import default_collate

    good = [item for item in items if item["error"] is None]
    decoded = [item["image"] for item in good if item["encoded"] is None]
    pixels = None
    if decoded and into is not None:
        torch.stack(decoded, out=into[: len(decoded)])
    elif decoded:
        pixels = default_collate(decoded)
    return WorkerBatch(
        pixels=pixels,
        encoded=[item["encoded"] for item in good if item["encoded"] is not None],
        is_encoded=[item["encoded"] is not None for item in good],
        labels=[item["label"] for item in good],
        positions=[item["position"] for item in good],
        skipped=[(item["position"], item["error"]) for item in items if item["error"] is not None],
    )


class PixelPool:
    """Shared uint8 buffers that loader workers stack their decoded images into, one slot per worker batch.

    A new shared-memory batch per worker batch costs its page faults twice, in the worker filling it and in the
    main process mapping it (measured: a tenth of a 224 px JPEG's decode time); the pool's pages fault once. The
    main process lends a slot when it hands a worker batch to a worker and takes it back once it has assembled
    the batch (normalised into other memory), so a slot is never refilled while it is read; a worker batch handed
    out while every slot is lent gets new shared memory as without a pool.
    """

    def __init__(self, slots: int, rows: int, image_shape: tuple[int, ...]):
        import torch

        shape = (slots, rows, *image_shape)
        prototype = torch.empty(0, dtype=torch.uint8)
        storage = prototype._typed_storage()._new_shared(math.prod(shape))  # as default_collate makes its batches
        self.buffers = prototype.new(storage).view(shape)  # not share_memory_(): that copies the whole pool once
        self.free = list(range(slots))[::-1]
        self.lent: dict[int, int] = {}  # worker batch number -> slot

    def lend(self, number: int) -> int | None:
        if not self.free:
            return None
        self.lent[number] = self.free.pop()
        return self.lent[number]

    def give_back(self, number: int) -> None:
        if number in self.lent:
            self.free.append(self.lent.pop(number))

    def fits(self, items: list[dict[str, Any]]) -> bool:
        decoded = [item["image"] for item in items if item["error"] is None and item["encoded"] is None]
        return len(decoded) <= self.buffers.shape[1] and all(
            image.shape == self.buffers.shape[2:] and image.dtype == self.buffers.dtype for image in decoded
        )

    def take(self, part: WorkerBatch) -> WorkerBatch:
        """``part`` with its pixels: a view of its slot, valid until the slot is given back."""
        if part.slot is None:
            return part
        count = part.decoded_count
        return dataclasses.replace(part, pixels=self.buffers[part.slot, :count] if count else None)


class _Part(list):
    """The index positions of one worker batch, its number in the loader's order and its pool slot, if any."""

    def __init__(self, positions: list[int], number: int, slot: int | None):
        super().__init__(positions)
        self.number = number
        self.slot = slot


class _Dispatch:
    """The worker batches in order, each lent a pool slot at the moment the DataLoader hands it to a worker."""

    def __init__(self, parts: list[list[int]], pool: PixelPool | None):
        self.parts = parts
        self.pool = pool

    def __len__(self) -> int:
        return len(self.parts)

    def __iter__(self) -> Iterator[_Part]:
        for number, positions in enumerate(self.parts):
            yield _Part(positions, number, self.pool.lend(number) if self.pool else None)


class _WorkerDataset:
    """What a loader worker runs for a :class:`_Part`: its items as one numbered :class:`WorkerBatch`, stacked into
    the part's pool slot when it has one and they fit."""

    def __init__(self, dataset: ImageDataset, pool: PixelPool | None):
        self.dataset = dataset
        self.pool = pool

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, part: _Part) -> WorkerBatch:
        items = [self.dataset[position] for position in part]
        slot = part.slot if self.pool is not None and self.pool.fits(items) else None
        batch = collate_images(items, into=self.pool.buffers[slot] if self.pool and slot is not None else None)
        batch.number = part.number
        batch.slot = slot
        return batch


def _as_collated(batch: WorkerBatch) -> WorkerBatch:
    return batch


def _in_sequence(parts: Iterator[WorkerBatch]) -> Iterator[WorkerBatch]:
    """Worker batches in their numbered order, however the loader hands them over (as workers finish them)."""
    waiting: dict[int, WorkerBatch] = {}
    expected = 0
    for part in parts:
        waiting[part.number] = part
        while expected in waiting:
            yield waiting.pop(expected)
            expected += 1


def worker_batch_size(batch_size: int, workers: int, device: torch.device) -> int:
    """The images per worker batch. For a GPU about two per worker in each batch, within WORKER_BATCH_RANGE; on
    the CPU, where the process gathering them also runs the model, whole batches."""
    if workers == 0 or device.type == "cpu":
        return batch_size
    low, high = WORKER_BATCH_RANGE
    target = min(max(batch_size // (2 * workers), low), high, batch_size)
    return math.ceil(batch_size / math.ceil(batch_size / target))


def grouped_image_batches(
    dataset: ImageDataset,
    groups: Sequence[Sequence[int]],
    *,
    batch_size: int,
    skip_log_of: Callable[[int], SkipLog],
    workers: int = 0,
    device: torch.device | str | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[int, ImageBatch | None]]:
    """``(group, batch)`` for the batches of each group of index positions in order, and ``(group, None)`` when a
    group is done (also when every file of it was skipped). Batches never span groups, are on ``device``
    (normalised when the dataset gives uint8 pixels), and lose only their skipped files, which go to
    ``skip_log_of(group)``. One pool of workers serves all groups, so none waits for the next group's first batch.
    """
    import torch
    from torch.utils.data import DataLoader

    device = torch.device(device or "cpu")
    part_size = worker_batch_size(batch_size, workers, device)
    plan = [_batch_parts(order, batch_size, part_size, drop_last) for order in groups]
    prefetch = max(2, math.ceil(2 * batch_size / (part_size * workers))) if workers else None
    pool = _pixel_pool(dataset, workers, device, part_size, prefetch)
    loader = DataLoader(
        _WorkerDataset(dataset, pool),
        batch_sampler=_Dispatch([part for batches in plan for batch in batches for part in batch], pool),
        num_workers=workers,
        collate_fn=_as_collated,
        pin_memory=device.type == "cuda",
        prefetch_factor=prefetch,
        **_as_finished(workers),
    )
    assembler = _BatchAssembler(dataset, device, busy_cores=workers > 0)
    parts = _in_sequence(iter(loader))
    for group, batches in enumerate(plan):
        for batch in batches:
            received = [next(parts) for _ in batch]
            if pool is None:
                yield group, assembler.batch(received, skip_log_of(group))
                continue
            assembled = assembler.batch([pool.take(part) for part in received], skip_log_of(group))
            for part in received:
                pool.give_back(part.number)
            yield group, assembled
        yield group, None


def _as_finished(workers: int) -> dict[str, bool]:
    """DataLoader options that hand worker batches over as they are finished (torch >= 2.6), so that a worker
    that gets less of the CPU (the one sharing a core with the main process) does not set everyone's pace;
    :func:`_in_sequence` restores the order."""
    import inspect

    from torch.utils.data import DataLoader

    return {"in_order": False} if workers and "in_order" in inspect.signature(DataLoader).parameters else {}


def _pixel_pool(
    dataset: ImageDataset, workers: int, device: torch.device, part_size: int, prefetch: int | None
) -> PixelPool | None:
    """The pool workers decode into when they send uint8 images of the model's input size to a CPU model: a slot
    for each worker batch the loader keeps in flight and for those the main process holds while it assembles."""
    if not workers or device.type != "cpu" or dataset.preprocessing is None:
        return None
    assert prefetch is not None
    height, width = dataset.preprocessing.input_size
    return PixelPool(prefetch * workers + 2, part_size, (3, height, width))


def _batch_parts(order: Sequence[int], batch_size: int, part_size: int, drop_last: bool) -> list[list[list[int]]]:
    """``order`` cut into batches (the last one dropped when short and ``drop_last``), each cut into worker
    batches of ``part_size``."""
    batches = [list(order[start : start + batch_size]) for start in range(0, len(order), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return [[batch[start : start + part_size] for start in range(0, len(batch), part_size)] for batch in batches]


def first_images(
    index: ImageIndex, preprocessing: Preprocessing, count: int, skip_log: SkipLog | None = None, device: Any = None
) -> ImageBatch:
    """The readable ones among the first ``count`` images of ``index`` as one batch of model inputs (on
    ``device``); one clear error when none of them can be read."""
    skip_log = skip_log if skip_log is not None else SkipLog(index.root)
    order = range(min(count, len(index)))
    batches = image_batches(
        ImageDataset(index, preprocessing), batch_size=count, skip_log=skip_log, order=order, device=device
    )
    batch = next(batches, None)
    if batch is None:
        raise ConvlensError(f"none of the first {count} images under {index.root} could be read")
    return batch


def image_batches(
    dataset: ImageDataset,
    *,
    batch_size: int,
    skip_log: SkipLog,
    order: Sequence[int] | None = None,
    workers: int = 0,
    drop_last: bool = False,
    device: torch.device | str | None = None,
) -> Iterator[ImageBatch]:
    """Batches of decoded images in ``order`` (default: index order) on ``device``; skipped files go to
    ``skip_log``. A batch holds the images of its slice of ``order`` less the files that could not be decoded."""
    order = range(len(dataset)) if order is None else order
    for _, batch in grouped_image_batches(
        dataset,
        [order],
        batch_size=batch_size,
        skip_log_of=lambda _: skip_log,
        workers=workers,
        device=device,
        drop_last=drop_last,
    ):
        if batch is not None and len(batch):
            yield batch


class _BatchAssembler:
    """Worker batches into one :class:`ImageBatch` on the device: device decoding, normalisation, skip records."""

    def __init__(self, dataset: ImageDataset, device: torch.device, busy_cores: bool = False):
        self.dataset = dataset
        self.device = device
        # with workers decoding on the other cores, a memory-bound pass on the CPU runs best on one thread: more
        # threads only wait for cores the workers hold (measured: half the main process's time at 2 workers)
        self.one_thread = busy_cores and device.type == "cpu"
        self.buffers: list[torch.Tensor] = []  # float batches handed out before, reused once nothing holds them

    def batch(self, parts: list[WorkerBatch], skip_log: SkipLog) -> ImageBatch:
        import torch

        skipped = [item for part in parts for item in part.skipped]
        if any(part.encoded for part in parts):
            rows, labels, positions = self._rows_with_device_decoding(parts, skipped)
            images = torch.stack(rows) if rows else None
        else:
            pixels = [part.pixels.to(self.device, non_blocking=True) for part in parts if part.pixels is not None]
            images = (pixels[0] if len(pixels) == 1 else torch.cat(pixels)) if pixels else None
            labels = [label for part in parts for label in part.labels]
            positions = [position for part in parts for position in part.positions]
        index = self.dataset.index
        for position, reason in skipped:
            skip_log.record(index.relative(index.paths[position]), reason)
        if images is None:
            empty = torch.empty(0, dtype=torch.long)
            return ImageBatch(torch.empty(0, device=self.device), empty, empty, skipped)
        if images.dtype == torch.uint8 and self.dataset.preprocessing is not None:
            with _torch_threads(1) if self.one_thread else contextlib.nullcontext():
                images = self.dataset.preprocessing.normalize(images, out=self._free_buffer(images.shape))
        return ImageBatch(images, torch.tensor(labels), torch.tensor(positions), skipped)

    def _free_buffer(self, shape: torch.Size) -> torch.Tensor:
        """A float tensor of ``shape`` on the CPU: from an earlier batch that nothing refers to any more, or new.

        Normalising into it spares the process running the model a fresh allocation, whose page faults cost
        more than the normalisation itself. A buffer counts as free when only this list refers to the tensor
        and no other tensor (a view) shares its memory; a consumer that keeps batches simply gets new ones.
        """
        import sys

        import torch

        if self.device.type != "cpu" or not hasattr(torch._C, "_storage_Use_Count"):
            return torch.empty(shape, device=self.device)
        for position in range(len(self.buffers)):
            buffer = self.buffers[position]
            free = sys.getrefcount(buffer) == 3 and torch._C._storage_Use_Count(buffer.untyped_storage()._cdata) == 2
            if free and buffer.shape == shape:
                return buffer
            if free:
                self.buffers.pop(position)
                break
        buffer = torch.empty(shape)
        if len(self.buffers) < 3:
            self.buffers.append(buffer)
        return buffer

    def _rows_with_device_decoding(
        self, parts: list[WorkerBatch], skipped: list[tuple[int, str]]
    ) -> tuple[list[torch.Tensor], list[int], list[int]]:
        """The good images of ``parts`` in order, the JPEGs among them decoded on the device."""
        rows, labels, positions = [], [], []
        for part in parts:
            decoded = self._decoded_jpegs(part, skipped)
            pixels = part.pixels.to(self.device, non_blocking=True) if part.pixels is not None else None
            pixel_row = 0
            for is_encoded, label, position in zip(part.is_encoded, part.labels, part.positions):
                if is_encoded:
                    image = decoded.pop(0)
                    if image is None:
                        continue
                else:
                    image, pixel_row = pixels[pixel_row], pixel_row + 1
                rows.append(image)
                labels.append(label)
                positions.append(position)
        return rows, labels, positions

    def _decoded_jpegs(self, part: WorkerBatch, skipped: list[tuple[int, str]]) -> list[torch.Tensor | None]:
        """The part's JPEG bytes decoded on the device at the eval geometry; None (and a skip record) for a file
        that neither the device nor the CPU path can decode."""
        if not part.encoded:
            return []
        preprocessing = self.dataset.preprocessing
        assert preprocessing is not None
        images = decode_jpegs(part.encoded, self.device)
        encoded_positions = [p for p, is_encoded in zip(part.positions, part.is_encoded) if is_encoded]
        result: list[torch.Tensor | None] = []
        for image, position in zip(images, encoded_positions):
            if image is None:  # the device decoder refused it: decode on the CPU, which names any fault
                path = self.dataset.index.paths[position]
                try:
                    image = preprocessing.eval_pixels(open_rgb(path)).to(self.device)
                except UnreadableImageError as exc:
                    skipped.append((position, str(exc).removeprefix(f"{shown(path)}: ")))
                    result.append(None)
                    continue
            else:
                image = preprocessing.eval_geometry_tensor(image)
            result.append(image)
        return result


@contextlib.contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def decode_jpegs(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """RGB uint8 ``[3, h, w]`` images decoded on ``device`` in one batched call; when the batch fails, each file
    alone, and None for those the decoder refuses."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # torchvision 0.29 announces a move of its decoders to TorchCodec
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            pass
        images: list[torch.Tensor | None] = []
        for data in encoded:
            try:
                images.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                images.append(None)
        return images
