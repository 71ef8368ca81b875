"""The image loader: the same batches whatever the workers, device decoding against the PIL path, bad files."""

import io
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convlens.core.errors import ConvlensError
from convlens.data.images import Preprocessing, SkipLog, open_rgb, scan_images
from convlens.data.loading import (
    ImageDataset,
    decode_on_device,
    grouped_image_batches,
    image_batches,
    plain_jpeg_bytes,
    worker_batch_size,
)
from test_data import write_bad_files

PREPROCESSING = Preprocessing((40, 40), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), crop_fraction=0.875)
DEVICE_DECODE_MAX_GREY_LEVELS = 1  # the tolerance stated in the README (device JPEG decoding against PIL)
DEVICE_DECODE_MEAN_GREY_LEVELS = 0.35


def _photos(folder: Path) -> Path:
    """Real photographs (scikit-learn's two CC-licensed JPEGs) and generated JPEGs of the kinds cameras and the web
    write: 4:2:0 and 4:4:4 chroma, grey, progressive, odd sizes; plus PNGs (which always decode on the CPU)."""
    import sklearn

    folder.mkdir(parents=True, exist_ok=True)
    for photo in sorted((Path(sklearn.__file__).parent / "datasets" / "images").glob("*.jpg")):
        shutil.copy(photo, folder / photo.name)
    rng = np.random.default_rng(0)
    for number, (width, height) in enumerate([(131, 97), (64, 200), (301, 301)]):
        coarse = Image.fromarray(rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8))
        picture = coarse.resize((width, height), Image.BICUBIC)
        picture.save(folder / f"{number}-420.jpg", quality=85)
        picture.save(folder / f"{number}-444.jpg", quality=95, subsampling=0)
        picture.convert("L").save(folder / f"{number}-grey.jpg", quality=90)
        picture.save(folder / f"{number}-progressive.jpg", quality=80, progressive=True)
        picture.save(folder / f"{number}.png")
    return folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return scan_images(_photos(tmp_path_factory.mktemp("photos")))


def _all_images(dataset, **options):
    batches = list(image_batches(dataset, skip_log=SkipLog(), **options))
    return torch.cat([b.images for b in batches]), torch.cat([b.positions for b in batches])


def test_batches_are_the_same_for_any_workers_and_match_the_per_image_transform(photos):
    reference = torch.stack([PREPROCESSING.eval_transform(open_rgb(path)) for path in photos.paths])
    dataset = ImageDataset(photos, PREPROCESSING)
    order = list(range(len(photos)))[::-1]
    for workers, batch_size in [(0, 5), (1, 7), (2, 4), (2, 64), (2, 1)]:
        images, positions = _all_images(dataset, batch_size=batch_size, order=order, workers=workers)
        assert positions.tolist() == order
        assert torch.equal(images, reference[order]), (workers, batch_size)


def test_pool_slots_are_refilled_only_after_their_batch_is_assembled(photos):
    """Workers reuse the few shared slots of a PixelPool many times over; a slow consumer lets them run as far ahead
    as the DataLoader allows, so a slot refilled too early would show up as another image's pixels."""
    reference = torch.stack([PREPROCESSING.eval_transform(open_rgb(path)) for path in photos.paths])
    order = [position for _ in range(4) for position in range(len(photos))]
    got = []
    for batch in image_batches(
        ImageDataset(photos, PREPROCESSING), batch_size=2, order=order, workers=2, skip_log=SkipLog()
    ):
        time.sleep(0.02)
        got.append(batch)
    assert torch.cat([batch.positions for batch in got]).tolist() == order
    assert torch.equal(torch.cat([batch.images for batch in got]), reference[order])


def test_a_batch_holds_its_slice_of_the_order_less_the_skipped_files(tmp_path):
    write_bad_files(tmp_path / "a")
    Image.new("RGB", (30, 30), (9, 9, 9)).save(tmp_path / "a" / "good.png")
    index = scan_images(tmp_path)
    names = [path.name for path in index.paths]
    for workers in (0, 2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            batches = list(
                image_batches(ImageDataset(index, PREPROCESSING), batch_size=2, skip_log=SkipLog(), workers=workers)
            )
        slices = [names[start : start + 2] for start in range(0, len(names), 2)]
        kept = [[names[p] for p in b.positions.tolist()] for b in batches]
        expected = [[n for n in s if n not in {"empty.jpg", "truncated.jpg", "text.jpg"}] for s in slices]
        assert kept == [k for k in expected if k]


@pytest.mark.parametrize("workers", [0, 2])
def test_device_decoding_names_bad_files_exactly_as_the_cpu_path(tmp_path, workers):
    expected = write_bad_files(tmp_path / "a")
    index = scan_images(tmp_path)
    logs = {}
    for jpeg_bytes in (False, True):
        logs[jpeg_bytes] = SkipLog()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataset = ImageDataset(index, PREPROCESSING, jpeg_bytes=jpeg_bytes)
            list(image_batches(dataset, batch_size=3, skip_log=logs[jpeg_bytes], workers=workers))
    assert logs[True].reasons == logs[False].reasons == {f"a/{name}": why for name, why in expected.items()}


def test_only_complete_rgb_or_grey_jpegs_go_to_the_device_decoder(tmp_path):
    write_bad_files(tmp_path)
    Image.new("RGB", (16, 16)).save(tmp_path / "fine.jpg")
    Image.new("L", (16, 16)).save(tmp_path / "grey.jpg")
    Image.new("RGB", (16, 16)).save(tmp_path / "really-a-png.jpg", format="PNG")
    chosen = {path.name for path in tmp_path.iterdir() if plain_jpeg_bytes(path) is not None}
    assert chosen == {"fine.jpg", "grey.jpg"}  # not: empty, truncated, text, CMYK, PNG named .jpg


def test_device_decoding_matches_the_pil_path_within_one_grey_level(photos):
    """torchvision's decode_jpeg and the tensor resize (run here on the CPU, the same code as on CUDA) against
    PIL's decoder and resize: at most 1 grey level apart, 0.35 on average, at three model geometries."""
    jpegs = sum(plain_jpeg_bytes(path) is not None for path in photos.paths)
    assert jpegs == 14
    for geometry in [PREPROCESSING, Preprocessing((224, 224), (0.5,) * 3, (0.5,) * 3, 224 / 256)]:
        plain = Preprocessing(geometry.input_size, (0.0,) * 3, (1 / 255,) * 3, geometry.crop_fraction)
        cpu, _ = _all_images(ImageDataset(photos, plain), batch_size=6)
        device, _ = _all_images(ImageDataset(photos, plain, jpeg_bytes=True), batch_size=6)
        difference = (cpu - device).abs()
        assert difference.max() <= DEVICE_DECODE_MAX_GREY_LEVELS + 1e-3
        assert difference.mean() <= DEVICE_DECODE_MEAN_GREY_LEVELS
        png = [i for i, path in enumerate(photos.paths) if path.suffix == ".png"]
        assert torch.equal(cpu[png], device[png])


def test_grouped_batches_never_span_groups_and_close_every_group(tmp_path):
    for number in range(7):
        Image.new("RGB", (20, 20), (number * 30, 0, 0)).save(tmp_path / f"{number}.png")
    (tmp_path / "7.png").write_bytes(b"")
    (tmp_path / "8.png").write_bytes(b"")
    index = scan_images(tmp_path)
    groups = [range(0, 5), range(5, 7), range(7, 9), range(9, 9)]
    logs: dict[int, SkipLog] = {}
    for workers in (0, 2):
        logs.clear()
        events = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for group, batch in grouped_image_batches(
                ImageDataset(index, PREPROCESSING),
                groups,
                batch_size=3,
                skip_log_of=lambda g: logs.setdefault(g, SkipLog()),
                workers=workers,
            ):
                events.append((group, None if batch is None else batch.positions.tolist()))
        assert events == [
            (0, [0, 1, 2]),
            (0, [3, 4]),
            (0, None),
            (1, [5, 6]),
            (1, None),
            (2, []),
            (2, None),
            (3, None),
        ]
        assert sorted(logs[2].reasons) == ["7.png", "8.png"]
        assert not logs[0].reasons and not logs[1].reasons


def test_worker_batches_split_a_batch_evenly_for_a_gpu():
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert worker_batch_size(64, 0, gpu) == 64
    assert worker_batch_size(64, 2, gpu) == 16
    assert worker_batch_size(256, 16, gpu) == 8
    assert worker_batch_size(3, 4, gpu) == 3
    assert worker_batch_size(100, 2, gpu) == 25
    assert worker_batch_size(64, 2, cpu) == 64


def test_decode_modes():
    assert decode_on_device("auto", "cpu") is False
    assert decode_on_device("device", "cpu") is True
    assert decode_on_device("cpu", "cpu") is False
    with pytest.raises(ConvlensError, match="unknown --decode 'gpu'"):
        decode_on_device("gpu", "cpu")


def test_a_truncated_jpeg_is_left_to_the_cpu_path(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(buffer, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buffer.getvalue()[:-40])
    assert plain_jpeg_bytes(tmp_path / "cut.jpg") is None
