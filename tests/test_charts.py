"""Charts written as PNG and SVG (matplotlib): axes fitted to each scale, legends outside the data, whole-number
ticks for epochs and steps, the same bytes for the same data, and an SVG beside every chart a run writes."""

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import convlens
from convlens.activations.store import store_from_tensors
from convlens.cli import cli
from convlens.sae.training import SAETrainingParams, train_sae

SVG = "{http://www.w3.org/2000/svg}"


def _root(path):
    return ET.parse(path).getroot()


def _element(root, gid):
    found = [element for element in root.iter() if element.get("id") == gid]
    assert len(found) == 1, f"{gid}: {len(found)} elements"
    return found[0]


def _points(element):
    """The (x, y) vertices of the first path in ``element`` (matplotlib writes straight segments as M/L)."""
    path = element if element.tag == f"{SVG}path" else element.find(f".//{SVG}path")
    numbers = [float(n) for n in re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", path.get("d"))]
    return list(zip(numbers[0::2], numbers[1::2]))


def _box(element):
    xs, ys = zip(*_points(element))
    return min(xs), min(ys), max(xs), max(ys)


def _tick_labels(root, axes_gid, axis="x"):
    axes = _element(root, axes_gid)
    ticks = [g for g in axes.iter(f"{SVG}g") if (g.get("id") or "").startswith(f"{axis}tick_")]
    return [g.find(f".//{SVG}text").text.replace("\u2212", "-") for g in ticks]


@pytest.fixture(scope="module")
def sae_run(tmp_path_factory):
    """A ReLU SAE trained for 60 steps on 4096 low-rank vectors, logged every 10 steps with validation."""
    generator = torch.Generator().manual_seed(0)
    data = torch.randn(4096, 6, generator=generator) @ torch.randn(6, 16, generator=generator)
    split = (torch.arange(len(data)) % 8 == 0).to(torch.uint8)
    root = tmp_path_factory.mktemp("charts")
    store = store_from_tensors(root / "store", data, split=split)
    sae = convlens.registry.create("sae", "relu-l1", input_dim=16, latent_dim=64)
    settings = SAETrainingParams(steps=60, batch_size=128, lr=3e-3, log_every=10, val_samples=256)
    record = {"name": "relu-l1", "params": {"input_dim": 16, "latent_dim": 64}}
    train_sae(sae, record, store, root / "sae", settings, progress=False)
    rows = [json.loads(line) for line in (root / "sae" / "metrics.jsonl").read_text().splitlines()]
    return root / "sae", rows


def test_the_mse_has_its_own_axis_and_spans_more_than_half_of_it(sae_run):
    run, rows = sae_run
    root = _root(run / "curves.svg")
    left, top, right, bottom = _box(_element(root, "chart-mse-area"))
    points = _points(_element(root, "chart-mse-series-train-mse"))
    ys = [y for _, y in points]
    assert (max(ys) - min(ys)) / (bottom - top) > 0.5
    mse = [row["train"]["mse"] for row in rows]
    assert len(points) == len(mse) == 6
    for y, value in zip(ys, mse):  # the line is the MSE on a linear axis: positions are affine in the values
        assert (y - ys[0]) / (ys[-1] - ys[0]) == pytest.approx((value - mse[0]) / (mse[-1] - mse[0]), abs=1e-4)
    assert max(row["train"]["loss"] for row in rows) > 2 * max(mse)  # the objective would flatten the MSE
    for gid in ("chart-l0-series-train-l0", "chart-l0-series-validation-l0"):
        area_top, area_bottom = _box(_element(root, "chart-l0-area"))[1::2]
        l0 = [y for _, y in _points(_element(root, gid))]
        margin = 0.04 * (area_bottom - area_top)
        assert area_top + margin < min(l0) and max(l0) < area_bottom - margin, gid


def test_step_and_epoch_ticks_are_whole_numbers(sae_run, tmp_path):
    run, _ = sae_run
    root = _root(run / "curves.svg")
    for panel in ("loss", "mse", "l0"):
        labels = _tick_labels(root, f"chart-{panel}")
        assert len(labels) >= 3 and all(re.fullmatch(r"-?\d+", label) for label in labels), (panel, labels)
    series = {"train": ([1, 2, 3], [0.9, 0.5, 0.4])}
    for integer_x, name in ((True, "integer"), (False, "plain")):
        panel = convlens.LinePanel(series=series, title="t", xlabel="epoch", ylabel="loss", integer_x=integer_x)
        convlens.save_chart(panel, tmp_path / f"{name}.png")
    assert _tick_labels(_root(tmp_path / "integer.svg"), "chart-t") == ["1", "2", "3"]
    assert "1.50" in _tick_labels(_root(tmp_path / "plain.svg"), "chart-t")  # matplotlib on its own: fractional


def test_legends_lie_outside_the_plot_areas_and_inside_the_picture(sae_run):
    run, _ = sae_run
    root = _root(run / "curves.svg")
    width, height = (float(n) for n in root.get("viewBox").split()[2:])
    areas = [_box(_element(root, f"chart-{panel}-area")) for panel in ("loss", "mse", "l0")]
    assert not [element for element in root.iter() if element.get("id") == "chart-loss-legend"]  # one line: none
    for panel, following in (("mse", areas[2]), ("l0", None)):
        area = _box(_element(root, f"chart-{panel}-area"))
        legend = _box(_element(root, f"chart-{panel}-legend"))
        assert legend[0] > area[2], panel  # right of its plot area
        assert legend[2] < (following[0] if following else width) and 0 <= legend[1] < legend[3] <= height, panel


def test_the_same_data_gives_the_same_bytes(tmp_path):
    panels = [
        convlens.LinePanel(
            series={"a": ([0, 10, 20], [3.0, 2.0, 1.5]), "b": ([0, 10, 20], [0.04, 0.03, 0.02])},
            title="loss",
            xlabel="step",
            ylabel="value",
            integer_x=True,
        ),
        convlens.BarPanel(labels=["cat", "dog"], values=[0.7, 0.2], title="share", xlabel="fraction", maximum=1),
    ]
    first = convlens.save_chart(panels, tmp_path / "one" / "chart.png")
    second = convlens.save_chart(panels, tmp_path / "two" / "chart.png")
    for written, again in zip(first, second):
        assert written.read_bytes() == again.read_bytes(), written.name
    svg = first[1].read_text()
    assert "<dc:date>" not in svg and "<text" in svg  # no date; text kept as text
    with Image.open(first[0]) as picture:
        assert picture.width > 800 and picture.height > 300


def test_the_report_links_a_chart_to_its_svg(tmp_path):
    from convlens.report.links import Links

    run, site = tmp_path / "run", tmp_path / "run" / "report"
    panel = convlens.BarPanel(labels=["a"], values=[1.0], title="t", xlabel="x")
    chart, svg = convlens.save_chart(panel, run / "sae" / "curves.png")
    picture = run / "sae" / "picture.png"
    Image.new("RGB", (4, 4)).save(picture)
    links = Links(site, run)
    html = links.picture(site / "index.html", chart, "curves")
    assert '<img src="../sae/curves.png"' in html and '<a class="svg" href="../sae/curves.svg">SVG</a>' in html
    assert 'class="svg"' not in links.picture(site / "index.html", picture, "a picture")
    copying = Links(site, run, copy_images=True)
    assert 'href="assets/sae/curves.svg"' in copying.picture(site / "index.html", chart, "curves")
    assert copying.copies[svg] == site / "assets" / "sae" / "curves.svg"


def test_the_pillow_pictures_stay_available_for_plugins():
    picture = convlens.line_chart({"a": ([1, 2], [1.0, 2.0])}, title="t", xlabel="x", ylabel="y", size=(400, 300))
    bars = convlens.bar_chart(["a", "b"], [1.0, 2.0], title="t", xlabel="x")
    assert picture.size == (400, 300) and picture.mode == "RGB" and bars.mode == "RGB" and bars.width > 300


def test_convlens_imports_matplotlib_only_to_draw():
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from convlens.cli import cli\n"
        "for args in (['list'], ['--help'], ['train-sae', '--help']):\n"
        "    assert CliRunner().invoke(cli, args).exit_code == 0, args\n"
        "import convlens, convlens.drawing.charts, convlens.drawing.plots\n"
        "convlens.LinePanel, convlens.save_chart, convlens.INK\n"
        "print('matplotlib' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def _invoke(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow
def test_every_chart_a_run_writes_has_an_svg_beside_it(small_trained_model, tmp_path):
    model, data, run = small_trained_model.model, small_trained_model.data, tmp_path
    cpu = ("--device", "cpu")
    on_model = ("--model", model, "--layer", "block3", *cpu)
    store, sae = run / "store", run / "sae"
    _invoke("extract", *on_model, "--data", data, "--out", store)
    _invoke("train-sae", "--store", store, *"--sae topk --k 4 --steps 20 --log-every 5".split(), "--out", sae, *cpu)
    configs = [{"sae": "topk", "params": {"k": k}} for k in (2, 4)]
    configs += [{"sae": "topk", "params": {"k": 3, "expansion": e}, "group": "expansion"} for e in (1, 2)]
    (run / "sweep.json").write_text(json.dumps(configs))
    _invoke("sweep", "--store", store, "--config", run / "sweep.json", "--steps", "5", "--out", run / "sweep", *cpu)
    filters = ("--filters", "magnitude,active-count", "--max-images", "24")
    _invoke("compare-filters", *on_model, "--data", data, *filters, "--out", run / "filters")
    image = sorted((data / "images").rglob("*.png"))[0]
    _invoke(
        "rank-units", *on_model, "--image", image, "--sae", sae / "sae.safetensors", "--top", "3", "--out", run / "rank"
    )
    _invoke("sanity-check", "gradcam", *on_model, "--data", data, "--max-images", "8", "--out", run / "sanity")
    written = {
        prefix + png.relative_to(folder).as_posix(): png
        for prefix, folder in (("", run), ("model/", model))
        for png in folder.rglob("*.png")
    }
    charts = {
        "model/curves.png",
        "model/error-analysis.png",
        "sae/curves.png",
        "sweep/pareto.png",
        "sweep/ablations.png",
        "filters/foreground-precision.png",
        "rank/top-channels.png",
        "rank/top-latents.png",
        "sanity/spearman.png",
    }
    with_svg = {name for name, png in written.items() if png.with_suffix(".svg").is_file()}
    assert with_svg == charts
    pictures = set(written) - with_svg  # overlays, map grids and the similarity matrices stay Pillow PNGs
    assert {"filters/cosine.png", "filters/spearman.png", "sanity/cascade-gradcam.png"} <= pictures
    assert all(
        name in ("filters/cosine.png", "filters/spearman.png")
        or name.startswith(("filters/overlays/", "sanity/cascade-"))
        for name in pictures
    ), pictures
