"""The data paths on CUDA against the CPU on the same small inputs (skipped by name without a GPU).

Tolerances (README, "GPU data paths"): nvJPEG decoding and the GPU resize against PIL, at most 1.0 grey level on
average and 8 at the 99.9th percentile; activations of a float32 extraction within 1 % of the largest value
(cuDNN may pick TF32 convolutions), within 5 % under bfloat16; a pipeline run reaches the same steps and a
validation top-1 within 15 points of the CPU run (training is not bit-reproducible across devices).
"""

import json

import pytest
import torch

from convlens.data.images import Preprocessing, SkipLog, scan_images
from convlens.data.loading import ImageDataset, collate_images, image_batches
from convlens.data.shapes import write_shapes
from test_extraction import _extract_in_process, samples_of
from test_loading import _photos
from test_pipeline import TINY_RECIPE, run_cli, write_recipe

pytestmark = pytest.mark.cuda
DEVICE = "cuda"


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract") / "shapes"
    write_shapes(root, n=40, size=32, seed=2)
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return scan_images(_photos(tmp_path_factory.mktemp("photos")))


def _images(dataset, device, workers=0):
    batches = list(image_batches(dataset, batch_size=5, skip_log=SkipLog(), workers=workers, device=device))
    assert all(b.images.device.type == torch.device(device).type for b in batches)
    return torch.cat([b.images.cpu() for b in batches])


def test_the_loader_on_cuda_gives_the_cpu_batches(photos):
    geometry = Preprocessing((64, 64), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 0.875)
    reference = _images(ImageDataset(photos, geometry), "cpu")
    for workers in (0, 2):
        torch.testing.assert_close(_images(ImageDataset(photos, geometry), DEVICE, workers), reference)


def test_worker_batches_are_pinned_for_the_gpu(photos):
    dataset = ImageDataset(photos, Preprocessing((32, 32), (0.5,) * 3, (0.5,) * 3), jpeg_bytes=True)
    part = collate_images([dataset[i] for i in range(len(photos))]).pin_memory()
    assert part.pixels.is_pinned() and part.encoded and all(data.is_pinned() for data in part.encoded)


def test_nvjpeg_decoding_matches_pil_within_the_stated_tolerance(photos):
    plain = Preprocessing((224, 224), (0.0,) * 3, (1 / 255,) * 3, 224 / 256)
    cpu = _images(ImageDataset(photos, plain), "cpu")
    device = _images(ImageDataset(photos, plain, jpeg_bytes=True), DEVICE, workers=2)
    difference = (cpu - device).abs().flatten()
    assert difference.mean() <= 1.0
    assert difference.kthvalue(int(0.999 * len(difference))).values <= 8


def _assert_close_samples(cpu, device, relative):
    assert torch.equal(cpu["image_index"], device["image_index"]) and torch.equal(cpu["position"], device["position"])
    scale = cpu["vectors"].abs().max()
    assert (cpu["vectors"] - device["vectors"]).abs().max() <= relative * scale


def test_extract_on_cuda_matches_the_cpu_store(shapes_data, tmp_path):
    common = ("--filter", "uniform", "--workers", "2")
    _extract_in_process(shapes_data, tmp_path / "cpu", *common)
    summary = _extract_in_process(shapes_data, tmp_path / "gpu", *common, "--device", DEVICE)
    assert summary["images"] == 40
    _assert_close_samples(samples_of(tmp_path / "cpu"), samples_of(tmp_path / "gpu"), 0.01)
    _extract_in_process(shapes_data, tmp_path / "bf16", *common, "--device", DEVICE, "--dtype", "bfloat16")
    _assert_close_samples(samples_of(tmp_path / "cpu"), samples_of(tmp_path / "bf16"), 0.05)


def test_extract_with_device_decoding_on_cuda(photos, tmp_path):
    common = ("--filter", "uniform", "--model-input-size", "64")
    _extract_in_process(photos.root, tmp_path / "cpu", *common)
    summary = _extract_in_process(
        photos.root, tmp_path / "gpu", *common, "--device", DEVICE, "--workers", "2", "--decode", "device"
    )
    assert summary["decode"] == "device" and summary["skipped"] == 0
    cpu, gpu = samples_of(tmp_path / "cpu"), samples_of(tmp_path / "gpu")
    assert torch.equal(cpu["image_index"], gpu["image_index"])
    correlation = torch.corrcoef(torch.stack([cpu["vectors"].flatten(), gpu["vectors"].flatten()]))[0, 1]
    assert correlation > 0.99


def test_a_recipe_runs_on_cuda_like_on_the_cpu(tmp_path):
    recipe = write_recipe(tmp_path, TINY_RECIPE)
    summaries = {}
    for device in ("cpu", DEVICE):
        out = tmp_path / f"run-{device}"
        result = run_cli("run", str(recipe), "--out", str(out), "--device", device, "--workers", "2", "--json")
        assert result.exit_code == 0, result.output
        summaries[device] = json.loads(result.stdout)
        assert (out / "report" / "index.html").is_file()
    steps = {
        device: [
            step["name"] for step in json.loads((tmp_path / f"run-{device}" / "pipeline.json").read_text())["steps"]
        ]
        for device in summaries
    }
    assert steps["cpu"] == steps[DEVICE]
    top1 = {
        device: json.loads((tmp_path / f"run-{device}" / "model" / "summary.json").read_text())["final"]["val_top1"]
        for device in summaries
    }
    assert abs(top1["cpu"] - top1[DEVICE]) <= 0.15
