"""``convlens report``: the static site of a pipeline run folder, built from a small real run."""

from __future__ import annotations

import json
import math
import re
import shutil
import urllib.parse
from html.parser import HTMLParser
from importlib.resources import files
from pathlib import Path

import pytest
from click.testing import CliRunner

from convlens.cli import cli
from helpers import tomllib

FIXTURE_DONE = "fixture-complete"
CNN_VISUALISED = [2, 0, 1]
LATENT_VISUALISED = [3, 1]


def _invoke(*args: str) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, f"convlens {' '.join(map(str, args))} failed:\n{result.output}"
    return result.output


def _plausible_figures(record: dict, run: Path, visualizer: str, units: list[int]) -> list[dict]:
    """``figures`` for a record written before the visualizers listed them: what the files in ``run`` show."""
    figures = []
    if visualizer == "feature-viz":
        for unit, objective in zip(units, record.get("objectives", [])):
            figures.append(
                {
                    "unit": unit,
                    "path": objective["image"],
                    "kind": "feature-viz",
                    "caption": f"image optimised for {objective['objective']}",
                    "small": True,
                    "thumbnail": True,
                }
            )
        if record.get("grid"):
            figures.append({"unit": None, "path": record["grid"], "kind": "grid", "caption": "all units"})
    elif visualizer == "dataset-examples":
        for entry in record.get("units", []):
            unit = entry["unit"]
            montage = f"montages/{unit:04d}.png"
            if (run / montage).is_file():
                figures.append({"unit": unit, "path": montage, "kind": "montage", "caption": "top and bottom images"})
            for side in ("top", "bottom"):
                for rank, example in enumerate(entry.get(side, []), 1):
                    figures.append(
                        {
                            "unit": unit,
                            "path": example["overlay"],
                            "kind": side,
                            "caption": f"{side} {rank}: {example['image']}, peak at {example['peak']}",
                            "small": True,
                            "top_example": side == "top",
                        }
                    )
    else:
        overlays = sorted(p.relative_to(run).as_posix() for p in run.rglob("*.png"))
        for unit, overlay in zip(units, overlays):
            figures.append({"unit": unit, "path": overlay, "kind": "attribution", "caption": f"Grad-CAM on {overlay}"})
    return figures


def _visualize(
    run: Path, folder: str, visualizer: str, model: Path, units: list[int], data: Path, sae: Path | None = None
) -> None:
    out = run / folder
    extra = {
        "feature-viz": ["--steps", "8"],
        "dataset-examples": ["--data", data, "--k", "3", "--max-images", "64"],
        "gradcam": ["--data", data, "--max-images", "3"],
    }[visualizer]
    printed = _invoke(
        "visualize",
        visualizer,
        "--model",
        model,
        "--layer",
        "block3",
        "--units",
        ",".join(map(str, sorted(units))),
        "--out",
        out,
        "--device",
        "cpu",
        "--json",
        *(["--sae", sae] if sae else []),
        *extra,
    )
    record = json.loads(printed)
    if not isinstance(record.get("figures"), list):
        record["figures"] = _plausible_figures(record, out, visualizer, sorted(units))
    if visualizer == "gradcam" and sae is None:  # a third-party kind, markup in a caption, a file that is not there
        existing = next(f["path"] for f in record["figures"] if f.get("unit") is not None)
        record["figures"] += [
            {"unit": units[0], "path": existing, "kind": "my-custom-kind", "caption": "<b>not bold</b> & co"},
            {"unit": units[0], "path": "overlays/not-there.png", "kind": "attribution"},
        ]
    (out / "record.json").write_text(json.dumps(record, indent=1))


def _statistics(run: Path, groups: dict[str, tuple[str, int]]) -> dict:
    """A statistics.json in the unit-statistics format, with deterministic made-up values."""
    values = {
        "shape": ["circle", "crescent", "cross", "heart", "ring", "square", "star", "triangle"],
        "colour": ["red", "green", "blue"],
        "texture": ["plain", "striped"],
    }
    record = {
        "layer": "block3",
        "images": 160,
        "positions_per_image": 16,
        "seed": 0,
        "selective_auroc": 0.9,
        "concepts": values,
        "skipped": [],
        "groups": {},
    }
    for label, (kind, count) in groups.items():
        units, by_attribute = [], dict.fromkeys(values, 0)
        for unit in range(count):
            dead = unit % 7 == 5
            attribute = list(values)[unit % 3]
            auroc = 0.5 + ((unit * 37) % 50) / 100
            value = values[attribute][unit % len(values[attribute])]
            selective = None if dead or auroc < 0.9 else f"{attribute}={value}"
            if selective:
                by_attribute[attribute] += 1
            frequency = 0.0 if dead else ((unit * 13) % 97) / 100 + 0.001
            units.append(
                {
                    "unit": unit,
                    "rank": 0,
                    "frequency": frequency,
                    "image_frequency": min(1.0, 2 * frequency),
                    "mean": frequency / 3,
                    "max": 0.0 if dead else 1 + unit / 10,
                    "mean_image_max": frequency,
                    "share": 0.0,
                    "dead": dead,
                    "best_concept": {"attribute": attribute, "value": value, "auroc": auroc},
                    "selective": selective,
                }
            )
        total = sum(u["mean"] for u in units)
        for u in units:
            u["share"] = u["mean"] / total
        for rank, u in enumerate(sorted(units, key=lambda u: (-u["share"], u["unit"])), 1):
            u["rank"] = rank
        record["groups"][label] = {
            "kind": kind,
            "count": count,
            "units": units,
            "summary": {
                "units": count,
                "dead": sum(u["dead"] for u in units),
                "selective": sum(bool(u["selective"]) for u in units),
                "selective_by_attribute": by_attribute,
            },
        }
    (run / "statistics").mkdir(parents=True)
    (run / "statistics" / "statistics.json").write_text(json.dumps(record, indent=1))
    return record


def build_run_fixture(root: Path) -> Path:
    """A small pipeline run folder made with the real commands (plus hand-written statistics and pipeline.json), in
    the layout `convlens run` writes; built once per ``root`` (later calls return it). Swappable for `convlens demo`.
    """
    run, data = root / "run", root / "run" / "data"
    if (root / FIXTURE_DONE).is_file():
        return run
    if root.exists():
        shutil.rmtree(root)
    model = run / "model"
    _invoke("data", "shapes", "--out", data, "--n", "160", "--size", "32")
    _invoke(
        "train-model",
        "tiny-cnn",
        "--data",
        data,
        "--out",
        model,
        "--epochs",
        "1",
        "--input-size",
        "32",
        "--width",
        "8",
        "--device",
        "cpu",
    )
    store = run / "activations" / "magnitude"
    _invoke(
        "extract",
        "--model",
        model,
        "--data",
        data,
        "--layer",
        "block3",
        "--filter",
        "magnitude",
        "--out",
        store,
        "--per-image",
        "8",
        "--device",
        "cpu",
    )
    _invoke(
        "compare-filters",
        "--model",
        model,
        "--data",
        data,
        "--layer",
        "block3",
        "--filters",
        "magnitude,active-count",
        "--out",
        run / "filters",
        "--max-images",
        "48",
        "--device",
        "cpu",
    )
    for label, options in (
        ("topk", ["--sae", "topk", "--k", "4", "--expansion", "2"]),
        ("relu", ["--sae", "relu-l1", "--expansion", "1"]),
    ):
        _invoke(
            "train-sae",
            "--store",
            store,
            *options,
            "--epochs",
            "1",
            "--log-every",
            "4",
            "--out",
            run / "saes" / label,
            "--device",
            "cpu",
        )
    _invoke(
        "evaluate-sae",
        "--model",
        model,
        "--sae",
        run / "saes" / "topk" / "sae.safetensors",
        "--data",
        data,
        "--max-images",
        "48",
        "--ablate",
        "2",
        "--ablation-images",
        "16",
        "--out",
        run / "evaluation" / "topk.json",
        "--device",
        "cpu",
    )
    sweep_config = root / "sweep.json"
    sweep_config.write_text(
        json.dumps([{"sae": "topk", "params": {"k": k, "expansion": 2.0}, "group": "frontier"} for k in (2, 4)])
    )
    _invoke(
        "sweep", "--store", store, "--config", sweep_config, "--steps", "3", "--out", run / "sweep", "--device", "cpu"
    )
    _statistics(run, {"cnn": ("channel", 32), "topk": ("latent", 64), "relu": ("latent", 32)})
    visualizations = {"cnn": {"units": CNN_VISUALISED, "runs": {}}, "topk": {"units": LATENT_VISUALISED, "runs": {}}}
    for group, units, sae in (
        ("cnn", CNN_VISUALISED, None),
        ("topk", LATENT_VISUALISED, run / "saes" / "topk" / "sae.safetensors"),
    ):
        for visualizer in ("feature-viz", "dataset-examples", "gradcam"):
            folder = f"units/{visualizer}" if sae is None else f"latents/{group}/{visualizer}"
            _visualize(run, folder, visualizer, model, units, data, sae)
            visualizations[group]["runs"][visualizer] = folder
    (run / "recipe.toml").write_text('title = "report fixture"\n')
    pipeline = {
        "title": "report <fixture> & friends",
        "started": "2025-01-01T00:00:00+00:00",
        "finished": "2025-01-01T00:01:00+00:00",
        "versions": {"convlens": "0.1.0"},
        "model": {"name": "tiny-cnn", "params": {"width": 8, "input_size": 32}, "run": "model"},
        "layer": "block3",
        "data": {"path": "data", "images": 160, "concepts": True},
        "filters": {
            "names": ["magnitude", "active-count"],
            "stores": {"magnitude": "activations/magnitude"},
            "comparison": "filters",
        },
        "saes": [
            {
                "label": "topk",
                "name": "topk",
                "params": {"k": 4, "expansion": 2},
                "run": "saes/topk",
                "store": "activations/magnitude",
                "evaluation": "evaluation/topk.json",
            },
            {
                "label": "relu",
                "name": "relu-l1",
                "params": {"expansion": 1},
                "run": "saes/relu",
                "store": "activations/magnitude",
                "evaluation": None,
            },
        ],
        "sweep": "sweep",
        "statistics": "statistics",
        "visualizations": visualizations,
        "steps": [
            {"name": "train-model", "status": "done", "seconds": 3.2, "outputs": ["model"]},
            {"name": "extract:magnitude", "status": "skipped", "seconds": 0.0, "outputs": ["activations"]},
            {"name": "evaluate:relu", "status": "failed", "seconds": None, "outputs": []},
        ],
        "warnings": ["relu: 3 of 32 units never fired <script>alert(1)</script>"],
    }
    (run / "pipeline.json").write_text(json.dumps(pipeline, indent=1))
    (root / FIXTURE_DONE).write_text("")
    return run


# -- reading the site back --------------------------------------------------------------------------------------


class _Page(HTMLParser):
    """Every local reference (href/src) and every ``data-metric`` element (its attributes and text) of a page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.references: list[str] = []
        self.metrics: list[dict[str, str]] = []
        self._open: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag: str, attributes: list[tuple[str, str | None]]) -> None:
        values = {key: value or "" for key, value in attributes}
        for key in ("href", "src"):
            if key in values:
                self.references.append(values[key])
        if "data-metric" in values:
            self._open.append((tag, {**values, "text": ""}))

    def handle_data(self, data: str) -> None:
        for _, values in self._open:
            values["text"] += data

    def handle_endtag(self, tag: str) -> None:
        if self._open and self._open[-1][0] == tag:
            self.metrics.append(self._open.pop()[1])


def _parse(path: Path) -> _Page:
    parser = _Page()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def _metrics(site: Path) -> list[dict[str, str]]:
    return [m for path in (site / "index.html", site / "compare.html") for m in _parse(path).metrics]


def _metric(metrics: list[dict[str, str]], name: str, **match: object) -> dict[str, str]:
    found = [
        m
        for m in metrics
        if m["data-metric"] == name
        and all(m.get(f"data-{key.replace('_', '-')}") == str(value) for key, value in match.items())
    ]
    assert len(found) >= 1, f"no element with data-metric={name} {match}"
    assert len({m["data-value"] for m in found}) == 1, f"data-metric={name} {match} differs between elements"
    return found[0]


def _value(element: dict[str, str]) -> float | None:
    value = json.loads(element["data-value"].replace("NaN", "null"))
    return None if value is None else float(value)


def _close(element: dict[str, str], expected: float | None) -> None:
    value = _value(element)
    if expected is None or (isinstance(expected, float) and math.isnan(expected)):
        assert value is None, element
    else:
        assert value == pytest.approx(expected, rel=1e-12, abs=0), element


def _check_links(site: Path) -> int:
    checked = 0
    for page in sorted(site.rglob("*.html")):
        text = page.read_text(encoding="utf-8")
        assert not re.search(r"https?://", text, re.I), f"{page} names a network address"
        assert "<script src" not in text and "stylesheet" not in text
        for reference in _parse(page).references:
            if reference.startswith(("#", "data:")):
                continue
            assert ":" not in reference.split("/")[0], f"{page}: {reference} is not a relative link"
            target = (page.parent / urllib.parse.unquote(reference.split("#")[0])).resolve()
            assert target.is_file(), f"{page.relative_to(site)} links to {reference}, which does not exist"
            checked += 1
    return checked


def _build(run: Path, *options: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["report", str(run), *options])
    return result.exit_code, result.output


def _copy_run(run: Path, destination: Path) -> Path:
    shutil.copytree(run, destination, ignore=shutil.ignore_patterns("report", "activations", "checkpoints"))
    return destination


@pytest.fixture(scope="module")
def report_run(tmp_path_factory) -> Path:
    return build_run_fixture(tmp_path_factory.getbasetemp() / "report-run")


@pytest.fixture(scope="module")
def site(report_run: Path) -> Path:
    code, output = _build(report_run)
    assert code == 0, output
    assert output.strip().splitlines()[-1].endswith(str(report_run / "report" / "index.html"))
    return report_run / "report"


# -- tests ------------------------------------------------------------------------------------------------------


def test_every_link_resolves_and_nothing_comes_from_the_network(site):
    assert _check_links(site) > 100
    index = (site / "index.html").read_text()
    for target in ("units.html", "compare.html"):
        assert f'href="{target}"' in index
    assert "Content-Security-Policy" in index and "default-src &#x27;none&#x27;" in index


def test_a_page_per_unit_and_latent_with_prev_next_and_the_index(report_run, site):
    statistics = json.loads((report_run / "statistics" / "statistics.json").read_text())
    for label, group in statistics["groups"].items():
        units = [entry["unit"] for entry in group["units"]]
        for unit in units:
            assert (site / "units" / f"{label}-{unit}.html").is_file()
        first = (site / "units" / f"{label}-{units[0]}.html").read_text()
        middle = (site / "units" / f"{label}-{units[1]}.html").read_text()
        assert 'rel="prev"' not in first and f'href="{label}-{units[1]}.html" rel="next"' in first
        assert f'href="{label}-{units[0]}.html" rel="prev"' in middle and 'href="../units.html"' in middle
    index = _parse(site / "units.html")
    rows = (site / "units.html").read_text().count("<tr data-group=")
    assert rows == sum(len(g["units"]) for g in statistics["groups"].values())
    thumbnails = [r for r in index.references if "feature-viz" in r]
    assert len(thumbnails) == len(CNN_VISUALISED) + len(LATENT_VISUALISED)


def test_unit_pages_show_every_figure_of_the_unit_grouped_by_visualizer(report_run, site):
    pipeline = json.loads((report_run / "pipeline.json").read_text())
    for group, entry in pipeline["visualizations"].items():
        for visualizer, folder in entry["runs"].items():
            record = json.loads((report_run / folder / "record.json").read_text())
            for figure in record["figures"]:
                if figure.get("unit") is None or not (report_run / folder / figure["path"]).is_file():
                    continue
                page = site / "units" / f"{group}-{figure['unit']}.html"
                text = page.read_text()
                assert f"<h2>{visualizer}</h2>" in text
                source = urllib.parse.quote(Path("../..", folder, figure["path"]).as_posix())
                assert f'src="{source}"' in text, (page, source)
    unit = (site / "units" / f"cnn-{CNN_VISUALISED[0]}.html").read_text()
    assert "my-custom-kind" in unit and "&lt;b&gt;not bold&lt;/b&gt; &amp; co" in unit and "<b>not bold" not in unit
    assert "not-there.png" not in unit
    assert "peak cell" in unit  # the dataset-examples record's top and bottom images with their peaks
    plain = (site / "units" / "cnn-31.html").read_text()
    assert "The run pictured 3 CNN channels (2, 0, 1); this page shows the statistics only" in plain
    assert 'data-metric="frequency"' in plain
    assert "No visualizer ran on the SAE &#x27;relu&#x27; latents" in (site / "units" / "relu-0.html").read_text()


def test_the_metrics_are_the_numbers_of_the_run_files(report_run, site):
    metrics = _metrics(site)
    comparison = json.loads((report_run / "filters" / "comparison.json").read_text())
    precision = comparison["foreground_precision"]
    _close(_metric(metrics, "foreground-precision-uniform"), precision["uniform"])
    for name, row in precision["filters"].items():
        element = _metric(metrics, "foreground-precision", filter=name)
        _close(element, row["sampled"])
        assert element["text"] == f"{row['sampled']:.4g}"
        _close(_metric(metrics, "foreground-precision-ci-low", filter=name), row["ci95"][0])
        _close(_metric(metrics, "foreground-precision-ci-high", filter=name), row["ci95"][1])
        _close(_metric(metrics, "foreground-precision-difference", filter=name), row["difference"])
    for label in ("topk", "relu"):
        rows = [json.loads(line) for line in (report_run / "saes" / label / "metrics.jsonl").read_text().splitlines()]
        final = rows[-1]["val"]
        for name, key in (
            ("compression", "compression"),
            ("val-mse", "mse"),
            ("fve", "fve"),
            ("l0", "l0"),
            ("dead-fraction", "dead_fraction"),
        ):
            _close(_metric(metrics, name, sae=label), final[key])
        assert _metric(metrics, "compression", sae=label)["text"] == f"{final['compression']:.4g}"
    evaluation = json.loads((report_run / "evaluation" / "topk.json").read_text())
    for name, value in (
        ("top1-model", evaluation["top1"]["model"]),
        ("top1-sae", evaluation["top1"]["sae"]),
        ("top1-zero", evaluation["top1"]["zero"]),
        ("kl-sae", evaluation["kl_sae"]),
        ("kl-recovered", evaluation["kl_recovered"]),
    ):
        _close(_metric(metrics, name, sae="topk"), value)
    assert _metric(metrics, "top1-sae", sae="topk")["text"] == f"{100 * evaluation['top1']['sae']:.1f} %"
    assert not [m for m in metrics if m["data-metric"] == "top1-sae" and m.get("data-sae") == "relu"]
    statistics = json.loads((report_run / "statistics" / "statistics.json").read_text())
    for label, group in statistics["groups"].items():
        summary = group["summary"]
        for attribute, count in summary["selective_by_attribute"].items():
            _close(_metric(metrics, "selective", group=label, attribute=attribute), count)
            _close(_metric(metrics, "selective-share", group=label, attribute=attribute), count / summary["units"])
        _close(_metric(metrics, "selective", group=label, attribute="any"), summary["selective"])
        _close(_metric(metrics, "units", group=label), summary["units"])
    statement = (site / "index.html").read_text().split('id="selectivity-statement"')[1].split("</p>")[0]
    for label in statistics["groups"]:
        assert f'data-metric="selective" data-group="{label}" data-attribute="shape"' in statement


def test_the_overview_holds_steps_warnings_and_figures_escaped(site):
    index = (site / "index.html").read_text()
    assert "report &lt;fixture&gt; &amp; friends" in index and "<fixture>" not in index
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in index and "<script>alert" not in index
    assert 'data-step="evaluate:relu">failed' in index and 'class="status-skipped"' in index
    for picture in (
        "filters/cosine.png",
        "filters/spearman.png",
        "filters/foreground-precision.png",
        "filters/overlays/",
        "saes/topk/curves.png",
        "sweep/pareto.png",
        "model/curves.png",
    ):
        assert f'src="../{picture}' in index, picture
    assert 'id="sweep-table"' in index and 'id="splice-table"' in index
    assert "SAE &#x27;relu&#x27;: not spliced into the model" in index
    compare = (site / "compare.html").read_text()
    cells = re.findall(r'<td data-group="(\w+)" data-unit="(\d+)">', compare)
    expected = [[("cnn", str(unit))] for unit in CNN_VISUALISED]
    for rank, unit in enumerate(LATENT_VISUALISED):
        expected[rank].append(("topk", str(unit)))
    assert cells == [pair for row in expected for pair in row]


def test_rebuilding_gives_the_same_files_and_copy_images_makes_a_site_of_its_own(report_run, site, tmp_path):
    before = {p.relative_to(site): p.read_bytes() for p in sorted(site.rglob("*")) if p.is_file()}
    code, output = _build(report_run)
    assert code == 0, output
    after = {p.relative_to(site): p.read_bytes() for p in sorted(site.rglob("*")) if p.is_file()}
    assert before == after
    copied = tmp_path / "elsewhere"
    code, output = _build(report_run, "--out", str(copied), "--copy-images")
    assert code == 0, output
    assert _check_links(copied) > 100
    for page in copied.rglob("*.html"):
        for reference in _parse(page).references:
            target = (page.parent / urllib.parse.unquote(reference)).resolve()
            assert reference.startswith(("#", "data:")) or copied in target.parents, (page, reference)
    assert (copied / "assets" / "filters" / "cosine.png").is_file()
    code, output = _build(report_run, "--out", str(report_run / "filters"))
    assert code == 1 and "holds other files" in output


def test_missing_parts_leave_notes_and_stale_pages_go(report_run, tmp_path):
    run = _copy_run(report_run, tmp_path / "run")
    code, output = _build(run)
    assert code == 0, output
    assert (run / "report" / "units" / "relu-3.html").is_file()
    shutil.rmtree(run / "sweep")
    shutil.rmtree(run / "latents")
    shutil.rmtree(run / "units" / "gradcam")
    (run / "evaluation" / "topk.json").unlink()
    (run / "saes" / "relu" / "metrics.jsonl").unlink()
    statistics = json.loads((run / "statistics" / "statistics.json").read_text())
    statistics["concepts"] = None
    del statistics["groups"]["relu"]
    for group in statistics["groups"].values():
        for unit in group["units"]:
            unit["best_concept"] = unit["selective"] = None
    (run / "statistics" / "statistics.json").write_text(json.dumps(statistics))
    pipeline = json.loads((run / "pipeline.json").read_text())
    pipeline["filters"]["comparison"] = None
    del pipeline["saes"][1]
    (run / "pipeline.json").write_text(json.dumps(pipeline))
    code, output = _build(run)
    assert code == 0, output
    site = run / "report"
    _check_links(site)
    notes = json.loads((site / "report.json").read_text())["notes"]
    for expected in (
        "sweep: sweep/sweep.json is missing",
        "visualizer run 'gradcam' (units/gradcam) is missing",
        "evaluation: evaluation/topk.json is missing",
        "no filter comparison",
        "no concepts",
    ):
        assert any(expected in line for line in notes), (expected, notes)
    index = (site / "index.html").read_text()
    assert "No filter comparison in this run." in index and "no single concept" not in index
    assert not (site / "units" / "relu-3.html").exists() and (site / "units" / "topk-3.html").is_file()
    assert "<h2>gradcam</h2>" not in (site / "units" / f"cnn-{CNN_VISUALISED[0]}.html").read_text()

    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "pipeline.json").write_text(
        json.dumps({"title": "nothing yet", "steps": [{"name": "train-model", "status": "pending"}]})
    )
    code, output = _build(bare, "--json")
    assert code == 0, output
    summary = json.loads(output)
    assert summary["pages"] == 3 and summary["groups"] == {} and len(summary["notes"]) >= 4
    _check_links(bare / "report")


def test_a_folder_that_is_not_a_run_is_one_error(tmp_path):
    (tmp_path / "images").mkdir()
    for folder, expected in ((tmp_path, "it has no pipeline.json"), (tmp_path / "absent", "is not a folder")):
        code, output = _build(folder)
        lines = output.strip().splitlines()
        assert code == 1 and len(lines) == 1 and lines[0].startswith("Error:") and expected in lines[0], output
    (tmp_path / "pipeline.json").write_text("{not json")
    code, output = _build(tmp_path)
    assert code == 1 and output.count("Error:") == 1 and "cannot read" in output
    assert not (tmp_path / "report").exists()


def test_json_summary_and_no_torch_import(report_run, tmp_path):
    code, output = _build(report_run, "--json", "--out", str(tmp_path / "site"))
    assert code == 0, output
    summary = json.loads(output)
    assert summary["index"] == str(tmp_path / "site" / "index.html")
    assert summary["groups"]["cnn"] == {
        "kind": "channel",
        "pages": 32,
        "visualised": 3,
        "figures": summary["groups"]["cnn"]["figures"],
    }
    assert summary["pages"] == 3 + 32 + 64 + 32 and summary["warnings"]
    import subprocess
    import sys

    script = (
        "import sys; from convlens.report.site import build_report; "
        f"build_report({str(report_run)!r}, {str(tmp_path / 'again')!r}); "
        "assert 'torch' not in sys.modules, 'the report imported torch'"
    )
    subprocess.run([sys.executable, "-c", script], check=True)


def test_the_style_sheet_and_script_are_package_data_inlined_into_the_pages(tmp_path):
    assets = files("convlens.report") / "assets"
    style, script = (assets / name for name in ("report.css", "report.js"))
    assert style.is_file() and script.is_file()
    css, js = style.read_text(encoding="utf-8"), script.read_text(encoding="utf-8")
    run = tmp_path / "run"
    run.mkdir()
    (run / "pipeline.json").write_text(json.dumps({"title": "assets"}))
    code, output = _build(run)
    assert code == 0, output
    for name in ("index.html", "units.html", "compare.html"):
        text = (run / "report" / name).read_text(encoding="utf-8")
        assert text.count("<style>") == 1 and f"<style>\n{css}</style>" in text
        assert (f"<script>\n{js}</script>" in text) == (name == "units.html")
        assert not re.search(r"https?://|<link rel=\"stylesheet\"|<script src|@import|url\(", text), name


def test_the_assets_are_declared_package_data():
    config = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
    assert "assets/*" in config["tool"]["setuptools"]["package-data"]["convlens.report"]
