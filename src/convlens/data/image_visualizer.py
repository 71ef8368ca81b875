"""The base of visualizers that read images: the target's image index and batches of model inputs."""

from __future__ import annotations

from typing import Any

from convlens.core.contracts import Visualizer, VisualTarget
from convlens.core.errors import ConvlensError
from convlens.data.images import ImageIndex, Preprocessing, images_at
from convlens.data.loading import ImageDataset, decode_on_device, image_batches


class ImageVisualizer(Visualizer):
    """A :class:`Visualizer` that reads images from ``target.data`` (so the CLI requires ``--data``)."""

    needs_data = True

    def data_of(self, target: VisualTarget) -> ImageIndex:
        """The :class:`~convlens.data.images.ImageIndex` of ``target.data``; one clear error when it is missing."""
        if target.data is None:
            raise ConvlensError(f"visualizer '{self.name}' needs images: pass --data (an image file or folder)")
        return images_at(target.data)

    def batches(self, target: VisualTarget, positions: Any, *, batch_size: int, skip_log: Any, workers: int = 0):
        """Batches of model inputs for ``positions`` of ``target.data`` (see :func:`data_of`) in order, on the
        model's device (JPEGs decoded there on CUDA), with a progress bar (per :attr:`progress`) that counts
        skipped files too; unreadable files go to ``skip_log``."""
        from tqdm.auto import tqdm

        index = self.data_of(target)
        device = _device_of(target.model.module)
        dataset = ImageDataset(index, Preprocessing.of(target.model), jpeg_bytes=decode_on_device("auto", device))
        bar = tqdm(
            total=len(positions),
            desc=f"{self.name} at {target.layer}",
            unit="img",
            leave=False,
            disable=None if self.progress is None else not self.progress,
        )
        try:
            for batch in image_batches(
                dataset,
                batch_size=batch_size,
                skip_log=skip_log,
                order=positions,
                workers=workers,
                device=device,
            ):
                yield batch
                bar.update(len(batch) + len(batch.skipped))
        finally:
            bar.close()


def _device_of(module: Any) -> Any:
    """The device of ``module``'s first parameter (cpu for a module without any)."""
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else "cpu"
