"""`convlens data photos` and `convlens data fashion-mnist`: photos copied byte for byte with their provenance, and
Fashion-MNIST from Debian's idx files (checked against a plain reading of the same files and planted idx files)."""

import gzip
import hashlib
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from convlens.cli import cli
from convlens.data import fashion_mnist, real_photos
from convlens.data.concepts import load_concepts
from convlens.data.fashion_mnist import DEBIAN_FOLDER, IdxError, class_folder, read_idx
from convlens.data.images import scan_images

needs_foolbox = pytest.mark.skipif(
    importlib.util.find_spec("foolbox") is None, reason='needs foolbox\'s photos: pip install -e ".[real]"'
)
needs_fashion_mnist = pytest.mark.skipif(
    not DEBIAN_FOLDER.is_dir(), reason="needs Debian's dataset-fashion-mnist: apt-get install dataset-fashion-mnist"
)


def invoke(*args):
    return CliRunner().invoke(cli, ["data", *map(str, args)])


def fake_categories(monkeypatch):
    """ImageNet class names without importing torchvision: 'class 0', 'class 1', ..."""
    monkeypatch.setattr(real_photos, "imagenet_categories", lambda: [f"class {i}" for i in range(1000)])


@needs_foolbox
def test_photos_are_exact_copies_with_foolbox_labels_and_provenance(tmp_path):
    out = tmp_path / "photos"
    result = invoke("photos", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    record = json.loads((out / "photos.json").read_text())
    images = record["images"]
    assert summary["images"] == len(images) and summary["sources"]["foolbox"] == 20
    foolbox_data = Path(importlib.util.find_spec("foolbox").origin).parent / "data"
    labelled = {item["original"]: item for item in images if item["source"] == "foolbox"}
    assert sorted(labelled) == [f"foolbox/data/{p.name}" for p in sorted(foolbox_data.glob("imagenet_*.jpg"))]
    for original, item in labelled.items():
        name = original.rsplit("/", 1)[1]
        assert (out / item["file"]).read_bytes() == (foolbox_data / name).read_bytes()
        assert item["imagenet_index"] == int(re.fullmatch(r"imagenet_\d+_(\d+)\.jpg", name)[1])
    assert labelled["foolbox/data/imagenet_00_243.jpg"]["imagenet_class"] == "bull mastiff"
    assert labelled["foolbox/data/imagenet_00_243.jpg"]["file"] == "foolbox_imagenet_00_243_bull_mastiff.jpg"
    for item in images:
        assert hashlib.sha256((out / item["file"]).read_bytes()).hexdigest() == item["sha256"]
        assert item["licence"]
        if item["source"] != "foolbox":
            assert item["file"] == f"{item['source']}_{item['original'].rsplit('/', 1)[1]}"
    index = scan_images(out)  # a flat folder of unlabelled images
    assert index.labels is None and sorted(p.name for p in index.paths) == sorted(item["file"] for item in images)


def test_a_missing_source_is_skipped_named_and_its_old_files_removed(tmp_path, monkeypatch):
    fake_categories(monkeypatch)
    out = tmp_path / "photos"
    assert invoke("photos", "--out", out).exit_code == 0
    found = real_photos.source_folder
    monkeypatch.setattr(real_photos, "source_folder", lambda s: found(s) if s.name == "scikit-learn" else None)
    result = invoke("photos", "--out", out)
    assert result.exit_code == 0, result.output
    assert "wrote 2 photos (0 ImageNet-labelled; scikit-learn 2)" in result.output
    assert 'skipped foolbox (not installed: pip install -e ".[real]")' in result.output
    assert "skipped opencv-doc (not installed: apt-get install opencv-doc)" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["photos.json", "scikit-learn_china.jpg", "scikit-learn_flower.jpg"]
    record = json.loads((out / "photos.json").read_text())
    assert {item["source"] for item in record["skipped"]} >= {"foolbox", "opencv-doc"}
    assert record["images"][0]["licence"].startswith("CC BY 2.0")

    monkeypatch.setattr(real_photos, "source_folder", lambda s: None)
    result = invoke("photos", "--out", tmp_path / "none")
    assert result.exit_code == 1 and "no photo source is installed" in result.output
    assert "apt-get install opencv-doc" in result.output


def test_data_commands_refuse_a_folder_written_by_something_else(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    for command in ("photos", "fashion-mnist"):
        result = invoke(
            command, "--out", tmp_path / "mine", *(["--source", tmp_path] if command == "fashion-mnist" else [])
        )
        assert result.exit_code == 1 and f"not written by `convlens data {command}`" in result.output
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def write_idx(path, array, type_code=0x08):
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return data


def test_idx_reader_reads_planted_arrays_and_names_what_is_wrong(tmp_path):
    pixels = np.arange(24, dtype=np.uint8).reshape(3, 2, 4)
    write_idx(tmp_path / "images.gz", pixels)
    assert np.array_equal(read_idx(tmp_path / "images.gz"), pixels)
    numbers = np.array([[-5, 70000], [3, 2**31 - 1]], dtype=np.int32)
    write_idx(tmp_path / "numbers", numbers, type_code=0x0C)
    assert np.array_equal(read_idx(tmp_path / "numbers"), numbers)

    data = write_idx(tmp_path / "ok", pixels)
    (tmp_path / "short").write_bytes(data[:-1])
    (tmp_path / "magic").write_bytes(b"\x08\x03" + data[2:])
    (tmp_path / "header").write_bytes(data[:9])
    (tmp_path / "garbage.gz").write_bytes(b"not gzip at all")
    (tmp_path / "cut.gz").write_bytes(gzip.compress(data)[:-10])
    flipped = bytearray(gzip.compress(bytes(range(256)) * 8))
    flipped[30:40] = bytes(10)
    (tmp_path / "flipped.gz").write_bytes(bytes(flipped))
    for name, message in [
        ("short", "the header promises 3x2x4 values \\(24 bytes\\) but 23 bytes follow"),
        ("magic", "not an idx file \\(magic number 08030803\\)"),
        ("header", "truncated header"),
        ("garbage.gz", "corrupt gzip file"),
        ("cut.gz", "corrupt gzip file"),
        ("flipped.gz", "corrupt gzip file"),
        ("absent.gz", "file not found"),
    ]:
        with pytest.raises(IdxError, match=f"{name}: {message}"):
            read_idx(tmp_path / name)


def test_fashion_mnist_from_planted_idx_files_via_the_environment(tmp_path, monkeypatch):
    source = tmp_path / "source"
    source.mkdir()
    rng = np.random.default_rng(0)
    pixels = (rng.integers(0, 256, (30, 5, 6)) * (rng.random((30, 5, 6)) < 0.5)).astype(np.uint8)
    labels = np.arange(30, dtype=np.uint8) % 10
    write_idx(source / "t10k-images-idx3-ubyte.gz", pixels)
    write_idx(source / "t10k-labels-idx1-ubyte.gz", labels)
    monkeypatch.setenv(fashion_mnist.SOURCE_ENV, str(source))
    result = invoke("fashion-mnist", "--out", tmp_path / "fm", "--split", "test", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["images"] == 30
    for position in (0, 13, 29):
        name = f"{class_folder(int(labels[position]))}/{position:05d}.png"
        assert np.array_equal(np.asarray(Image.open(tmp_path / "fm" / "images" / name)), pixels[position])
        mask = np.asarray(Image.open(tmp_path / "fm" / "masks" / name))
        assert np.array_equal(mask, np.where(pixels[position] > 0, 255, 0))
    assert "train-labels-idx1-ubyte.gz" in invoke("fashion-mnist", "--out", tmp_path / "x", "--n", 10).output


@needs_fashion_mnist
def test_fashion_mnist_command_on_the_debian_files(tmp_path):
    out = tmp_path / "fm"
    result = invoke("fashion-mnist", "--out", out, "--n", 50)
    assert result.exit_code == 0, result.output
    assert "wrote 50 Fashion-MNIST train images" in result.output
    reference = np.frombuffer(
        gzip.open(DEBIAN_FOLDER / "train-images-idx3-ubyte.gz").read(), np.uint8, offset=16
    ).reshape(-1, 28, 28)
    reference_labels = np.frombuffer(gzip.open(DEBIAN_FOLDER / "train-labels-idx1-ubyte.gz").read(), np.uint8, offset=8)
    index = scan_images(out)
    assert index.class_names == tuple(class_folder(k) for k in range(10))
    assert index.class_names[0] == "0_T-shirt_top" and index.class_names[9] == "9_Ankle_boot"
    assert np.bincount(index.labels).tolist() == [5] * 10
    concepts = load_concepts(out)
    for number, record in enumerate(concepts.images):
        assert record["label"] == reference_labels[record["index"]]
        assert record["file"].startswith(f"{record['label']}_")
        image = np.asarray(Image.open(concepts.image_path(number)))
        assert np.array_equal(image, reference[record["index"]])
        assert np.array_equal(concepts.foreground(number), reference[record["index"]] > 0)

    first = {record["index"] for record in concepts.images}
    assert invoke("fashion-mnist", "--out", out, "--n", 50, "--seed", 1).exit_code == 0
    second = {record["index"] for record in load_concepts(out).images}
    assert first != second and len(list((out / "images").rglob("*.png"))) == 50  # the first draw's files are gone
    assert len(list((out / "masks").rglob("*.png"))) == 50


def test_fashion_mnist_missing_package_names_it_and_the_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DEBIAN_FOLDER", tmp_path / "absent")
    monkeypatch.delenv(fashion_mnist.SOURCE_ENV, raising=False)
    result = invoke("fashion-mnist", "--out", tmp_path / "fm", "--n", 10)
    assert result.exit_code == 1
    assert f"no folder {tmp_path / 'absent'}" in result.output
    assert "apt-get install dataset-fashion-mnist" in result.output
    assert not (tmp_path / "fm").exists()
