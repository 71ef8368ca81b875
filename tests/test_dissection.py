"""Network dissection and compositional explanations: planted units get their concept, the streaming quantile and
IoU tallies equal a float64 brute force, memory does not grow with the images, SAE latents are dissected like
channels, and a trained tiny-cnn with an SAE reports its unique concept detectors."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import OrderedDict

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

import convlens
from convlens import ConvlensError, ModelBundle, VisualTarget
from convlens.attribution.base import aligned_mask
from convlens.cli import cli
from convlens.data.concepts import load_concepts
from convlens.data.images import Preprocessing, open_rgb, scan_images
from convlens.data.shapes import write_shapes
from convlens.plugins.visualizers.dissection.engine import (
    FormulaTally,
    IoUTally,
    StreamingQuantile,
    beam_step,
    canonical,
    evaluate,
    formula_length,
    formula_text,
    leaves,
)

SIZE = 32
CROP = 0.8  # the model sees a centre crop: concept masks must follow it to stay aligned
PLANTED = {"redness": 0, "star": 1, "noise": 2, "red_or_blue": 3}


def image_key(image: torch.Tensor) -> bytes:
    """The model input (mean 0, std 1: pixels / 255) back to its 8-bit pixels, hashed."""
    return hashlib.sha1(np.rint(image.cpu().numpy() * 255).astype(np.uint8).tobytes()).digest()


class Planted(nn.Module):
    """Four channels on the input grid.

    0 redness: relu(red - max(green, blue) - 0.5), computed from the pixels; only red objects reach it (the
      backgrounds are muted, orange stays below).
    1 star: the foreground of stars, 0 elsewhere; 3 red or blue: the foreground of red and of blue objects. A shape
      detector is hard to build by hand, so these two look the image up: ``table`` maps the hash of each dataset
      image's model input to its aligned foreground mask, shape and colour (unknown inputs get zeros).
    2 noise: uniform noise seeded by the image's content, unrelated to any concept.
    """

    def __init__(self, table: dict[bytes, tuple[torch.Tensor, str, str]]):
        super().__init__()
        self.table = table

    def forward(self, x):
        r, g, b = x[:, 0], x[:, 1], x[:, 2]
        redness = (r - torch.maximum(g, b) - 0.5).relu()
        star, either, noise = [], [], []
        for image in x:
            key = image_key(image)
            foreground, shape, colour = self.table.get(key, (np.zeros(x.shape[2:]), "", ""))
            star.append(foreground * float(shape == "star"))
            either.append(foreground * float(colour in ("red", "blue")))
            noise.append(np.random.default_rng(int.from_bytes(key[:6], "little")).random(x.shape[2:]))
        looked_up = torch.from_numpy(np.stack([np.stack(star), np.stack(noise), np.stack(either)], axis=1)).float()
        return torch.cat([redness[:, None], looked_up], dim=1)


def planted_bundle(root) -> ModelBundle:
    preprocessing = Preprocessing((SIZE, SIZE), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), CROP)
    concepts = load_concepts(root)
    table = {}
    for number, record in enumerate(concepts.images):
        image = preprocessing.eval_transform(open_rgb(concepts.image_path(number)))
        foreground = aligned_mask(concepts.foreground(number), preprocessing).astype(np.float64)
        table[image_key(image)] = (foreground, record["shape"], record["colour"])
    module = nn.Sequential(
        OrderedDict(feat=Planted(table), pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), head=nn.Linear(4, 8))
    )
    return ModelBundle(module.eval(), (SIZE, SIZE), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "feat", crop_fraction=CROP)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tensors are tiny: on shared cores, handing each op to a second thread costs more than the op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("dissection") / "shapes"
    write_shapes(root, n=80, size=SIZE, seed=0)
    return root


@pytest.fixture(scope="module")
def planted(shapes):
    return planted_bundle(shapes)


def brute_force(bundle: ModelBundle, root, units: list[int], level: float = 0.995):
    """Float64 NetDissect on every image at once: thresholds by torch.quantile, IoU of every unit and concept."""
    index = scan_images(root)
    preprocessing = Preprocessing.of(bundle)
    images = torch.stack([preprocessing.eval_transform(open_rgb(path)) for path in index.paths])
    with torch.no_grad():
        maps = bundle.module.feat(images)[:, units].double()
    thresholds = torch.quantile(maps.transpose(0, 1).reshape(len(units), -1), level, dim=1)
    floors = maps.amin(dim=(0, 2, 3))
    up = F.interpolate(maps, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    level_map = thresholds.view(1, -1, 1, 1)
    binary = torch.where((thresholds <= floors).view(1, -1, 1, 1), up > level_map, up >= level_map)
    concepts = load_concepts(root)
    record_of = concepts.positions_in(index)
    names = [f"{category}={name}" for category, name in concepts.concepts]
    masks = torch.zeros(len(index), len(names), SIZE, SIZE, dtype=torch.bool)
    for position in range(len(index)):
        number = record_of[position]
        foreground = torch.from_numpy(aligned_mask(concepts.foreground(number), preprocessing))
        for category, region in concepts.regions.items():
            concept = names.index(f"{category}={concepts.images[number][category]}")
            masks[position, concept] = foreground if region == "foreground" else ~foreground
    intersection = (binary[:, :, None] & masks[:, None]).sum(dim=(0, 3, 4)).double()
    union = (binary[:, :, None] | masks[:, None]).sum(dim=(0, 3, 4)).double()
    return thresholds, intersection / union, names, binary, masks


@pytest.fixture(scope="module")
def dissected(planted, shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("dissected")
    visualizer = convlens.registry.create(
        "visualizer", "dissection", formula_length=3, compositional_units=2, examples=3, batch_size=16
    )
    record = visualizer.run(VisualTarget(planted, "feat", (), None, str(shapes)), out)
    return record, out


def by_unit(record):
    return {entry["unit"]: entry for entry in record["units"]}


def test_planted_units_get_their_concepts_and_noise_gets_none(dissected, planted, shapes):
    record, out = dissected
    units = by_unit(record)
    red, star, noise = units[PLANTED["redness"]], units[PLANTED["star"]], units[PLANTED["noise"]]
    print(
        f"\nredness: {red['concept']} IoU {red['iou']:.3f}; star: {star['concept']} IoU {star['iou']:.3f}; "
        f"noise: best {noise['concept']} IoU {noise['iou']:.4f}"
    )
    assert red["concept"] == "colour=red" and red["iou"] > 0.04 and red["detector"]
    assert star["concept"] == "shape=star" and star["iou"] == pytest.approx(1.0) and star["detector"]
    assert noise["iou"] < 0.04 and not noise["detector"]
    assert [t["concept"] for t in red["top"]][0] == "colour=red" and len(red["top"]) == 3

    thresholds, iou, names, _, _ = brute_force(planted, shapes, [0, 1, 2, 3])
    saved = load_file(str(out / "iou.safetensors"))
    np.testing.assert_allclose(saved["iou"].numpy(), iou.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose([units[u]["threshold"] for u in range(4)], thresholds.numpy(), rtol=1e-12)
    assert record["quantile"]["exact"] and all(units[u]["threshold_exact"] for u in range(4))
    assert [f"{c}={n}" for c, ns in record["concepts"].items() for n in ns] == names

    counts = record["counts"]
    detectors = [e for e in record["units"] if e["detector"]]
    assert counts["unit_kind"] == "channel" and counts["units"] == 4 and counts["detectors"] == len(detectors) == 3
    assert counts["unique_concepts"] == len({e["concept"] for e in detectors})
    assert counts["detectors_by_category"] == {"shape": 1, "colour": 2, "texture": 0}
    assert record["summary"].startswith(
        f"3 of 4 channels are detectors (IoU > 0.04) of "
        f"{counts['unique_concepts']} unique concepts; detectors per category: "
        "shape 1, colour 2, texture 0"
    )
    assert json.loads((out / "dissection.json").read_text())["units"] == record["units"]
    kinds = [(f["unit"], f["kind"]) for f in record["figures"]]
    assert (None, "detectors") in kinds and (PLANTED["star"], "dissection") in kinds
    assert (PLANTED["noise"], "dissection") not in kinds
    assert all((out / f["path"]).is_file() for f in record["figures"])
    with Image.open(out / f"units/{PLANTED['star']:04d}.png") as montage:
        assert montage.width >= 3 * 96


def test_an_or_unit_is_explained_by_the_or_of_its_two_concepts(dissected, planted, shapes):
    record, out = dissected
    either = by_unit(record)[PLANTED["red_or_blue"]]  # IoU 1 with red OR blue: the best unit, so it is explained
    formulas = either["formulas"]
    print("\n" + "; ".join(f"{f['length']}: {f['formula']} ({f['iou']:.3f})" for f in formulas))
    assert [f["length"] for f in formulas] == [1, 2, 3]
    assert set(formulas[1]["formula"].split(" OR ")) == {"colour=red", "colour=blue"}
    alone = {t["concept"]: t["iou"] for t in either["top"]}
    assert formulas[1]["iou"] == pytest.approx(1.0) and formulas[1]["iou"] > max(
        alone["colour=red"], alone["colour=blue"]
    )
    assert formulas[0] == {"length": 1, "formula": either["concept"], "iou": either["iou"]}
    assert formulas[2]["iou"] <= 1.0 + 1e-12
    _, _, names, binary, masks = brute_force(planted, shapes, [PLANTED["red_or_blue"]])
    wanted = masks[:, names.index("colour=red")] | masks[:, names.index("colour=blue")]
    assert bool((binary[:, 0] == wanted).all())  # the planted unit's binary maps are exactly the formula's mask
    # compositional_units=2: the two units of highest IoU (star 1.0, red or blue 0.55) get formulas, the others not
    assert [u for u in range(4) if by_unit(record)[u]["formulas"] is not None] == [
        PLANTED["star"],
        PLANTED["red_or_blue"],
    ]
    compositional = [f for f in record["figures"] if f["kind"] == "compositional"]
    assert [f["unit"] for f in compositional] == [PLANTED["star"], PLANTED["red_or_blue"]]
    assert f"2: {formulas[1]['formula']} (IoU 1.000)" in compositional[1]["caption"]


def test_formula_scores_equal_a_brute_force_on_random_masks():
    generator = torch.Generator().manual_seed(0)
    units, images, concepts, cells = 2, 6, 5, 40
    unit_masks = torch.rand(images, units, cells, generator=generator) < 0.3
    concept_masks = torch.rand(images, concepts, cells, generator=generator) < 0.4
    beams = [[("concept", 0), ("or", ("concept", 1), ("concept", 2))], [("and not", ("concept", 3), ("concept", 4))]]
    tally = FormulaTally(beams, concepts)
    tally.add(unit_masks[:4], concept_masks[:4])
    tally.add(unit_masks[4:], concept_masks[4:])
    scores = tally.scores()
    for u, beam in enumerate(beams):
        for w, formula in enumerate(beam):
            mask = evaluate(formula, concept_masks)
            for c in range(concepts):
                joined = {
                    "and": mask & concept_masks[:, c],
                    "or": mask | concept_masks[:, c],
                    "and not": mask & ~concept_masks[:, c],
                }
                for operation, built in joined.items():
                    inter = (built & unit_masks[:, u]).sum().item()
                    union = (built | unit_masks[:, u]).sum().item()
                    assert scores[operation][u, w, c].item() == pytest.approx(inter / union, abs=1e-12)
    names = list("ABCDE")
    step = beam_step(tally, 3, names)
    for u, beam in enumerate(step):
        assert len(beam) == 3 and len({canonical(f) for f, _ in beam}) == 3
        assert [value for _, value in beam] == sorted((value for _, value in beam), reverse=True)
        best = max(
            scores[operation][u, w, c].item()
            for operation in scores
            for w, formula in enumerate(beams[u])
            for c in range(concepts)
            if c not in leaves(formula)
        )
        assert beam[0][1] == pytest.approx(best)
        assert all(f[1] in beams[u] and formula_length(f) == formula_length(f[1]) + 1 for f, _ in beam)
    a, b, c = ("concept", 0), ("concept", 1), ("concept", 2)
    assert formula_text(("and not", ("or", a, b), c), names) == "(A OR B) AND NOT C"
    assert formula_text(("and not", ("and", a, b), c), names) == "A AND B AND NOT C"
    assert formula_text(("or", ("and not", a, b), c), names) == "(A AND NOT B) OR C"
    assert canonical(("or", ("or", a, b), c)) == canonical(("or", ("or", c, a), b))
    assert canonical(("or", ("or", a, b), c)) != canonical(("and", ("or", a, b), c))


@pytest.mark.parametrize("bins, buffer", [(1024, 2048), (1024, 16), (4, 3)])
def test_streaming_quantile_equals_torch_quantile(bins, buffer):
    generator = torch.Generator().manual_seed(1)
    values = torch.cat(
        [
            torch.randn(1, 6000, generator=generator),
            torch.randn(1, 6000, generator=generator).relu(),  # half zeros
            (torch.rand(1, 6000, generator=generator) < 0.002).float() * torch.rand(1, 6000, generator=generator),
            torch.randint(0, 4, (1, 6000), generator=generator).float(),  # heavy ties
            torch.exp(torch.randn(1, 6000, generator=generator) * 6),  # spread over many orders of magnitude
            torch.full((1, 6000), 2.5),  # constant
        ]
    )
    passes = []
    for level in (0.995, 0.5, 0.0, 1.0):
        search = StreamingQuantile(len(values), level, bins=bins, buffer=buffer, max_passes=64)
        while not search.done:
            for chunk in values.split(1500, dim=1):
                search.update(chunk)
            search.end_pass()
        assert bool(search.exact.all())
        expected = torch.quantile(values.double(), level, dim=1)
        np.testing.assert_allclose(search.values.numpy(), expected.numpy(), rtol=1e-12, atol=0)
        passes.append(search.passes)
    print(f"\npasses over the values with {bins} bins and a buffer of {buffer} (levels 0.995, 0.5, 0, 1): {passes}")
    # the top 0.5 % of 6000 values (30) fit a buffer of 2048: one pass; otherwise the histogram search runs
    assert passes[0] == 1 if buffer > 30 else passes[0] >= 3


def test_memory_does_not_grow_with_the_number_of_images(planted, shapes, tmp_path):
    memory = {}
    for count in (20, 60):
        visualizer = convlens.registry.create(
            "visualizer",
            "dissection",
            formula_length=2,
            compositional_units=2,
            figures=0,
            batch_size=10,
            max_images=count,
        )
        record = visualizer.run(VisualTarget(planted, "feat", (), None, str(shapes)), tmp_path / str(count))
        assert record["images"] == count
        memory[count] = record["memory"]
    print(f"\nstate bytes with 20 and 60 images: {memory}")
    assert memory[20] == memory[60] and memory[20]["formula_state_bytes"] > 0

    sizes = {}
    for count in (20, 60):
        search, tally = StreamingQuantile(4, 0.995), IoUTally(4, 7)
        for _ in range(count):
            search.update(torch.rand(4, 64))
            tally.add(torch.rand(1, 4, 64) < 0.1, torch.rand(1, 7, 64) < 0.3)
        sizes[count] = [tuple(t.shape) for t in [*search.state_tensors().values(), *tally.state_tensors().values()]]
    assert sizes[20] == sizes[60]


def copying_sae():
    """A relu-l1 SAE whose latents copy channels: latent 0 the star channel, 1 the redness channel, 2 the noise."""
    sae = convlens.registry.create("sae", "relu-l1", input_dim=4, latent_dim=3, seed=0).eval()
    with torch.no_grad():
        sae.encoder.copy_(torch.eye(4)[[PLANTED["star"], PLANTED["redness"], PLANTED["noise"]]])
        sae.pre_bias.zero_()
        sae.latent_bias.zero_()
    return sae


def test_sae_latents_are_labelled_like_the_channels_they_copy(dissected, planted, shapes, tmp_path):
    record, _ = dissected
    channels = by_unit(record)
    visualizer = convlens.registry.create("visualizer", "netdissect", formula_length=1, figures=2)
    latents = visualizer.run(VisualTarget(planted, "feat", (), copying_sae(), str(shapes)), tmp_path)
    assert latents["unit_kind"] == "latent" and latents["counts"]["unit_kind"] == "latent"
    for latent, channel in enumerate((PLANTED["star"], PLANTED["redness"], PLANTED["noise"])):
        entry, reference = by_unit(latents)[latent], channels[channel]
        assert entry["concept"] == reference["concept"] and entry["detector"] == reference["detector"]
        assert entry["iou"] == pytest.approx(reference["iou"], rel=1e-9)
        assert entry["formulas"] is None
    assert latents["summary"].startswith("2 of 3 latents are detectors (IoU > 0.04) of 2 unique concepts")
    assert [f["unit"] for f in latents["figures"] if f["kind"] == "dissection"] == [0, 1]


def test_a_trained_tiny_cnn_and_its_sae_report_their_unique_concept_detectors(shapes, tmp_path):
    from convlens.models.fine_tuning import TrainingParams, prepare_data, train_model

    params = TrainingParams(epochs=2, batch_size=16, augment=False, seed=0, lr=0.01)
    bundle = convlens.registry.create("model", "tiny-cnn", width=4, blocks=3, input_size=SIZE, seed=0)
    train_model(
        bundle,
        prepare_data(shapes, params),
        tmp_path / "model",
        params,
        model={"name": "tiny-cnn"},
        device="cpu",
        progress=False,
    )
    bundle.module.eval()
    index = scan_images(shapes)
    preprocessing = Preprocessing.of(bundle)
    images = torch.stack([preprocessing.eval_transform(open_rgb(path)) for path in index.paths])
    with torch.no_grad():
        vectors = bundle.module[:3](images).permute(0, 2, 3, 1).reshape(-1, 16)
    sae = convlens.registry.create("sae", "relu-l1", input_dim=16, latent_dim=32, l1=1e-3, seed=0)
    optimiser = torch.optim.Adam(sae.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(150):
        batch = vectors[torch.randint(len(vectors), (256,), generator=generator)]
        optimiser.zero_grad()
        sae(batch).loss.backward()
        optimiser.step()
    sae.eval()

    reports = {}
    for label, target_sae in (("channels", None), ("latents", sae)):
        visualizer = convlens.registry.create(
            "visualizer", "dissection", formula_length=2, compositional_units=2, figures=2, examples=2
        )
        record = visualizer.run(VisualTarget(bundle, "block3", (), target_sae, str(shapes)), tmp_path / label)
        counts = record["counts"]
        detectors = [e for e in record["units"] if e["detector"]]
        assert counts["units"] == (16 if label == "channels" else 32) == len(record["units"])
        assert counts["detectors"] == len(detectors) >= 0
        assert counts["unique_concepts"] == len({e["concept"] for e in detectors}) <= counts["detectors"]
        assert sum(counts["detectors_by_category"].values()) == counts["detectors"]
        assert all(value >= 0 for value in counts["unique_concepts_by_category"].values())
        assert sum(counts["unique_concepts_by_category"].values()) == counts["unique_concepts"]
        assert all(e["detector"] == (e["iou"] > 0.04) for e in record["units"])
        kind = "channel" if label == "channels" else "latent"
        assert record["summary"].startswith(f"{counts['detectors']} of {counts['units']} {kind}s are detectors")
        reports[label] = counts
    print(
        f"\nunique concept detectors: CNN channels {reports['channels']['unique_concepts']} "
        f"({reports['channels']['detectors']} of 16 channels are detectors), SAE latents "
        f"{reports['latents']['unique_concepts']} ({reports['latents']['detectors']} of 32 latents)"
    )


def test_concept_mask_folders_give_the_same_iou_as_concepts_json(dissected, planted, shapes, tmp_path):
    record, _ = dissected
    data = tmp_path / "user"
    concepts = load_concepts(shapes)
    for number, entry in enumerate(concepts.images):
        (data / "images" / entry["file"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(concepts.image_path(number), data / "images" / entry["file"])
        mask = data / "concept_masks" / "colour" / entry["colour"] / entry["file"]
        mask.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(concepts.foreground(number).astype(np.uint8) * 7, "L").save(mask)  # any non-zero value
    (data / "concept_masks" / "colour" / "purple").mkdir()  # a concept no image shows
    visualizer = convlens.registry.create("visualizer", "dissection", formula_length=1, figures=0)
    folder = visualizer.run(VisualTarget(planted, "feat", (PLANTED["redness"],), None, str(data)), tmp_path / "out")
    entry = folder["units"][0]
    reference = {t["concept"]: t["iou"] for t in by_unit(record)[PLANTED["redness"]]["top"]}
    assert folder["concepts"] == {"colour": sorted(list(concepts.categories["colour"]) + ["purple"])}
    assert entry["concept"] == "colour=red" and entry["iou"] == pytest.approx(reference["colour=red"], rel=1e-12)
    assert folder["images"] == 80 and folder["concept_source"].endswith("concept_masks")


def test_cli_runs_dissection_and_refuses_data_without_concepts(shapes, tmp_path):
    model = ["--model", "tiny-cnn", "--model-blocks", "3", "--model-width", "4", "--model-input-size", "32"]
    data = tmp_path / "shapes"
    shutil.copytree(shapes, data)
    (data / "images" / "circle" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "run"
    result = CliRunner().invoke(
        cli,
        [
            "visualize",
            "network-dissection",
            *model,
            "--layer",
            "block2",
            "--data",
            str(data),
            "--formula-length",
            "2",
            "--compositional-units",
            "2",
            "--examples",
            "2",
            "--iou-threshold",
            "0.01",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    record = json.loads((out / "dissection.json").read_text())
    counts = record["counts"]
    assert (
        f"{counts['detectors']} of 8 channels are detectors (IoU > 0.01) of {counts['unique_concepts']} unique "
        "concepts" in result.output
    )
    assert "formulas up to length 2 for 2 channels; skipped 1 unreadable file" in result.output
    assert (out / "detectors.png").is_file() and (out / "iou.safetensors").is_file()
    assert all((out / f["path"]).is_file() for f in record["figures"])
    assert len([f for f in record["figures"] if f["kind"] == "compositional"]) == 2
    assert record["params"]["iou_threshold"] == 0.01 and record["images"] == 80 and len(record["skipped"]) == 1

    with pytest.raises(ConvlensError, match="channel 9 is out of range: there are 8 channels"):
        convlens.registry.create("visualizer", "dissection").run(
            VisualTarget(
                convlens.registry.create("model", "tiny-cnn", blocks=3, width=4, input_size=32),
                "block2",
                (0, 9),
                None,
                str(shapes),
            ),
            tmp_path / "range",
        )
    plain = tmp_path / "plain"
    plain.mkdir()
    for path in list(scan_images(shapes).paths)[:3]:
        shutil.copy(path, plain / path.name)
    failed = CliRunner().invoke(
        cli, ["visualize", "dissection", *model, "--data", str(plain), "--out", str(tmp_path / "bad")]
    )
    assert failed.exit_code != 0 and "has no concept masks" in failed.output and "Traceback" not in failed.output
    assert len(failed.output.strip().splitlines()) == 1
