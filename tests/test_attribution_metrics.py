"""Attribution metrics (deletion and insertion, ROAD, mask energy, relevance rank accuracy, bootstrap intervals) and
independent layer randomisation, against float64 loops, pytorch-grad-cam and planted maps."""

import copy
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import convlens
from convlens import ExplainTarget, target_scorer
from convlens.attribution.metrics import (
    deletion_insertion,
    linear_imputation,
    mask_energy,
    mean_interval,
    relevance_rank_accuracy,
    road,
)
from convlens.attribution.sanity_checks import cascading_randomisation, independent_randomisation
from convlens.core.errors import ConvlensError

# pytorch-grad-cam's ROAD turns torch scores into NumPy arrays the way NumPy 2 deprecates
pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")


@pytest.fixture(scope="module")
def tiny():
    return convlens.registry.create("model", "tiny-cnn", blocks=3, input_size=32, width=8, seed=0)


def random_images(n, size, seed):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def reference_curves(module, images, maps, classes, step_pixels, start):
    """Deletion and insertion curves with plain loops over the steps, in float64: NumPy's stable argsort of the map
    (upsampled in float64), SciPy's Gaussian filter (the RISE kernel, sampled, edge-replicated) as the start."""
    from scipy import ndimage

    images = images.double().numpy()
    n, channels, height, width = images.shape
    maps = F.interpolate(maps.double()[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
    taps = np.exp(-((np.arange(11) - 5.0) ** 2) / 50.0)
    kernel = np.outer(taps, taps) / taps.sum() ** 2
    module = copy.deepcopy(module).double()
    pixels = height * width
    steps = -(-pixels // step_pixels)
    curves = {"deletion": np.zeros((n, steps + 1)), "insertion": np.zeros((n, steps + 1))}
    for row in range(n):
        order = np.argsort(-maps[row].numpy().ravel(), kind="stable")
        image = images[row].reshape(channels, -1)
        if start == "blur":
            blurred = np.stack([ndimage.convolve(plane, kernel, mode="nearest") for plane in images[row]])
        else:
            blurred = np.zeros_like(images[row])
        for step in range(steps + 1):
            chosen = order[: min(step * step_pixels, pixels)]
            deleted, inserted = image.copy(), blurred.reshape(channels, -1).copy()
            deleted[:, chosen] = 0
            inserted[:, chosen] = image[:, chosen]
            for name, picture in (("deletion", deleted), ("insertion", inserted)):
                with torch.no_grad():
                    logits = module(torch.from_numpy(picture.reshape(1, channels, height, width)))
                curves[name][row, step] = float(logits.softmax(dim=1)[0, classes[row]])
    for name in ("deletion", "insertion"):
        curve = curves[name]
        curves[f"{name}_auc"] = np.trapezoid(curve, dx=1 / steps, axis=1)
    return curves


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("step_pixels, steps, start", [(None, None, "blur"), (100, None, "zeros"), (None, 5, "blur")])
def test_deletion_and_insertion_match_float64_loops(tiny, dtype, step_pixels, steps, start):
    images = random_images(3, 32, seed=1)
    maps = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(2))  # coarser: resized inside
    classes = torch.tensor([0, 3, 5])
    module = copy.deepcopy(tiny.module).to(dtype)
    bundle = dataclasses.replace(tiny, module=module)
    ours = deletion_insertion(
        target_scorer(bundle, ExplainTarget(classes=classes), probability=True),
        images.to(dtype),
        maps.to(dtype),
        step_pixels=step_pixels,
        steps=steps,
        insertion_start=start,
        batch_size=7,
    )
    per_step = step_pixels if step_pixels is not None else -(-1024 // (steps or 32))
    expected = reference_curves(tiny.module, images, maps, classes, per_step, start)
    for name, values in expected.items():
        assert ours[name].dtype == dtype
        np.testing.assert_allclose(ours[name].double().numpy(), values, atol=1e-5, rtol=0, err_msg=name)
    assert ours["deletion"].shape == (3, -(-1024 // per_step) + 1)


def test_deletion_insertion_rejects_both_step_settings(tiny):
    with pytest.raises(ConvlensError, match="step_pixels or steps, not both"):
        deletion_insertion(
            lambda x, r: x.sum((1, 2, 3)), random_images(1, 8, 0), torch.rand(1, 8, 8), step_pixels=2, steps=3
        )


def grad_cam_imputer():
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    return NoisyLinearImputer(noise=0.0)


def test_linear_imputation_matches_pytorch_grad_cam():
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 24, 20, generator=generator)
    keep = torch.rand(4, 24, 20, generator=generator) > 0.5
    keep[1] = True
    keep[1, 3:22, 2:18] = False  # a large hole
    keep[2] = torch.rand(24, 20, generator=generator) > 0.95  # mostly missing
    keep[3] = False
    keep[3, 0, 0] = True  # one pixel to spread
    ours = linear_imputation(images, keep)
    for row in range(4):
        expected = grad_cam_imputer()(images[row], keep[row].float())
        torch.testing.assert_close(ours[row], expected, atol=1e-5, rtol=0)
    assert torch.equal(ours[keep[:, None].expand_as(images)], images[keep[:, None].expand_as(images)])
    # no pixel kept: nothing to spread, zeros; noise only on the imputed pixels, reproducible by generator
    assert torch.equal(linear_imputation(images[:1], torch.zeros(24, 20)), torch.zeros(1, 3, 24, 20))
    noisy = [linear_imputation(images, keep, 0.5, torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(noisy[0], noisy[1])
    assert torch.equal(noisy[0][keep[:, None].expand_as(images)], images[keep[:, None].expand_as(images)])
    assert 0.4 < float((noisy[0] - ours)[~keep[:, None].expand_as(images)].std()) < 0.6


def test_linear_imputation_says_when_it_does_not_converge(monkeypatch):
    from convlens.attribution import metrics

    monkeypatch.setattr(metrics, "CG_ITERATIONS_PER_SIDE", 0)  # 100 iterations; one kept pixel needs hundreds
    keep = torch.zeros(64, 64, dtype=torch.bool)
    keep[5, 7] = True
    with pytest.raises(ConvlensError, match="did not converge in 100 conjugate-gradient iterations"):
        linear_imputation(random_images(1, 64, seed=0), keep)


@pytest.fixture
def noiseless_road(monkeypatch):
    from pytorch_grad_cam.metrics import road as grad_cam_road

    imputer = grad_cam_road.NoisyLinearImputer.__init__
    monkeypatch.setattr(imputer, "__defaults__", (0.0, grad_cam_road.neighbors_weights))
    assert grad_cam_road.NoisyLinearImputer().noise == 0.0
    return grad_cam_road


@pytest.mark.parametrize(
    "name, params, size",
    [("tiny-cnn", {"blocks": 3, "input_size": 32, "width": 8, "seed": 0}, 32), ("torchvision", {"input_size": 48}, 48)],
)
def test_road_matches_pytorch_grad_cam(noiseless_road, name, params, size):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = convlens.registry.create("model", name, **params)
    module = model.module
    images = random_images(3, size, seed=4)
    generator = torch.Generator().manual_seed(6)
    maps = torch.rand(3, size, size, generator=generator)
    maps[1] = (maps[1] * 5).floor() / 5  # five levels: ties at every threshold
    classes = torch.tensor([1, 2, 7])
    percentiles = (10, 30, 50, 70, 90)
    ours = road(target_scorer(model, ExplainTarget(classes=classes)), images, maps, percentiles=percentiles, noise=0.0)
    targets = [ClassifierOutputTarget(int(c)) for c in classes]
    cams = maps.numpy()
    for key, metric in (
        ("morf", noiseless_road.ROADMostRelevantFirst),
        ("lerf", noiseless_road.ROADLeastRelevantFirst),
    ):
        expected = np.stack([metric(p)(images, cams, targets, module) for p in percentiles], axis=1)
        np.testing.assert_allclose(ours[key].numpy(), expected, atol=1e-5, rtol=0, err_msg=key)
    combined = noiseless_road.ROADCombined(list(percentiles))(images, cams, targets, module)
    np.testing.assert_allclose(ours["combined"].numpy(), combined, atol=1e-5, rtol=0)


def test_road_noise_is_reproducible_and_batching_changes_nothing(tiny):
    images, maps = random_images(2, 32, seed=8), torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(9))
    scorer = target_scorer(tiny, ExplainTarget(classes=torch.tensor([0, 1])), probability=True)
    runs = [road(scorer, images, maps, generator=torch.Generator().manual_seed(1), batch_size=b) for b in (64, 64, 5)]
    for key in ("morf", "lerf", "combined"):
        assert torch.equal(runs[0][key], runs[1][key])
    clean = [road(scorer, images, maps, noise=0.0, batch_size=b) for b in (64, 5)]
    torch.testing.assert_close(clean[0]["combined"], clean[1]["combined"], atol=1e-6, rtol=0)
    assert runs[0]["morf"].shape == (2, 9) and runs[0]["combined"].shape == (2,)


def test_mask_energy_and_relevance_rank_on_planted_maps():
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[:, :2, :2] = True  # K = 4
    on_mask, off_mask = mask.float(), (~mask).float()
    for metric in (mask_energy, relevance_rank_accuracy):
        assert metric(on_mask, mask).tolist() == [1.0, 1.0]
        assert metric(off_mask, mask).tolist() == [0.0, 0.0]
    mixed = torch.zeros(2, 4, 4)
    mixed[0, 0, 0], mixed[0, 1, 1], mixed[0, 3, 3], mixed[0, 2, 0] = 3.0, 1.0, 4.0, -5.0  # negative: not counted
    mixed[1] = 1.0  # all tied: the first K pixels in row-major order, (0, 0..3), two of them inside
    torch.testing.assert_close(mask_energy(mixed, mask), torch.tensor([4 / 8, 4 / 16]))
    # map 0's four largest: 4 (3, 3) out, 3 (0, 0) in, 1 (1, 1) in, then the first zero (0, 1) in
    torch.testing.assert_close(relevance_rank_accuracy(mixed, mask), torch.tensor([3 / 4, 2 / 4]))
    # coarse maps are resized to the mask; an all-zero map has no energy, an empty mask no rank accuracy
    coarse = torch.ones(2, 2, 2)
    coarse[1] = 0
    energy = mask_energy(coarse, mask)
    assert energy[0] == 0.25 and torch.isnan(energy[1])
    assert torch.isnan(relevance_rank_accuracy(on_mask, torch.zeros(2, 4, 4))).all()


def test_mean_interval_covers_the_mean_and_is_deterministic():
    rng = np.random.default_rng(0)
    sample = rng.normal(2.0, 1.0, size=400)
    interval = mean_interval(sample, seed=3)
    assert interval["low"] < 2.0 < interval["high"] and interval["n"] == 400
    assert interval["mean"] == pytest.approx(sample.mean())
    half_width = 1.96 * sample.std(ddof=1) / np.sqrt(400)
    assert interval["high"] - interval["low"] == pytest.approx(2 * half_width, rel=0.15)
    assert mean_interval(sample, seed=3) == interval
    assert mean_interval(sample, seed=4) != interval
    with_gaps = torch.tensor(np.concatenate([sample, [np.nan, np.inf, -np.inf]]))
    assert mean_interval(with_gaps, seed=3) == pytest.approx(interval)
    assert mean_interval([np.nan], seed=0) == {"mean": None, "low": None, "high": None, "n": 0}


class BlocksChanged:
    """A stand-in attribution method that records which top-level blocks of the model it is given differ from the
    trained model's, and returns an input-only map."""

    name = "recorder"

    def __init__(self, trained):
        self.trained = {name: copy.deepcopy(block.state_dict()) for name, block in trained.named_children()}
        self.changed = []

    def _same(self, name, state):
        return all(torch.equal(value, self.trained[name][key]) for key, value in state.items())

    def explain(self, model, images, layer, target):
        blocks = model.module.named_children()
        self.changed.append(sorted(name for name, block in blocks if not self._same(name, block.state_dict())))
        return images.mean(dim=1)


def test_independent_randomisation_changes_one_block_at_a_time(tiny):
    module = tiny.module
    before = {key: value.clone() for key, value in module.state_dict().items()}
    images = random_images(4, 32, seed=10)
    recorder = BlocksChanged(module)
    methods = [convlens.registry.create("visualizer", name) for name in ("edge-detector", "gradcam")]
    edges, gradcam, _ = independent_randomisation(tiny, [*methods, recorder], images, "block2", seed=1, progress=False)
    steps = ["none", "fc", "block3", "block2", "block1"]
    assert edges.steps == steps and gradcam.steps == steps
    assert recorder.changed == [[], ["fc"], ["block3"], ["block2"], ["block1"]]
    assert torch.allclose(edges.spearman, torch.ones(5, 4, dtype=torch.float64))
    assert torch.allclose(gradcam.spearman[0], torch.ones(4, dtype=torch.float64))
    table = gradcam.table()
    assert table[2]["randomised"] == "block3" and table[2]["spearman_mean"] < 0.9  # the block after the map layer
    assert all(torch.equal(value, module.state_dict()[key]) for key, value in before.items())
    # the first step randomises the same block with the same seed as the cascade's first step
    (cascade,) = cascading_randomisation(tiny, methods[1:], images, "block2", seed=1, progress=False)
    torch.testing.assert_close(gradcam.maps[:2], cascade.maps[:2])
    assert not torch.allclose(gradcam.maps[3], cascade.maps[3])
