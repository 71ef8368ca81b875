from dataclasses import dataclass
from typing import Literal, Optional

import pytest

from convlens import ParameterError, Params, param
from convlens.core.params import coerce, describe


@dataclass(frozen=True)
class Example(Params):
    steps: int = param(200, help="optimisation steps", min=1, max=10_000)
    lr: float = param(0.05, help="learning rate", min=0.0)
    mode: str = param("fast", choices=("fast", "exact"))
    flip: bool = param(False)
    units: tuple[int, ...] = param((0,))
    scale: tuple[float, float] = param((0.8, 1.2))
    clip: Optional[float] = param(None, min=0.0)
    space: Literal["pixel", "fourier"] = param("pixel")


def test_defaults_and_python_values():
    p = coerce(Example, {})
    assert p == Example()
    p = coerce(Example, {"steps": 5, "lr": 1, "units": [3, 4], "clip": 0.1})
    assert (p.steps, p.lr, p.units, p.clip) == (5, 1.0, (3, 4), 0.1)
    assert isinstance(p.lr, float)


def test_cli_strings_are_coerced_the_same_way():
    p = coerce(
        Example,
        {
            "steps": "7",
            "lr": "1e-3",
            "flip": "yes",
            "units": "0,5,9",
            "scale": "0.5, 2",
            "clip": "none",
            "space": "fourier",
            "mode": "exact",
        },
    )
    assert p == Example(
        steps=7, lr=1e-3, flip=True, units=(0, 5, 9), scale=(0.5, 2.0), clip=None, space="fourier", mode="exact"
    )


def test_dashes_in_keys_are_accepted():
    @dataclass(frozen=True)
    class P(Params):
        tv_weight: float = param(1e-3)

    assert coerce(P, {"tv-weight": "0.5"}).tv_weight == 0.5


@pytest.mark.parametrize(
    "values, message",
    [
        ({"steps": 0}, "parameter 'steps' must be >= 1 (got 0)"),
        ({"steps": 20_000}, "must be <= 10000"),
        ({"steps": "many"}, "'steps' must be an integer (got 'many')"),
        ({"steps": 2.5}, "must be an integer"),
        ({"steps": True}, "must be an integer"),
        ({"lr": "nan"}, "not NaN"),
        ({"lr": -1}, "must be >= 0.0"),
        ({"mode": "exakt"}, "must be one of 'fast', 'exact' (got 'exakt'); did you mean 'exact'?"),
        ({"flip": "maybe"}, "must be true or false"),
        ({"units": "1,x"}, "comma-separated list of int"),
        ({"scale": "1,2,3"}, "2 comma-separated values"),
        ({"space": "wavelet"}, "one of 'pixel', 'fourier'"),
        ({"stpes": 3}, "has no parameter 'stpes'; did you mean 'steps'"),
        ({"stpes": 3}, "(valid parameters: steps, lr, mode, flip, units, scale, clip, space)"),
    ],
)
def test_bad_values_give_one_clear_message(values, message):
    with pytest.raises(ParameterError) as info:
        coerce(Example, values, owner="visualizer 'demo'")
    assert message in str(info.value)
    assert str(info.value).startswith("visualizer 'demo'")


def test_direct_construction_validates_too():
    with pytest.raises(ParameterError, match="'lr' must be >= 0.0"):
        Example(lr=-0.5)


def test_describe_is_json_ready():
    rows = {row["name"]: row for row in describe(Example)}
    assert rows["steps"] == {
        "name": "steps",
        "type": "int",
        "default": 200,
        "help": "optimisation steps",
        "choices": None,
        "min": 1,
        "max": 10_000,
    }
    assert rows["units"]["default"] == [0] and rows["units"]["type"] == "list of int"
    assert rows["clip"]["type"] == "float or none"
    assert rows["mode"]["choices"] == ["fast", "exact"]


def test_a_parameter_needs_a_default():
    with pytest.raises(TypeError):
        param(help="no default")
