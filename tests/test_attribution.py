"""Attribution visualizers (gradcam, saliency, edge-detector), the pointing game and the sanity checks."""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import load_file

import convlens
from convlens import ConvlensError, ModelBundle
from convlens.attribution.base import ExplainTarget, input_peaks, pointing_game
from convlens.attribution.sanity_checks import cascading_randomisation, randomisation_steps, randomise_
from convlens.cli import cli
from convlens.models.layers import count_hooks
from convlens.sae.base import save_sae
from helpers import rescaled, train_tiny_cnn


def pytorch_grad_cam(module, layer, images, classes, size=None):
    """pytorch-grad-cam's GradCAM; ``size`` (h, w) replaces its resize target (default: the input size)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with GradCAM(model=module, target_layers=[module.get_submodule(layer)]) as cam:
        if size is not None:
            cam.get_target_width_height = lambda _input: (size[1], size[0])
        return cam(input_tensor=images, targets=[ClassifierOutputTarget(int(c)) for c in classes])


@pytest.mark.parametrize(
    "model, params, layer",
    [
        ("tiny-cnn", {"blocks": 4, "seed": 0}, "block3"),
        ("resnet18-smooth", {"input_size": 64, "seed": 0}, "layer3"),
    ],
)
def test_gradcam_visualizer_matches_pytorch_grad_cam(model, params, layer):
    bundle = convlens.registry.create("model", model, **params)
    images = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    gradcam = convlens.registry.create("visualizer", "gradcam")
    with torch.no_grad():
        predicted = bundle.module(images).argmax(dim=1)
    for classes in (None, torch.tensor([0, 1, 2, 3, 4])):
        ours = gradcam.explain(bundle, images, layer, ExplainTarget(classes=classes))
        explained = predicted if classes is None else classes
        reference = pytorch_grad_cam(bundle.module, layer, images, explained, size=tuple(ours.shape[1:]))
        np.testing.assert_allclose(rescaled(ours).numpy(), reference, atol=1e-5)
        # at the input's resolution: our bilinear upsampling against its cv2 resize
        upsampled = F.interpolate(ours[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
        reference = pytorch_grad_cam(bundle.module, layer, images, explained)
        np.testing.assert_allclose(rescaled(upsampled).numpy(), reference, atol=1e-5)
    assert count_hooks(bundle.module) == 0 and all(p.requires_grad for p in bundle.module.parameters())


def test_gradcam_of_an_sae_latent_matches_a_float64_computation():
    bundle = convlens.registry.create("model", "tiny-cnn", blocks=3, input_size=32, width=8)
    sae = convlens.registry.create("sae", "relu-l1", input_dim=32, latent_dim=48, seed=1).eval()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    gradcam = convlens.registry.create("visualizer", "gradcam")
    with torch.no_grad():
        activations = bundle.module[:3](images).double()
    sae64 = sae.double()
    latents = sae64.encode(activations)
    latent = int(latents.sum(dim=(0, 2, 3)).argmax())  # one that fires on these images
    leaf = activations.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(sae64.encode(leaf)[:, latent].sum(), [leaf])
    cam = (gradient.mean(dim=(2, 3), keepdim=True) * activations).sum(dim=1).clamp_min(0)
    expected = rescaled(cam).numpy()
    ours = gradcam.explain(bundle, images, "block3", ExplainTarget(sae=sae.float(), latent=latent))
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-5)
    with pytest.raises(ConvlensError, match=r"latent 48 is out of range: the SAE has latents 0\.\.47"):
        gradcam.explain(bundle, images, "block3", ExplainTarget(sae=sae, latent=48))
    with pytest.raises(ConvlensError, match="the SAE reads 32 channels"):
        gradcam.explain(bundle, images, "block2", ExplainTarget(sae=sae, latent=0))


def test_saliency_and_edge_detector_match_direct_computations():
    from scipy import ndimage

    bundle = convlens.registry.create("model", "tiny-cnn", blocks=3, input_size=32, width=8)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    classes = torch.tensor([2, 0, 5])
    saliency = convlens.registry.create("visualizer", "saliency").explain(
        bundle, images, "block2", ExplainTarget(classes=classes)
    )
    module64 = bundle.module.double()
    pixels = images.double().requires_grad_(True)
    module64(pixels).gather(1, classes[:, None]).sum().backward()
    np.testing.assert_allclose(saliency.numpy(), pixels.grad.abs().amax(dim=1).numpy(), rtol=1e-4, atol=1e-7)
    bundle.module.float()

    edges = convlens.registry.create("visualizer", "edge-detector").explain(bundle, images, "block2", ExplainTarget())
    grey = images.double().mean(dim=1).numpy()
    expected = np.stack(
        [np.hypot(ndimage.sobel(g, axis=0, mode="nearest"), ndimage.sobel(g, axis=1, mode="nearest")) for g in grey]
    )
    np.testing.assert_allclose(edges.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_peaks_and_pointing_game_by_hand():
    maps = torch.zeros(2, 1, 4, 4)
    maps[0, 0, 1, 2] = 1.0
    maps[1, 0, 3, 0] = maps[1, 0, 3, 3] = 2.0  # a tie: the first in row-major order
    assert input_peaks(maps, (4, 4))[:, 0].tolist() == [[1, 2], [3, 0]]
    assert input_peaks(maps[:1], (8, 8))[0, 0].tolist() in ([2, 4], [2, 5], [3, 4], [3, 5])  # the cell, upsampled
    assert pointing_game([True, False, True, True], [0.25, 0.5, 0.25, 0.0]) == {
        "hits": 3,
        "images": 4,
        "accuracy": 0.75,
        "random_point": 0.25,
    }


def resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_two_hundred_gradcam_calls_leave_no_hooks_graphs_or_memory():
    bundle = convlens.registry.create("model", "tiny-cnn", blocks=4, input_size=32, width=8)
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    gradcam = convlens.registry.create("visualizer", "gradcam")
    for _ in range(20):
        gradcam.explain(bundle, images, "block3", ExplainTarget())
    before = resident_bytes()
    for _ in range(200):
        maps = gradcam.explain(bundle, images, "block3", ExplainTarget())
    grown = resident_bytes() - before
    assert grown < 8 * 2**20, f"resident memory grew by {grown / 2**20:.1f} MiB over 200 calls"
    assert maps.grad_fn is None and not maps.requires_grad
    assert count_hooks(bundle.module) == 0
    assert all(p.requires_grad and p.grad is None for p in bundle.module.parameters())


def test_attribution_errors_are_one_clear_message(tmp_path):
    bundle = convlens.registry.create("model", "tiny-cnn", blocks=3, input_size=32, width=8)
    images = torch.randn(2, 3, 32, 32)
    gradcam = convlens.registry.create("visualizer", "gradcam")
    with pytest.raises(convlens.UnknownComponentError, match="closest: block3"):
        gradcam.explain(bundle, images, "blok3", ExplainTarget())
    with pytest.raises(ConvlensError, match=r"target classes must lie in 0\.\.7"):
        gradcam.explain(bundle, images, "block3", ExplainTarget(classes=torch.tensor([0, 9])))
    broken = ModelBundle(
        torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2)),
        (16, 16),
        (0.0,) * 3,
        (1.0,) * 3,
        default_layer="0",
    )
    broken.module(torch.zeros(1, 3, 16, 16))
    with torch.no_grad():
        broken.module[0].weight.fill_(float("nan"))
    with pytest.raises(ConvlensError, match="NaN or infinite values at layer '0'"):
        gradcam.explain(broken, torch.zeros(1, 3, 16, 16), "0", ExplainTarget(classes=torch.tensor([0])))
    result = CliRunner().invoke(cli, ["visualize", "gradcam", "--model", "tiny-cnn", "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "looks at images: pass --data" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("name", ["gradcam", "saliency", "edge-detector"])
def test_attribution_visualizers_pass_the_contract_check(name):
    from convlens.testing import check_component

    check_component("visualizer", name)


def test_randomisation_steps_and_reinitialisation():
    tiny = convlens.registry.create("model", "tiny-cnn", blocks=3, input_size=32).module
    assert randomisation_steps(tiny) == ["fc", "block3", "block2", "block1"]
    resnet = convlens.registry.create("model", "resnet18-smooth", input_size=64).module
    assert randomisation_steps(resnet) == ["fc", "layer4", "layer3", "layer2", "layer1", "bn1", "conv1"]
    assert randomisation_steps(resnet, depth=2)[:3] == ["fc", "layer4.1", "layer4.0"]
    first, second = [convlens.registry.create("model", "tiny-cnn", blocks=3, input_size=32).module for _ in range(2)]
    trained = first.block2[0].weight.clone()
    randomise_(first.block2, seed=5)
    randomise_(second.block2, seed=5)
    assert not torch.equal(first.block2[0].weight, trained)
    assert torch.equal(first.block2[0].weight, second.block2[0].weight)  # reproducible by seed
    assert torch.equal(first.block1[0].weight, second.block1[0].weight)  # other blocks untouched


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny-cnn trained for 8 epochs on 800 shapes images of 64 px (about 15 s on 2 cores)."""
    return train_tiny_cnn(tmp_path_factory.mktemp("attribution"), "run", images=800, size=64, epochs=8)


@pytest.mark.slow
def test_gradcam_points_at_the_object_on_shapes(trained, tmp_path):
    out = tmp_path / "gradcam"
    result = CliRunner().invoke(
        cli,
        [
            "visualize",
            "gradcam",
            "--model",
            str(trained / "run"),
            "--layer",
            "block4",
            "--data",
            str(trained / "shapes"),
            "--max-images",
            "160",
            "--batch-size",
            "32",
            "--out",
            str(out),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    game = record["pointing_game"]
    # the peak falls on the object far more often than a point drawn at random (about 0.2 of each image)
    assert game["images"] == 160 and game["accuracy"] >= 2 * game["random_point"] + 0.1, game
    assert len(record["images"]) == 160 and all((out / entry["overlay"]).is_file() for entry in record["images"])
    assert {"class", "predicted", "probability", "peak", "peak_on_object"} <= set(record["images"][0])
    assert [(f["unit"], f["path"], f["kind"]) for f in record["figures"]] == [
        (None, entry["overlay"], "attribution") for entry in record["images"]
    ]  # class targets belong to no unit
    maps = load_file(out / "maps.safetensors")
    assert maps["maps"].shape == (160, 1, 8, 8) and maps["positions"].tolist() == list(range(160))
    assert json.loads((out / "attribution.json").read_text())["pointing_game"] == game
    text = CliRunner().invoke(
        cli,
        [
            "visualize",
            "gradcam",
            "--model",
            str(trained / "run"),
            "--layer",
            "block4",
            "--data",
            str(trained / "shapes"),
            "--max-images",
            "8",
            "--out",
            str(tmp_path / "text"),
        ],
    )
    assert text.exit_code == 0 and "pointing game" in text.output and "explained 8 images" in text.output


def test_gradcam_of_sae_latents_through_the_cli(trained, tmp_path):
    sae = convlens.registry.create("sae", "topk", input_dim=64, latent_dim=96, k=8, seed=0)
    save_sae(sae, tmp_path / "sae.safetensors", name="topk", params={"input_dim": 64, "latent_dim": 96, "k": 8})
    out = tmp_path / "latents"
    result = CliRunner().invoke(
        cli,
        [
            "visualize",
            "gradcam",
            "--model",
            str(trained / "run"),
            "--layer",
            "block4",
            "--data",
            str(trained / "shapes"),
            "--max-images",
            "6",
            "--sae",
            str(tmp_path / "sae.safetensors"),
            "--units",
            "3,17",
            "--out",
            str(out),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert record["target"] == "latents" and [e["latent"] for e in record["images"][:2]] == [3, 17]
    assert [f["unit"] for f in record["figures"]] == [3, 17] * 6
    assert all(f["kind"] == "attribution" and (out / f["path"]).is_file() for f in record["figures"])
    assert len({f["path"] for f in record["figures"]}) == 12
    assert "pointing_game" not in record
    maps = load_file(out / "maps.safetensors")["maps"]
    assert maps.shape == (6, 2, 8, 8)
    bundle = convlens.registry.create(
        "model", "tiny-cnn", blocks=4, width=8, weights=str(trained / "run" / "model.safetensors")
    )
    from convlens.data.images import Preprocessing, scan_images

    index = scan_images(trained / "shapes")
    images = torch.stack(
        [Preprocessing.of(bundle).eval_transform(convlens.data.images.open_rgb(index.paths[i])) for i in range(6)]
    )
    direct = convlens.registry.create("visualizer", "gradcam").explain(
        bundle, images, "block4", ExplainTarget(sae=convlens.load_sae(tmp_path / "sae.safetensors"), latent=17)
    )
    torch.testing.assert_close(maps[:, 1], direct, atol=1e-5, rtol=0)


def test_sanity_check_separates_gradcam_from_an_edge_detector(trained, tmp_path):
    out = tmp_path / "sanity"
    result = CliRunner().invoke(
        cli,
        [
            "sanity-check",
            "gradcam",
            "--model",
            str(trained / "run"),
            "--layer",
            "block3",
            "--data",
            str(trained / "shapes"),
            "--max-images",
            "16",
            "--out",
            str(out),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert record["steps"] == ["none", "fc", "block4", "block3", "block2", "block1"]
    rows = {(row["method"], row["randomised"]): row for row in record["table"]}
    assert rows[("gradcam", "none")]["spearman_mean"] == pytest.approx(1.0)
    assert rows[("gradcam", "fc")]["spearman_mean"] < 0.6  # randomising the top layer changes the maps
    assert rows[("gradcam", "block1")]["spearman_mean"] < 0.6
    for step in record["steps"]:  # the input-only baseline does not change at all
        assert rows[("edge-detector", step)]["spearman_mean"] == pytest.approx(1.0)
    for name in ("spearman.png", "cascade-gradcam.png", "cascade-edge-detector.png", "sanity_check.json"):
        assert (out / name).is_file()
    text = CliRunner().invoke(
        cli,
        [
            "sanity-check",
            "saliency",
            "--model",
            str(trained / "run"),
            "--layer",
            "block3",
            "--data",
            str(trained / "shapes"),
            "--max-images",
            "4",
            "--baseline",
            "none",
            "--out",
            str(tmp_path / "s2"),
        ],
    )
    assert text.exit_code == 0, text.output
    assert "saliency spearman" in text.output and "blocks randomised" in text.output
    wrong = CliRunner().invoke(
        cli, ["sanity-check", "feature-viz", "--model", "tiny-cnn", "--data", str(trained / "shapes")]
    )
    assert wrong.exit_code != 0 and "is not an attribution method" in wrong.output


def test_cascading_randomisation_leaves_the_model_alone():
    bundle = convlens.registry.create("model", "tiny-cnn", blocks=3, input_size=32, width=8)
    before = {k: v.clone() for k, v in bundle.module.state_dict().items()}
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    methods = [convlens.registry.create("visualizer", name) for name in ("gradcam", "edge-detector")]
    first = cascading_randomisation(bundle, methods, images, "block2", seed=1, progress=False)
    again = cascading_randomisation(bundle, methods, images, "block2", seed=1, progress=False)
    assert all(torch.equal(v, bundle.module.state_dict()[k]) for k, v in before.items())
    torch.testing.assert_close(first[0].spearman, again[0].spearman, equal_nan=True)  # deterministic by seed
    assert first[0].steps == ["none", "fc", "block3", "block2", "block1"]
    assert first[0].maps.shape == (5, 4, 8, 8)  # steps, images, the 8 x 8 grid of block2
    assert torch.allclose(first[1].spearman, torch.ones(5, 4, dtype=torch.float64))


GRADIENT_METHODS = [
    "saliency", "input-x-gradient", "integrated-gradients", "smoothgrad", "guided-backprop", "guided-gradcam",
    "gradcam", "gradcam++", "hirescam", "layercam", "xgradcam",
]  # fmt: skip


def bench_json(*args):
    result = CliRunner().invoke(cli, ["bench", "attribution", *map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output[result.output.index("{") :])


@pytest.mark.slow
def test_bench_planted_truth_masks_and_shuffled_labels(trained, tmp_path):
    """Mask energy ranks a random map below every gradient method; with the network trained on shuffled labels,
    Grad-CAM's maps correlate with the real network's below 0.5 while the Sobel baseline stays at 1."""
    methods = [flag for name in [*GRADIENT_METHODS, "random-map", "edge-detector"] for flag in ("--method", name)]
    record = bench_json("--model", trained / "run", "--data", trained / "shapes", "--max-images", 64,
                   "--layer", "block4", "--metric", "mask-energy", "--metric", "data-randomisation",
                   "--out", tmp_path / "out", *methods)  # fmt: skip
    scores = {(row["method"], row["metric"]): row for row in record["results"]}
    random_energy = scores[("random-map", "mask-energy")]
    for method in GRADIENT_METHODS:
        assert scores[(method, "mask-energy")]["mean"] > random_energy["high"], (method, random_energy)
    gradcam = scores[("gradcam", "data-randomisation")]
    assert gradcam["mean"] < 0.5 and gradcam["low"] <= gradcam["mean"] <= gradcam["high"], gradcam
    assert scores[("edge-detector", "data-randomisation")]["mean"] == pytest.approx(1.0)
