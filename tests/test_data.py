import hashlib
import io
import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import convlens
from convlens.cli import cli
from convlens.core.errors import ConvlensError
from convlens.data.concepts import load_concepts
from convlens.data.images import (
    Preprocessing,
    SkipLog,
    SkippedImageWarning,
    UnreadableImageError,
    open_rgb,
    scan_images,
)
from convlens.data.loading import ImageDataset, image_batches
from convlens.data.shapes import COLOURS, SHAPES, TEXTURES, render_shape_image, write_shapes


def write_bad_files(folder):
    """The five awkward files of the acceptance list; returns {name: expected outcome}."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.jpg").write_bytes(b"")
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, "JPEG")
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (folder / "text.jpg").write_text("this is not an image\n")
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    Image.fromarray(np.full((40, 40), 65535, dtype=np.uint16)).save(folder / "grey16.png")
    return {"empty.jpg": "empty file", "truncated.jpg": "truncated image", "text.jpg": "not an image"}


def test_awkward_modes_become_8_bit_rgb(tmp_path):
    cases = {
        "cmyk.jpg": (Image.new("CMYK", (8, 8), (0, 255, 255, 0)), (255, 0, 0)),
        "grey16.png": (Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16)), (128, 128, 128)),
        "grey.png": (Image.new("L", (8, 8), 77), (77, 77, 77)),
        "rgba.png": (Image.new("RGBA", (8, 8), (10, 20, 30, 0)), (255, 255, 255)),  # transparent goes over white
        "half.png": (Image.new("RGBA", (8, 8), (0, 0, 0, 128)), (127, 127, 127)),
        "palette.png": (
            Image.new("RGB", (8, 8), (0, 200, 0)).convert("P", palette=Image.Palette.ADAPTIVE),
            (0, 200, 0),
        ),
        "bilevel.png": (Image.new("1", (8, 8), 1), (255, 255, 255)),
    }
    for name, (image, expected) in cases.items():
        image.save(tmp_path / name)
        decoded = open_rgb(tmp_path / name)
        assert decoded.mode == "RGB", name
        assert all(abs(a - b) <= 2 for a, b in zip(decoded.getpixel((3, 3)), expected)), (
            name,
            decoded.getpixel((3, 3)),
        )


def test_unreadable_files_say_why(tmp_path):
    expected = write_bad_files(tmp_path)
    for name, reason in expected.items():
        with pytest.raises(UnreadableImageError, match=reason):
            open_rgb(tmp_path / name)


def test_scan_finds_classes_flat_folders_and_the_shapes_image_root(tmp_path):
    for label in ("cat", "dog"):
        (tmp_path / "tree" / label).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "tree" / label / "a.png")
    (tmp_path / "tree" / "README.txt").write_text("notes")
    index = scan_images(tmp_path / "tree")
    assert index.class_names == ("cat", "dog") and index.labels == (0, 1)
    assert [p.name for p in index.ignored] == ["README.txt"]

    (tmp_path / "flat").mkdir()
    for name in ("b.png", "a.jpg"):
        Image.new("RGB", (8, 8)).save(tmp_path / "flat" / name)
    flat = scan_images(tmp_path / "flat")
    assert flat.labels is None and [p.name for p in flat.paths] == ["a.jpg", "b.png"]

    write_shapes(tmp_path / "shapes", n=16, size=32)
    shapes = scan_images(tmp_path / "shapes")  # the dataset root, not its images/ folder
    assert shapes.class_names == tuple(sorted(SHAPES)) and len(shapes) == 16

    with pytest.raises(ConvlensError, match="image folder not found"):
        scan_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConvlensError, match="no images found"):
        scan_images(tmp_path / "empty")


def test_batches_skip_bad_files_and_name_them(tmp_path):
    write_bad_files(tmp_path / "data" / "a")
    Image.new("RGB", (20, 30), (255, 0, 0)).save(tmp_path / "data" / "a" / "good.png")
    index = scan_images(tmp_path / "data")
    bundle = convlens.registry.create("model", "tiny-cnn", input_size=16)
    dataset = ImageDataset(index, Preprocessing.of(bundle))
    log = SkipLog()
    with pytest.warns(SkippedImageWarning) as caught:
        batches = list(image_batches(dataset, batch_size=2, skip_log=log))
    assert sorted(str(w.message) for w in caught) == [
        "skipping a/empty.jpg: empty file",
        "skipping a/text.jpg: not an image",
        "skipping a/truncated.jpg: truncated image",
    ]
    used = sorted(index.paths[i].name for batch in batches for i in batch.positions.tolist())
    assert used == ["cmyk.jpg", "good.png", "grey16.png"]
    assert all(batch.images.shape[1:] == (3, 16, 16) for batch in batches)
    assert sorted(log.reasons) == ["a/empty.jpg", "a/text.jpg", "a/truncated.jpg"]
    assert log.summary().startswith("skipped 3 unreadable files: a/empty.jpg (empty file)")


def test_eval_transform_matches_a_float64_reference():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    pre = Preprocessing((32, 32), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), crop_fraction=1.0)
    tensor = pre.eval_transform(image)
    resized = np.asarray(image.resize((48, 32), Image.Resampling.BILINEAR), dtype=np.float64) / 255
    crop = resized[:, 8:40]
    expected = (crop - np.array(pre.mean)) / np.array(pre.std)
    assert tensor.shape == (3, 32, 32)
    assert np.abs(tensor.permute(1, 2, 0).double().numpy() - expected).max() < 0.05
    assert torch.allclose(pre.normalize(pre.denormalize(tensor)), tensor, atol=1e-6)


def test_shapes_same_seed_same_bytes_and_different_seed_differs(tmp_path):
    def digest(folder):
        hasher = hashlib.sha256()
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            hasher.update(path.relative_to(folder).as_posix().encode() + path.read_bytes())
        return hasher.hexdigest()

    write_shapes(tmp_path / "a", n=24, size=32, seed=7)
    write_shapes(tmp_path / "b", n=24, size=32, seed=7)
    write_shapes(tmp_path / "c", n=24, size=32, seed=8)
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")
    # an image does not depend on how many images come before it
    image, mask, record = render_shape_image(20, size=32, seed=7)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a" / "images" / f"{record['shape']}/00020.png")), image)


def test_shapes_concepts_are_independent_of_the_class_and_masks_match_the_drawing(tmp_path):
    n = 480
    records = [render_shape_image(i, size=48, seed=3) for i in range(n)]
    shapes = [r[2]["shape"] for r in records]
    assert {s: shapes.count(s) for s in SHAPES} == {s: n // len(SHAPES) for s in SHAPES}
    colours = [r[2]["colour"] for r in records]
    textures = [r[2]["texture"] for r in records]
    assert set(colours) == set(COLOURS) and set(textures) == set(TEXTURES)
    # chi-square test of independence between class and colour: far from significant
    table = np.zeros((len(SHAPES), len(COLOURS)))
    for shape, colour in zip(shapes, colours):
        table[SHAPES.index(shape), list(COLOURS).index(colour)] += 1
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    chi2 = ((table - expected) ** 2 / expected).sum()
    assert chi2 < 2 * (len(SHAPES) - 1) * (len(COLOURS) - 1)
    rotations = [r[2]["rotation_degrees"] for r in records]
    assert max(rotations) - min(rotations) > 300
    for image, mask, record in records[:40]:
        colour = np.array(COLOURS[record["colour"]], dtype=float)
        inside = image[mask].astype(float).mean(0)
        assert np.abs(inside - colour).max() < 40  # the mask covers the shape's pixels
        area = mask.mean()
        assert 0.02 < area < 0.6
        cy, cx = np.argwhere(mask).mean(0)
        assert math.dist((cx + 0.5, cy + 0.5), record["centre"]) < record["radius"]


def test_concept_masks_cover_foreground_and_background(tmp_path):
    write_shapes(tmp_path / "s", n=8, size=32, seed=0)
    concepts = load_concepts(tmp_path / "s")
    assert concepts.categories["shape"] == SHAPES and len(concepts.images) == 8
    masks = concepts.masks(2)
    record = concepts.images[2]
    shape_mask = masks[("shape", record["shape"])]
    colour_mask = masks[("colour", record["colour"])]
    texture_mask = masks[("texture", record["texture"])]
    assert np.array_equal(shape_mask, colour_mask) and np.array_equal(texture_mask, ~shape_mask)
    assert 0 < shape_mask.mean() < 1
    with pytest.raises(ConvlensError, match="concepts.json"):
        load_concepts(tmp_path)


def test_data_shapes_command(tmp_path):
    out = tmp_path / "shapes"
    result = CliRunner().invoke(cli, ["data", "shapes", "--out", str(out), "--n", "16", "--size", "32", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["images"] == 16 and summary["classes"] == 8
    assert len(list((out / "images").rglob("*.png"))) == 16 and len(list((out / "masks").rglob("*.png"))) == 16
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    result = CliRunner().invoke(cli, ["data", "shapes", "--out", str(tmp_path / "other"), "--n", "4"])
    assert result.exit_code == 1 and "not a shapes dataset" in result.output
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine"
