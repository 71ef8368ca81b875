"""Which units a run pictures, the command a unit page gives, and the checks that warn when a result is not worth
reading: each against hand-built records."""

from __future__ import annotations

import json

import click
import pytest

from convlens.core.component_registry import default_registry
from convlens.core.params import click_parameters, coerce, command_line_options, values_from_click
from convlens.report.unit_pages import ablation_effect
from convlens.units.selection import UnitChoice, choose_units
from convlens.workflow.checks import _render_failure, near_chance
from convlens.workflow.pipeline import VISUALIZE_COMMAND_OPTIONS


def unit(number, rank, auroc=None, image_frequency=0.5, frequency=0.1, dead=False):
    best = None if auroc is None else {"attribute": "shape", "value": "ring", "auroc": auroc}
    return {
        "unit": number,
        "rank": rank,
        "best_concept": best,
        "image_frequency": image_frequency,
        "frequency": frequency,
        "dead": dead,
    }


RECORDS = [
    unit(0, 1, 0.60, image_frequency=1.0, frequency=0.9),
    unit(1, 2, 0.70),
    unit(2, 3, 0.99, dead=True),  # the most selective by AUROC, but dead: never pictured
    unit(3, 4, 0.95),
    unit(4, 5, 0.91, image_frequency=0.99, frequency=0.2),
    unit(5, 6, 0.65, image_frequency=0.99, frequency=0.3),
    unit(6, 7, 0.92),
]


def test_units_are_chosen_by_share_then_selectivity_then_frequency():
    chosen = choose_units(RECORDS, UnitChoice(by_share=2, selective=3, frequent=1))
    assert chosen == {0: ["share"], 1: ["share"], 3: ["selective"], 6: ["selective"], 4: ["selective"], 5: ["frequent"]}
    overlapping = choose_units(RECORDS, UnitChoice(by_share=4, selective=1, frequent=0))
    assert overlapping == {0: ["share"], 1: ["share"], 3: ["share", "selective"], 4: ["share"]}
    without_concepts = [{**r, "best_concept": None} for r in RECORDS]
    assert list(choose_units(without_concepts, UnitChoice(1, 3, 2))) == [0, 5, 4]  # same images: more positions


def visualize_parser(spec) -> click.Command:
    options = click_parameters(spec, reserved=VISUALIZE_COMMAND_OPTIONS, prefix="viz", dest_prefix="v__")
    return click.Command("visualize", params=options, callback=lambda **kwargs: kwargs)


@pytest.mark.parametrize(
    "name, values",
    [
        ("feature-viz", {"preset": "naive", "steps": 8, "seed": 3, "objective": "channel"}),
        ("gradcam", {"map_layer": "block2", "alpha": 0.25}),
        ("dataset-examples", {"k": 2}),
        ("circuit", {"neuron": True, "validate": False, "sparsities": (0.5, 0.1), "class_index": 2}),
    ],
)
def test_command_line_options_give_back_the_values_they_were_made_from(name, values):
    spec = default_registry().get("visualizer", name).spec.params
    words = command_line_options(spec, values, reserved=VISUALIZE_COMMAND_OPTIONS, prefix="viz")
    parsed = visualize_parser(spec).main(words, standalone_mode=False)
    assert coerce(spec, values_from_click(parsed, "v__")) == coerce(spec, values)


def test_the_reserved_options_are_those_of_convlens_visualize():
    from convlens.cli.visualize import visualize_command

    own = {
        opt.lstrip("-")
        for param in visualize_command.params
        if not (param.name or "").startswith(("model__", "visualizer__"))  # added while parsing one command line
        for opt in param.opts
        if opt.startswith("-")
    }
    assert own == set(VISUALIZE_COMMAND_OPTIONS)


def test_a_model_is_near_chance_by_margin_and_by_sample_size():
    assert near_chance(0.36, 3, 0.1) and not near_chance(0.41, 3, 0.1)  # the line: 1/3 + 0.1 * 2/3 = 0.4
    assert near_chance(0.5, 3, 0.1, images=30)  # 2 standard errors at chance on 30 images: 0.172
    assert not near_chance(0.9, 3, 0.1, images=30)
    assert not near_chance(0.2, 1000, 0.1, images=1000) and near_chance(0.05, 1000, 0.1)


def test_a_render_is_flagged_below_its_start_or_a_share_of_the_best_image():
    assert "not above its start" in _render_failure(1.0, 1.2, None, 0.5)
    assert "20 % of the unit's best image" in _render_failure(2.0, 1.0, 10.0, 0.5)
    assert _render_failure(6.0, 1.0, 10.0, 0.5) is None and _render_failure(2.0, 1.0, None, 0.5) is None


def test_the_ablation_sentence_agrees_with_the_signs_of_its_numbers():
    assert ablation_effect([("ring", -0.3), ("star", -0.1), ("disc", 0.2)]) == (
        "zeroing it lowers the class logits most for ring -0.3, star -0.1 (mean change)"
    )
    raised = ablation_effect([("ring", 0.592), ("star", 0.7)])
    assert "lowers no class logit" in raised and "ring +0.592" in raised


def write_json(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def test_sae_and_filter_checks_warn_past_their_limits_only(tmp_path):
    from convlens.workflow.checks import fallback_warnings, sae_warnings
    from convlens.workflow.recipes import WarningsSection

    layout = {
        "saes": [
            {"label": "bad", "run": "saes/bad", "evaluation": "evaluation/bad.json"},
            {"label": "good", "run": "saes/good", "evaluation": "evaluation/good.json"},
        ],
        "filters": {"stores": {"magnitude": "activations/magnitude", "median": "activations/median"}},
    }
    for label, dead, dense, drop in (("bad", 0.6, 0.2, 0.08), ("good", 0.5, 0.1, 0.05)):
        write_json(
            tmp_path / f"saes/{label}/summary.json",
            {"final": {"val": {"dead_fraction": dead, "dense_fraction": dense}}},
        )
        write_json(tmp_path / f"evaluation/{label}.json", {"top1_drop": drop})
    write_json(tmp_path / "activations/magnitude/manifest.json", {"fallbacks": 30, "images_used": 100})
    write_json(tmp_path / "activations/median/manifest.json", {"fallbacks": 20, "images_used": 100})
    limits = WarningsSection()
    warnings = sae_warnings(tmp_path, layout, limits)
    assert len(warnings) == 3 and all(w.startswith("SAE bad: ") for w in warnings)
    assert "60 % of the latents never fired" in warnings[0] and "20 % of the latents are dense" in warnings[1]
    assert "loses 8.0 points of top-1 accuracy" in warnings[2]
    assert fallback_warnings(tmp_path, layout, limits) == [
        "filter magnitude: fell back to uniform sampling on 30 of 100 images (30 %): its store is mostly unfiltered"
    ]
    assert sae_warnings(tmp_path, layout, WarningsSection(dead_latents=0.7, dense_latents=0.5, splice_loss=0.1)) == []
