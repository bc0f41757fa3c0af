"""Search-space parsing: Hydra override strings -> Optuna distributions (table-driven)."""

from __future__ import annotations

import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from lora_sweep.sweep.space import (
    SearchSpaceError,
    format_value,
    parse_search_space,
    to_overrides,
)

TABLE = [
    ("p=choice(4,8,16)", CategoricalDistribution((4, 8, 16))),
    ("p=4,8,16", CategoricalDistribution((4, 8, 16))),
    ("p=choice(adamw,sgd)", CategoricalDistribution(("adamw", "sgd"))),
    ("p='/a b','/c'", CategoricalDistribution(("/a b", "/c"))),  # quoted items of a simple comma sweep
    ("p=choice('/a b',c)", CategoricalDistribution(("/a b", "c"))),
    ("p=range(8,33,8)", IntDistribution(8, 32, step=8)),  # stop excluded
    ("p=range(1,10)", IntDistribution(1, 9)),
    ("p=range(10,0,-2)", IntDistribution(2, 10, step=2)),
    ("p=range(0.1,0.5,0.1)", FloatDistribution(0.1, 0.4, step=0.1)),
    ("p=interval(0.0,1.0)", FloatDistribution(0.0, 1.0)),
    ("p=interval(1,8)", IntDistribution(1, 8)),  # integer bounds -> integer parameter
    ("p=tag(int, interval(1.0, 4.0))", IntDistribution(1, 4)),
    ("p=tag(log, interval(1e-5, 1e-2))", FloatDistribution(1e-5, 1e-2, log=True)),
    ("p=tag(log, interval(1, 64))", IntDistribution(1, 64, log=True)),
    ("p=tag(log, range(1, 65))", IntDistribution(1, 64, log=True)),
]


@pytest.mark.parametrize(("line", "expected"), TABLE, ids=[t[0] for t in TABLE])
def test_override_to_distribution(line: str, expected: object) -> None:
    space = parse_search_space(None, [line])
    assert space.distributions == {"p": expected}
    assert space.fixed == {}


BAD = [
    ("p=range(5,5)", "empty"),
    ("p=range(1,10,0)", "step"),
    ("p=interval(3.0,1.0)", "low < high"),
    ("p=tag(log, interval(0.0, 1.0))", "> 0"),
    ("p=tag(log, range(0, 5))", "> 0"),
    ("p=tag(log, range(1, 9, 2))", "step 1"),
    ("p=choice(", "cannot parse"),
    ("p=tag(foo, interval(0.0,1.0))", "unknown tag"),
    ("p=choice([1,2],[3])", "list"),
]


@pytest.mark.parametrize(("line", "needle"), BAD, ids=[b[0] for b in BAD])
def test_bad_override_names_it(line: str, needle: str) -> None:
    with pytest.raises(SearchSpaceError) as info:
        parse_search_space(None, [line])
    message = str(info.value)
    assert f"'{line}'" in message and needle in message
    assert "\n" not in message


def test_plain_values_are_fixed_and_cli_wins() -> None:
    space = parse_search_space(
        {"lora.r": "choice(4,8)", "data.max_length": 128, "flag": True},
        ["lora.r=16", "results_dir=/tmp/x", "train.lr=interval(0.001,0.01)"],
    )
    assert space.fixed == {"data.max_length": "128", "flag": "True", "lora.r": "16", "results_dir": "/tmp/x"}
    assert set(space.distributions) == {"train.lr"}


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (1e-5, "1e-05"),
        (8, "8"),
        ("adamw", "adamw"),
        ("1", "'1'"),
        (True, "true"),
        (None, "null"),
        ("a b", "'a b'"),
        ("it's", "'it\\'s'"),
    ],
)
def test_format_value_round_trips(value: object, text: str) -> None:
    assert format_value(value) == text
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_override(to_overrides({"k": value})[0])
    assert parsed.value() == value
