"""What feature visualisation optimises: image parameterisations, colour decorrelation, blur, and the random
transforms of transformation robustness (001 sec. 9.2.2; 002 sec. 3.3).

Every image of a batch has its own generator, so an image comes out the same whether it is optimised alone or
beside others. Parameterisations map unconstrained values to RGB in [0, 1] through a sigmoid, after mixing the
colour channels by the Cholesky factor of a colour covariance when decorrelation is on.
"""

from __future__ import annotations

import abc
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from convlens import ConvlensError

# Covariance of ImageNet RGB pixel values in [0, 1]: M M^T for the square root of the colour correlation that lucent
# ships (its ``color_correlation_svd_sqrt``); used when no dataset is given to estimate it from
DEFAULT_COLOUR_COVARIANCE = ((0.0761, 0.0692, 0.0627), (0.0692, 0.0754, 0.0714), (0.0627, 0.0714, 0.0819))


def colour_mixing(covariance) -> torch.Tensor:
    """``[3, 3]``: the Cholesky factor L of the colour covariance (L L^T = covariance), scaled so that its largest
    column has unit norm; decorrelated values ``t`` become colours ``L t``."""
    factor = torch.linalg.cholesky(torch.as_tensor(covariance, dtype=torch.float64))
    return (factor / factor.norm(dim=0).max()).float()


def estimate_colour_covariance(folder: str | Path, limit: int = 512, size: int = 64) -> tuple[tuple[float, ...], ...]:
    """Covariance of the RGB values (in [0, 1]) of up to ``limit`` images of ``folder``, each resized to ``size``."""
    from convlens import UnreadableImageError, open_rgb, scan_images

    index = scan_images(folder)
    total, outer, count = torch.zeros(3, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64), 0
    for path in index.paths[:limit]:
        try:
            image = open_rgb(path).resize((size, size))
        except UnreadableImageError:
            continue
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(-1, 3).double() / 255
        total += pixels.sum(0)
        outer += pixels.T @ pixels
        count += len(pixels)
    if count == 0:
        raise ConvlensError(f"no readable image in {folder} to estimate the colour covariance from")
    mean = total / count
    covariance = outer / count - torch.outer(mean, mean)
    covariance += torch.eye(3, dtype=torch.float64) * 1e-6  # keep it positive definite for grey-only data
    return tuple(tuple(float(v) for v in row) for row in covariance)


def gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-offsets.square() / (2 * sigma**2))
    return kernel / kernel.sum()


def blur(images: torch.Tensor, sigma: float, kernel: torch.Tensor | None = None) -> torch.Tensor:
    """Separable Gaussian blur of ``[B, C, H, W]`` with reflected borders (``kernel``: ``gaussian_kernel(sigma)``
    already on the images' device)."""
    kernel = gaussian_kernel(sigma).to(images) if kernel is None else kernel
    radius, channels = len(kernel) // 2, images.shape[1]
    out = F.pad(images, (radius, radius, 0, 0), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    out = F.pad(out, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


class ImageParameterisation(abc.ABC):
    """A batch of images as a function of one tensor of parameters."""

    def __init__(self, values: torch.Tensor, mixing: torch.Tensor | None):
        self.values = values.requires_grad_(True)
        self.mixing = mixing
        # (sigma, what blurring by sigma takes), made once: a host-to-device copy per step would stall a GPU
        self._blur: tuple[float, torch.Tensor] | None = None

    def _blur_with(self, sigma: float, make) -> torch.Tensor:
        if self._blur is None or self._blur[0] != sigma:
            self._blur = (sigma, make())
        return self._blur[1]

    def parameters(self) -> list[torch.Tensor]:
        return [self.values]

    def colours(self, spatial: torch.Tensor) -> torch.Tensor:
        if self.mixing is not None:
            rgb = torch.einsum("ij,bjhw->bihw", self.mixing.to(spatial), spatial[:, :3])
            spatial = torch.cat([rgb, spatial[:, 3:]], dim=1)  # an alpha channel is not a colour: never mixed
        return torch.sigmoid(spatial)

    @abc.abstractmethod
    def images(self) -> torch.Tensor:
        """RGB ``[B, 3, H, W]`` in [0, 1] (RGBA ``[B, 4, H, W]`` when made with an alpha channel)."""

    @abc.abstractmethod
    def blur_(self, sigma: float, chunk: int | None = None) -> None:
        """Blur every image by a Gaussian of standard deviation ``sigma`` pixels, in place on the parameters;
        where the blur is a convolution, always on ``chunk`` images at a time (the last chunk padded), so an image
        comes out the same in any batch (default: all at once)."""


class PixelImage(ImageParameterisation):
    """One value per pixel and colour channel."""

    def images(self) -> torch.Tensor:
        return self.colours(self.values)

    @torch.no_grad()
    def blur_(self, sigma: float, chunk: int | None = None) -> None:
        kernel = self._blur_with(sigma, lambda: gaussian_kernel(sigma).to(self.values))
        size = chunk or len(self.values)
        for part in self.values.split(size):
            padded = torch.cat([part, part[:1].expand(size - len(part), -1, -1, -1)]) if len(part) < size else part
            part.copy_(blur(padded, sigma, kernel)[: len(part)])


class FourierImage(ImageParameterisation):
    """Coefficients of the real 2-D Fourier basis, scaled by 1 / frequency so that every frequency band starts with
    about the same energy and gradient steps favour low frequencies (002 sec. 3.3, Figure 10)."""

    def __init__(self, values: torch.Tensor, mixing: torch.Tensor | None, size: tuple[int, int]):
        super().__init__(values, mixing)
        self.size = size
        frequency = spectrum_frequencies(*size)
        scale = 1.0 / frequency.clamp_min(1.0 / max(size))
        self.scale = (scale / scale.square().mean().sqrt()).to(values.device)
        self.frequency = frequency.to(values.device)

    def images(self) -> torch.Tensor:
        spectrum = torch.view_as_complex(self.values) * self.scale
        return self.colours(torch.fft.irfft2(spectrum, s=self.size, norm="ortho"))

    @torch.no_grad()
    def blur_(self, sigma: float, chunk: int | None = None) -> None:
        # a Gaussian blur multiplies the spectrum by its transfer function exp(-2 pi^2 sigma^2 f^2)
        transfer = self._blur_with(
            sigma, lambda: torch.exp(-2 * math.pi**2 * sigma**2 * self.frequency.square()).unsqueeze(-1)
        )
        self.values.mul_(transfer)


def spectrum_frequencies(height: int, width: int) -> torch.Tensor:
    """``[H, W // 2 + 1]``: the frequency (cycles per pixel) of each coefficient of ``rfft2`` of an H x W image."""
    fy = torch.fft.fftfreq(height).view(-1, 1)
    fx = torch.fft.rfftfreq(width).view(1, -1)
    return (fy.square() + fx.square()).sqrt()


def create_images(
    kind: str,
    generators: list[torch.Generator],
    size: tuple[int, int],
    init_std: float,
    mixing: torch.Tensor | None,
    device: torch.device,
    channels: int = 3,
) -> ImageParameterisation:
    """Starting parameters drawn per image from its own generator (on the CPU, so every device starts alike);
    ``channels`` 4 adds an alpha channel."""
    height, width = size
    if kind == "pixels":
        values = torch.stack([torch.randn(channels, height, width, generator=g) * init_std for g in generators])
        return PixelImage(values.to(device), mixing)
    if kind == "fourier":
        values = torch.stack(
            [torch.randn(channels, height, width // 2 + 1, 2, generator=g) * init_std for g in generators]
        )
        return FourierImage(values.to(device), mixing, size)
    raise ConvlensError(f"unknown parameterisation '{kind}' (pixels, fourier)")


class RandomTransforms:
    """Per image and step, a random scale, rotation, translation, jitter and horizontal flip, applied to the whole
    batch as one affine resampling (borders reflected). The random numbers of every step are drawn up front from
    each image's generator, and turned into the affine matrices of every step at once, per image (so an image's
    matrices do not depend on the batch it is in) and once per device (no work or copy per step but the
    resampling)."""

    def __init__(
        self,
        generators: list[torch.Generator],
        steps: int,
        scale: tuple[float, float],
        rotation: float,
        translation: float,
        flip: float,
        jitter: int,
    ):
        self.settings = (tuple(scale), rotation, translation, flip, jitter)
        self.enabled = scale != (1.0, 1.0) or rotation > 0 or translation > 0 or flip > 0 or jitter > 0
        self.draws = torch.stack([torch.rand(steps, 7, generator=g) for g in generators]) if self.enabled else None
        self._thetas: dict[tuple[torch.device, torch.dtype, int, int], torch.Tensor] = {}

    def __call__(self, images: torch.Tensor, step: int) -> torch.Tensor:
        if not self.enabled:
            return images
        key = (images.device, images.dtype, *images.shape[-2:])
        if key not in self._thetas:
            self._thetas[key] = self.thetas(*images.shape[-2:]).to(images.device, images.dtype)
        grid = F.affine_grid(self._thetas[key][step], list(images.shape), align_corners=False)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def thetas(self, height: int, width: int) -> torch.Tensor:
        """The affine matrices ``[steps, B, 2, 3]`` of every step for images of ``height`` x ``width``."""
        return torch.stack([self._image_thetas(draws, height, width) for draws in self.draws], dim=1)

    def _image_thetas(self, u: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """One image's matrices ``[steps, 2, 3]`` from its draws ``[steps, 7]``."""
        (low, high), rotation, translation, flip, jitter = self.settings
        scale = low + (high - low) * u[:, 0]
        angle = torch.deg2rad((2 * u[:, 1] - 1) * rotation)
        mirror = torch.where(u[:, 2] < flip, -1.0, 1.0).to(u.dtype)
        # shifts in normalised coordinates (the image spans [-1, 1]): a fraction of the size plus whole pixels
        shift_x = (2 * u[:, 3] - 1) * 2 * translation + torch.round((2 * u[:, 5] - 1) * jitter) * 2 / width
        shift_y = (2 * u[:, 4] - 1) * 2 * translation + torch.round((2 * u[:, 6] - 1) * jitter) * 2 / height
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        return torch.stack(
            [torch.stack([cos * mirror, -sin, shift_x], dim=1), torch.stack([sin * mirror, cos, shift_y], dim=1)], dim=1
        )


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Per image, the mean absolute difference between vertically plus horizontally neighbouring pixel values
    (anisotropic total variation, Mahendran & Vedaldi 2014): ``[B]``. A mean rather than a sum, so that its weight
    against a unit's mean activation does not depend on the image size."""
    return (images[..., 1:, :] - images[..., :-1, :]).abs().mean(dim=(1, 2, 3)) + (
        images[..., :, 1:] - images[..., :, :-1]
    ).abs().mean(dim=(1, 2, 3))


def high_frequency_share(images: torch.Tensor, cutoff: float = 0.25) -> torch.Tensor:
    """Per image, the share of the spectral energy (mean removed, grey) at frequencies above ``cutoff`` cycles per
    pixel (0.5 is the Nyquist limit): ``[B]``."""
    grey = images.mean(dim=1)
    grey = grey - grey.mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.rfft2(grey, norm="ortho").abs().square()
    power[..., 1 : -1 if grey.shape[-1] % 2 == 0 else None] *= 2  # rfft2 keeps one half of the symmetric spectrum
    high = spectrum_frequencies(*grey.shape[-2:]).to(power.device) > cutoff
    return power[..., high].sum(-1) / power.sum(dim=(-2, -1)).clamp_min(1e-12)


class RandomBackgrounds:
    """Per image and step, a random flat colour behind an RGBA image (002 sec. 3.6: a unit that does not care about
    a region sees it through a transparent alpha whatever lies behind), drawn up front from each image's generator;
    a fixed mid grey when the image is scored."""

    def __init__(self, generators: list[torch.Generator], steps: int):
        self.colours = torch.stack([torch.rand(steps, 3, generator=g) for g in generators])  # [B, steps, 3]
        self._on: dict[torch.device, torch.Tensor] = {}

    def __call__(self, images: torch.Tensor, step: int | None) -> torch.Tensor:
        """``images`` ``[B, 4, H, W]`` composited onto step ``step``'s colours (None: grey) as RGB ``[B, 3, H, W]``."""
        if step is None:
            behind = torch.full_like(images[:, :3, :1, :1], 0.5)
        else:
            if images.device not in self._on:
                self._on[images.device] = self.colours.to(images.device)
            behind = self._on[images.device][:, step, :, None, None].to(images.dtype)
        alpha = images[:, 3:]
        return images[:, :3] * alpha + behind * (1 - alpha)
