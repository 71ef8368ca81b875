import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

import convlens
from convlens import ConvlensError, ModelBundle, VisualTarget
from convlens.cli import cli
from convlens.models.layers import count_hooks
from convlens.plugins.visualizers.feature_viz import PRESETS
from convlens.plugins.visualizers.feature_viz import render as render_module
from convlens.plugins.visualizers.feature_viz.images import (
    RandomTransforms,
    colour_mixing,
    estimate_colour_covariance,
    high_frequency_share,
    total_variation,
)
from convlens.plugins.visualizers.feature_viz.objectives import (
    BatchObjective,
    Objective,
    Shapes,
    check_objective,
    parse_objective,
    random_direction,
)
from convlens.plugins.visualizers.feature_viz.render import RenderSettings, render

SIZE, KERNEL, PERIOD = 48, 9, 6.0


def planted_model():
    """Channel 0 detects red ([1, -0.5, -0.5] over the colours); channel 1 a zero-mean vertical grating of period 6."""
    offsets = torch.arange(KERNEL) - KERNEL // 2
    grating = torch.cos(2 * math.pi * offsets / PERIOD).expand(KERNEL, KERNEL)
    conv = nn.Conv2d(3, 2, KERNEL, padding=KERNEL // 2, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0] = torch.tensor([1.0, -0.5, -0.5]).view(3, 1, 1) / KERNEL**2
        conv.weight[1] = (grating - grating.mean()).expand(3, KERNEL, KERNEL) / KERNEL**2
    module = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    return ModelBundle(module, (SIZE, SIZE), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "1")


def grating_match(image, vertical=True):
    """Mean over 9 x 9 patches of the phase-invariant correlation of the grey patch with the planted grating (a
    quadrature pair: cosine and sine of the same orientation and period); 1 for a perfect grating of any phase."""
    grey = image.mean(0)
    grey = grey if vertical else grey.T
    offsets = torch.arange(KERNEL) - KERNEL // 2
    pair = []
    for wave in (torch.cos, torch.sin):
        kernel = wave(2 * math.pi * offsets / PERIOD).expand(KERNEL, KERNEL)
        kernel = kernel - kernel.mean()
        pair.append((kernel / kernel.norm()).reshape(1, 1, KERNEL, KERNEL))
    patches = grey.unfold(0, KERNEL, 1).unfold(1, KERNEL, 1)
    patches = patches - patches.mean(dim=(-2, -1), keepdim=True)
    norms = patches.norm(dim=(-2, -1)).clamp_min(1e-6)
    responses = [torch.nn.functional.conv2d(grey[None, None], kernel)[0, 0] for kernel in pair]
    return float(((responses[0] ** 2 + responses[1] ** 2).sqrt() / norms).mean())


def load_images(out, record):
    return torch.stack(
        [
            torch.from_numpy(np.array(Image.open(out / entry["image"]))).permute(2, 0, 1).float() / 255
            for entry in record["objectives"]
        ]
    )


@pytest.mark.parametrize("preset", ["naive", "improved", "fourier"])
def test_planted_units_render_to_their_pattern_far_above_random_images(preset, tmp_path):
    bundle = planted_model()
    visualizer = convlens.registry.create("visualizer", "feature-viz", preset=preset)
    record = visualizer.run(VisualTarget(bundle, "1", units=(0, 1)), tmp_path)
    images = load_images(tmp_path, record)

    colour = images[0].mean(dim=(1, 2)) - images[0].mean()
    red = torch.tensor([1.0, -0.5, -0.5])
    colour_correlation = float(colour @ red / (colour.norm() * red.norm()))
    stripes, crossways = grating_match(images[1]), grating_match(images[1], vertical=False)
    with torch.no_grad():
        noise = torch.rand(64, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
        random_activation = bundle.module[:2]((noise - 0.5) / 0.25).mean(dim=(2, 3))
    final = torch.tensor([entry["activation_final"] for entry in record["objectives"]])
    print(
        f"{preset}: colour correlation {colour_correlation:.3f}, grating match {stripes:.3f} (crossways "
        f"{crossways:.3f}), activation {final.tolist()} vs random images {random_activation.mean(0).tolist()}"
    )
    assert colour_correlation > 0.9
    assert stripes > 0.5 and stripes > 3 * crossways  # a patch of noise scores about 0.14
    assert torch.all(final > 8 * random_activation.mean(0))
    assert torch.all(final > random_activation.mean(0) + 20 * random_activation.std(0))
    assert all(entry["activation_final"] > entry["activation_start"] for entry in record["objectives"])
    assert record["settings"]["steps"] == PRESETS[preset]["steps"] == 200


def test_the_record_says_which_renders_did_not_get_above_their_start(tmp_path):
    bundle = planted_model()
    still = convlens.registry.create("visualizer", "feature-viz", preset="naive", steps=3, lr=0.0)  # nothing moves
    record = still.run(VisualTarget(bundle, "1", units=(0, 1)), tmp_path / "still")
    assert [entry["reached_start"] for entry in record["objectives"]] == [False, False]
    assert [entry["attempts"] for entry in record["objectives"]] == [3, 3]  # the start and 2 retries from new seeds
    assert record["summary"] == "0 of 2 renders ended above their start; not above it: channel:0, channel:1"
    assert all("did not get above its start; best of 3 attempts)" in figure["caption"] for figure in record["figures"])
    moving = convlens.registry.create("visualizer", "feature-viz", preset="naive", steps=3)
    record = moving.run(VisualTarget(bundle, "1", units=(0, 1)), tmp_path / "moving")
    assert record["summary"] == "2 of 2 renders ended above their start"
    assert [entry["attempts"] for entry in record["objectives"]] == [1, 1]
    assert json.loads((tmp_path / "moving" / "feature_viz.json").read_text())["summary"] == record["summary"]


@pytest.mark.slow
def test_improved_and_fourier_have_less_high_frequency_energy_than_naive(tmp_path):
    bundle = convlens.registry.create("model", "tiny-cnn", input_size=32, seed=0)
    shares = {}
    for preset in ("naive", "improved", "fourier"):
        visualizer = convlens.registry.create("visualizer", "feature-viz", preset=preset, steps=100)
        record = visualizer.run(VisualTarget(bundle, "block3", units=tuple(range(6))), tmp_path / preset)
        shares[preset] = float(high_frequency_share(load_images(tmp_path / preset, record)).mean())
    print("share of spectral energy above 0.25 cycles/pixel:", shares)
    assert shares["improved"] < 0.75 * shares["naive"]
    assert shares["fourier"] < 0.75 * shares["naive"]


def test_high_frequency_share_of_known_images():
    y, x = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    slow = torch.cos(2 * math.pi * x / 16).expand(3, 32, 32)  # 1/16 cycles per pixel
    fast = torch.cos(2 * math.pi * (x + y) / 2.5).expand(3, 32, 32)  # 0.57 cycles per pixel
    shares = high_frequency_share(torch.stack([slow, fast]))
    assert shares[0] < 1e-6 and shares[1] > 0.99


@pytest.mark.parametrize("preset", ["naive", "improved", "fourier"])
def test_a_batch_of_objectives_gives_the_images_of_separate_runs(preset, monkeypatch):
    bundle = convlens.registry.create("model", "tiny-cnn", input_size=32, seed=0)
    objectives = [
        parse_objective(text) for text in ("channel:0", "neuron:1@2,2", "channel:2 - 0.5*channel:3", "class:1", "layer")
    ]
    # two images per model call: the batch of five takes three calls, the last padded; a lone one one padded call
    monkeypatch.setattr(render_module, "CPU_MODEL_CHUNK", 2)
    settings = RenderSettings(**{**PRESETS[preset], "steps": 40}, size=(32, 32), seed=3)
    assert render_module.model_chunk("cpu", settings.batch_size) == 2
    together = render(bundle.module, "block3", objectives, settings, mean=bundle.mean, std=bundle.std, progress=False)
    for objective, batched in zip(objectives, together, strict=True):
        alone = render(
            bundle.module, "block3", [objective], settings, mean=bundle.mean, std=bundle.std, progress=False
        )[0]
        # every model call takes two images: the same arithmetic alone or in a batch
        assert float((alone.image - batched.image).abs().max()) <= 1e-6, objective.label
        assert alone.final_value == pytest.approx(batched.final_value, rel=1e-6, abs=1e-7)
    assert len({rendered.seed for rendered in together}) == len(objectives)
    assert count_hooks(bundle.module) == 0
    assert all(p.requires_grad and p.grad is None for p in bundle.module.parameters())  # weights frozen, restored


def test_diversity_groups_with_transparency_are_the_same_in_a_batch_or_alone(monkeypatch):
    bundle = convlens.registry.create("model", "tiny-cnn", input_size=32, seed=0)
    objectives = [parse_objective("channel:0"), parse_objective("class:1 - 0.01*l2")]
    monkeypatch.setattr(render_module, "CPU_MODEL_CHUNK", 3)  # the first group straddles two model calls
    settings = RenderSettings(
        **{**PRESETS["fourier"], "steps": 30}, size=(32, 32), seed=1, diversity=2, transparency=0.3
    )
    together = render(bundle.module, "block3", objectives, settings, mean=bundle.mean, std=bundle.std, progress=False)
    assert [(r.objective.label, r.copy) for r in together] == [(o.label, c) for o in objectives for c in (0, 1)]
    for number, objective in enumerate(objectives):
        alone = render(bundle.module, "block3", [objective], settings, mean=bundle.mean, std=bundle.std)
        for batched, single in zip(together[2 * number : 2 * number + 2], alone, strict=True):
            assert float((batched.image - single.image).abs().max()) <= 1e-6, objective.label
            assert batched.similarity == pytest.approx(single.similarity, abs=1e-6)


def test_objective_text_and_batched_values_match_a_direct_float64_computation():
    objective = parse_objective("-0.5*channel:1 + neuron:2@0,1 - 2e-1*layer+class:3")
    assert objective.label == "-0.5*channel:1 + neuron:2@0,1 - 0.2*layer + class:3"
    assert parse_objective(objective.label) == objective
    shapes = Shapes(channels=4, height=3, width=3, classes=5, latents=6)
    generator = torch.Generator().manual_seed(0)
    activations = torch.randn(3, 4, 3, 3, generator=generator, dtype=torch.float64)
    logits = torch.randn(3, 5, generator=generator, dtype=torch.float64)
    latents = torch.randn(3, 6, 3, 3, generator=generator, dtype=torch.float64)
    sae = convlens.registry.create("sae", "relu-l1", input_dim=4, latent_dim=6, seed=1)
    others = [parse_objective("latent:5 - latent-neuron:2"), parse_objective("direction:4 + random-direction:7")]
    values = BatchObjective([objective, *others], shapes, sae)(activations, logits, latents)
    a = activations
    expected = [
        -0.5 * a[0, 1].mean() + a[0, 2, 0, 1] - 0.2 * a[0].pow(2).mean() + logits[0, 3],
        latents[1, 5].mean() - latents[1, 2, 1, 1],  # neuron terms default to the centre
        (
            torch.einsum("chw,c->", a[2], sae.decoder[4].double() / sae.decoder[4].norm())
            + torch.einsum("chw,c->", a[2], random_direction(7, 4).double())
        )
        / 9,
    ]
    torch.testing.assert_close(values, torch.stack(expected))
    vector = torch.tensor([1.0, 2.0, 0.0, -2.0])
    direction = Objective.direction(vector)
    torch.testing.assert_close(
        BatchObjective([direction], shapes)(activations[:1]),
        torch.einsum("chw,c->", a[0], vector.double() / 3).view(1) / 9,
    )


@pytest.mark.parametrize(
    "text, message",
    [
        ("chanel:1", "cannot read objective"),
        ("channel", "needs an index"),
        ("layer:2", "takes no index"),
        ("channel:1@2,2", "only neuron terms"),
        ("channel:1 channel:2", r"joined by \+ or -"),
    ],
)
def test_objective_text_errors(text, message):
    with pytest.raises(ConvlensError, match=message):
        parse_objective(text)


@pytest.mark.parametrize(
    "text, message",
    [
        ("channel:4", r"has 4 channels: 0..3"),
        ("neuron:0@3,0", "outside the 3 x 3 map"),
        ("class:9", "5 classes"),
        ("latent:0", "give an SAE"),
    ],
)
def test_objective_out_of_range_names_the_valid_range(text, message):
    with pytest.raises(ConvlensError, match=message):
        check_objective(parse_objective(text), Shapes(4, 3, 3, 5, None), "conv")


def test_colour_decorrelation_is_the_cholesky_factor_of_an_estimated_covariance(tmp_path):
    generator = np.random.default_rng(0)
    mixing = np.array([[0.3, 0.0, 0.0], [0.2, 0.1, 0.0], [0.25, -0.05, 0.08]])
    for number in range(6):
        pixels = 0.5 + (generator.standard_normal((64 * 64, 3)) @ mixing.T)
        image = np.clip(pixels, 0, 1).reshape(64, 64, 3)
        Image.fromarray((image * 255).round().astype(np.uint8)).save(tmp_path / f"{number}.png")
    estimated = np.array(estimate_colour_covariance(tmp_path))
    stacked = np.concatenate(
        [np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=np.float64).reshape(-1, 3) / 255 for n in range(6)]
    )
    np.testing.assert_allclose(estimated, np.cov(stacked.T, bias=True), atol=1e-5)
    factor = colour_mixing(estimated).double()
    product = (factor @ factor.T).numpy()
    np.testing.assert_allclose(product / product[0, 0], estimated / estimated[0, 0], rtol=1e-4, atol=1e-5)
    assert np.allclose(np.triu(factor.numpy(), 1), 0)
    with pytest.raises(ConvlensError, match="no readable image"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "broken.png").write_bytes(b"not a png")
        estimate_colour_covariance(tmp_path / "empty")


def test_transforms_flip_and_shift_exactly_and_total_variation():
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    generators = [torch.Generator().manual_seed(s) for s in range(2)]
    flipped = RandomTransforms(generators, 1, (1.0, 1.0), 0.0, 0.0, 1.0, 0)(images, 0)
    torch.testing.assert_close(flipped, images.flip(-1), atol=1e-5, rtol=0)
    assert not RandomTransforms(generators, 1, (1.0, 1.0), 0.0, 0.0, 0.0, 0).enabled
    shifted = RandomTransforms(generators, 3, (1.0, 1.0), 0.0, 0.0, 0.0, 2)
    for step in range(3):
        out = shifted(images, step)
        matches = [
            (dy, dx)
            for dy in range(-2, 3)
            for dx in range(-2, 3)
            if torch.allclose(out[0, :, 3:-3, 3:-3], images[0, :, 3 + dy : 13 + dy, 3 + dx : 13 + dx], atol=1e-5)
        ]
        assert len(matches) == 1  # a whole-pixel shift within the jitter range
    steps = torch.zeros(1, 1, 4, 4)
    steps[..., 2:] = 1.0
    assert float(total_variation(steps)) == pytest.approx(4 / 12)


def test_sae_latents_render_through_the_encoder_preactivations(tmp_path):
    bundle = convlens.registry.create("model", "tiny-cnn", input_size=32, seed=0)
    sae = convlens.registry.create("sae", "topk", input_dim=64, latent_dim=128, k=4, seed=2)
    visualizer = convlens.registry.create("visualizer", "feature-viz", preset="naive", steps=30, objective="channel")
    record = visualizer.run(VisualTarget(bundle, "block3", units=(5, 9), sae=sae), tmp_path)
    assert [entry["objective"] for entry in record["objectives"]] == ["latent:5", "latent:9"]
    with torch.no_grad():
        images = load_images(tmp_path, record)
        activations = convlens.models.layers.activations_at(bundle.module, (images - 0.5) / 0.25, "block3")
        pre = sae.preactivations(activations.activations["block3"])
    for number, (entry, latent) in enumerate(zip(record["objectives"], (5, 9), strict=True)):
        assert entry["activation_final"] == pytest.approx(float(pre[number, latent].mean()), abs=0.02)
        assert entry["activation_final"] > entry["activation_start"]
    with pytest.raises(ConvlensError, match="does not apply to SAE latents"):
        convlens.registry.create("visualizer", "feature-viz", objective="class").run(
            VisualTarget(bundle, "block3", units=(1,), sae=sae), tmp_path / "bad"
        )
    wrong = convlens.registry.create("sae", "topk", input_dim=32, latent_dim=64)
    with pytest.raises(ConvlensError, match="takes 32 channels but the layer has 64"):
        visualizer.run(VisualTarget(bundle, "block3", units=(1,), sae=wrong), tmp_path / "wrong")


def test_visualize_cli_writes_images_grid_snapshots_and_record(tmp_path):
    out = tmp_path / "viz"
    result = CliRunner().invoke(
        cli,
        [
            "visualize",
            "feature-viz",
            "--model",
            "tiny-cnn",
            "--model-input-size",
            "32",
            "--layer",
            "block2",
            "--units",
            "0-2,7",
            "--objectives",
            "channel:1 - channel:2",
            "--steps",
            "12",
            "--snapshots",
            "0,6,12",
            "--preset",
            "fourier",
            "--seed",
            "5",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output)
    record = json.loads((out / "feature_viz.json").read_text())
    assert printed["objectives"] == record["objectives"]
    assert [e["objective"] for e in record["objectives"]] == [
        "channel:0",
        "channel:1",
        "channel:2",
        "channel:7",
        "channel:1 - channel:2",
    ]
    assert record["settings"]["parameterisation"] == "fourier" and record["settings"]["seed"] == 5
    for entry in record["objectives"]:
        assert Image.open(out / entry["image"]).size == (32, 32)
        assert entry["snapshots"]["steps"] == [0, 6, 12]
        assert Image.open(out / entry["snapshots"]["image"]).size[0] > 3 * 32
    assert (out / "grid.png").is_file()
    assert printed["figures"] == record["figures"]
    assert [f["unit"] for f in record["figures"]] == [0, 1, 2, 7, 4]  # the last: not a unit, the objective's index
    assert [f.get("unit_kind") for f in record["figures"]] == [None] * 4 + ["objective"]
    assert [f["path"] for f in record["figures"]] == [e["image"] for e in record["objectives"]]
    assert {f["kind"] for f in record["figures"]} == {"feature-viz"}
    assert all((out / f["path"]).is_file() for f in record["figures"])
    assert record["figures"][3]["caption"].startswith("channel:7: activation ")
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["name"] == "convlens:tiny-cnn" and config["units"] == [0, 1, 2, 7]

    again = CliRunner().invoke(
        cli,
        [
            "visualize",
            "feature-viz",
            "--model",
            "tiny-cnn",
            "--model-input-size",
            "32",
            "--layer",
            "block2",
            "--units",
            "0-2,7",
            "--objectives",
            "channel:1 - channel:2",
            "--steps",
            "12",
            "--preset",
            "fourier",
            "--seed",
            "5",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "again"),
        ],
    )
    assert again.exit_code == 0, again.output
    for entry in record["objectives"]:  # deterministic for a seed
        assert np.array_equal(
            np.asarray(Image.open(out / entry["image"])), np.asarray(Image.open(tmp_path / "again" / entry["image"]))
        )

    for args, message in [
        (["--units", "40"], "index 40 is out of range"),
        (["--units", "0", "--layer", "blok2"], "closest: block2"),
        (["--units", "x"], "not a unit number"),
        (["--units", "0", "--preset", "best"], "best"),
    ]:
        failed = CliRunner().invoke(
            cli,
            [
                "visualize",
                "feature-viz",
                "--model",
                "tiny-cnn",
                "--model-input-size",
                "32",
                "--layer",
                "block2",
                "--steps",
                "2",
                "--out",
                str(tmp_path / "x"),
                *args,
            ],
        )
        assert failed.exit_code != 0 and message in failed.output, failed.output


class FailsLater(nn.Module):
    """A 1x1 convolution whose output turns NaN from its ``healthy + 1``-th call on."""

    def __init__(self, healthy: int):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)
        self.calls, self.healthy = 0, healthy

    def forward(self, x):
        self.calls += 1
        return self.conv(x) * (float("nan") if self.calls > self.healthy else 1.0)


def test_a_loss_that_turns_nan_is_named_by_its_first_step_though_checked_only_every_few_steps():
    module = nn.Sequential(FailsLater(healthy=2 + 29))  # the shape probe, the start values, then steps 1-29
    settings = RenderSettings(**{**PRESETS["naive"], "steps": 40}, size=(8, 8))
    with pytest.raises(ConvlensError, match=r"the objective became nan at step 30 for channel:0"):
        render(module, "0", [parse_objective("channel:0")], settings, mean=(0.5,) * 3, std=(0.25,) * 3, progress=False)
    assert count_hooks(module) == 0 and all(p.requires_grad for p in module.parameters())


def test_a_failed_render_is_run_again_from_another_seed_and_the_higher_one_kept():
    # lr 0: nothing moves, so each attempt ends where its seed's noise starts; the kept one is the attempt whose start
    # is highest, and a batch keeps the images of separate runs with the retries too
    bundle = planted_model()
    objectives = [parse_objective("channel:0"), parse_objective("channel:1")]
    settings = RenderSettings(**{**PRESETS["naive"], "steps": 2, "lr": 0.0}, size=(SIZE, SIZE), batch_size=2)
    runs = {
        retries: render(
            bundle.module,
            "1",
            objectives,
            RenderSettings(**{**settings.__dict__, "retries": retries}),
            mean=bundle.mean,
            std=bundle.std,
            progress=False,
        )
        for retries in (0, 1, 2)
    }
    for number in range(2):
        values = [runs[retries][number].final_value for retries in (0, 1, 2)]
        assert values[1] == max(values[:2]) and values[2] == max(values)
        assert [runs[retries][number].attempts for retries in (0, 1, 2)] == [1, 2, 3]
    alone = render(
        bundle.module,
        "1",
        objectives[1:],
        RenderSettings(**{**settings.__dict__, "retries": 2}),
        mean=bundle.mean,
        std=bundle.std,
        progress=False,
    )[0]
    assert torch.equal(alone.image, runs[2][1].image)
