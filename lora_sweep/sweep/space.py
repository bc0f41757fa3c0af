"""Search space: Hydra override syntax -> Optuna distributions.

One parameter is one override ``key=VALUE``; ``VALUE`` uses Hydra's sweep grammar:

===============================  ==============================================================
override value                   Optuna distribution
===============================  ==============================================================
``choice(a, b, c)`` / ``a,b,c``  ``CategoricalDistribution((a, b, c))``
``range(a, b[, step])``          ``IntDistribution`` / ``FloatDistribution`` with ``step``;
                                 END-EXCLUSIVE (Hydra's own semantics) for every sampler:
                                 ``range(8, 33, 8)`` -> {8, 16, 24, 32}
``interval(a, b)`` (floats)      ``FloatDistribution(a, b)``
``interval(a, b)`` (both ints)   ``IntDistribution(a, b)`` -- bounds inclusive. Write
                                 ``interval(0.0, 1.0)`` for a float in [0, 1]!
``tag(int, interval(a, b))``     ``IntDistribution(a, b)`` (explicit integer form)
``tag(log, interval(a, b))``     log-uniform ``FloatDistribution`` (``IntDistribution`` when
                                 both bounds are ints); bounds must be > 0
``tag(log, range(a, b))``        log ``IntDistribution`` (integer range with step 1 only)
a plain value (``8``, ``adamw``)  fixed: passed unchanged to every trial, not searched
===============================  ==============================================================

Every problem raises :class:`SearchSpaceError` with one line naming the override and the fix.
This module imports optuna lazily only through :func:`to_distribution`'s callers; it needs
Hydra's override parser, which ships with hydra-core.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, QuotedString, RangeSweep

_INT_LITERAL = re.compile(r"^[+-]?\d+$")
_INTERVAL_ARGS = re.compile(r"interval\(\s*([^,()]+?)\s*,\s*([^,()]+?)\s*\)")
_SYNTAX_HELP = (
    "use choice(a,b,...), range(start,stop[,step]) (stop excluded), interval(low,high), "
    "tag(log, interval(low,high)) or a plain value"
)


class SearchSpaceError(ValueError):
    """A search-space override that cannot become an Optuna distribution."""


@dataclass
class SearchSpace:
    """Parsed search space.

    Attributes:
        distributions: Optuna parameter name (the config key) -> distribution.
        fixed: Overrides passed unchanged to every trial (plain values and non-sweep args).
    """

    distributions: dict[str, Any] = field(default_factory=dict)
    fixed: dict[str, str] = field(default_factory=dict)

    def describe(self) -> dict[str, str]:
        """Human/JSON-friendly description (stored on the study)."""
        out = {name: repr(dist) for name, dist in self.distributions.items()}
        out.update({key: f"fixed: {value}" for key, value in self.fixed.items()})
        return out


def _fail(line: str, problem: str) -> SearchSpaceError:
    return SearchSpaceError(f"Bad search-space override '{line}': {problem}")


def _interval_bounds_are_ints(override: Override) -> bool:
    text = (override.input_line or "").split("=", 1)[-1]
    match = _INTERVAL_ARGS.search(text)
    if match is None:
        return False
    return bool(_INT_LITERAL.match(match.group(1)) and _INT_LITERAL.match(match.group(2)))


def _range_values(line: str, sweep: RangeSweep) -> tuple[float, float, float, bool]:
    """Returns (low, high, step, is_int) of an end-exclusive Hydra range."""
    start, stop, step = sweep.start, sweep.stop, sweep.step
    assert start is not None and stop is not None
    if step == 0:
        raise _fail(line, "range step must not be 0")
    is_int = all(isinstance(v, int) and not isinstance(v, bool) for v in (start, stop, step))
    n = math.ceil((stop - start) / step - 1e-9)
    if n <= 0:
        raise _fail(
            line,
            f"range({start}, {stop}, {step}) is empty (stop is excluded); "
            "use e.g. range(low, high+step, step) with low < high",
        )
    last = start + (n - 1) * step
    if not is_int:
        last = round(last, 12)
    low, high = (start, last) if step > 0 else (last, start)
    return low, high, abs(step), is_int


def to_distribution(override: Override) -> Any:
    """Converts one parsed sweep override to an Optuna distribution.

    Args:
        override: A Hydra override whose value is a sweep (``is_sweep_override()``).

    Returns:
        An ``optuna.distributions.BaseDistribution``.

    Raises:
        SearchSpaceError: empty/inverted ranges, log with non-positive bounds, unsupported
            choice values, unknown tags.
    """
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    line = override.input_line or override.key_or_group
    value = override.value()
    tags = set(getattr(value, "tags", set()) or set())
    unknown = tags - {"log", "int"}
    if unknown:
        raise _fail(line, f"unknown tag(s) {sorted(unknown)}; supported tags are 'log' and 'int'")
    log = "log" in tags

    if isinstance(value, ChoiceSweep):
        if log or "int" in tags:
            raise _fail(line, "tags log/int apply to interval/range, not choice")
        choices = []
        for item in value.list:
            if isinstance(item, QuotedString):  # a simple comma sweep keeps the quotes' wrapper
                item = item.text
            if not (item is None or isinstance(item, (bool, int, float, str))):
                raise _fail(
                    line,
                    f"choice value {item!r} is a {type(item).__name__}; Optuna choices must be "
                    "str, int, float, bool or null (quote it to pass it as a string)",
                )
            choices.append(item)
        if not choices:
            raise _fail(line, "choice() needs at least one value")
        return CategoricalDistribution(choices=tuple(choices))

    if isinstance(value, RangeSweep):
        low, high, step, is_int = _range_values(line, value)
        if "int" in tags and not is_int:
            raise _fail(line, "tag(int, range(...)) needs integer start, stop and step")
        if log:
            if low <= 0:
                raise _fail(line, f"log scale needs bounds > 0, got low={low}")
            if not is_int or step != 1:
                raise _fail(
                    line,
                    "tag(log, range(...)) is supported only for integer ranges with step 1 "
                    "(Optuna has no stepped log scale); use tag(log, interval(low,high))",
                )
            return IntDistribution(low=int(low), high=int(high), log=True)
        if is_int:
            return IntDistribution(low=int(low), high=int(high), step=int(step))
        return FloatDistribution(low=float(low), high=float(high), step=float(step))

    if isinstance(value, IntervalSweep):
        assert value.start is not None and value.end is not None
        low, high = value.start, value.end
        if not low < high:
            raise _fail(line, f"interval needs low < high, got ({low}, {high})")
        if log and low <= 0:
            raise _fail(line, f"log scale needs bounds > 0, got low={low}")
        as_int = "int" in tags or _interval_bounds_are_ints(override)
        if as_int:
            if not (float(low).is_integer() and float(high).is_integer()):
                raise _fail(line, "tag(int, interval(a,b)) needs integer bounds")
            return IntDistribution(low=int(low), high=int(high), log=log)
        return FloatDistribution(low=float(low), high=float(high), log=log)

    raise _fail(line, f"unsupported sweep type {type(value).__name__}; {_SYNTAX_HELP}")


def _parse_one(parser: OverridesParser, line: str) -> Override:
    try:
        return parser.parse_override(line)
    except Exception as exc:  # Hydra raises OverrideParseException with a long message
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _fail(line, f"cannot parse ({first}); {_SYNTAX_HELP}") from None


def params_to_lines(params: Mapping[str, Any] | None) -> list[str]:
    """Turns the ``hydra.sweeper.params`` mapping into override lines ``key=value``."""
    lines = []
    for key, value in (params or {}).items():
        if isinstance(value, bool):
            value = str(value).lower()
        elif value is None:
            value = "null"
        lines.append(f"{key}={value}")
    return lines


def parse_search_space(
    params: Mapping[str, Any] | None = None,
    arguments: Iterable[str] = (),
) -> SearchSpace:
    """Parses config params and command-line arguments into a :class:`SearchSpace`.

    Command-line arguments override ``params`` entries with the same key. Sweep values become
    distributions; plain values and non-sweep arguments become fixed overrides.

    Args:
        params: ``hydra.sweeper.params`` (key -> override value string).
        arguments: The command-line overrides Hydra passes to ``Sweeper.sweep``.

    Raises:
        SearchSpaceError: on the first bad override (all are parsed before any is used).
    """
    parser = OverridesParser.create()
    space = SearchSpace()
    for line in [*params_to_lines(params), *arguments]:
        override = _parse_one(parser, line)
        key = override.get_key_element()
        space.distributions.pop(override.key_or_group, None)
        space.fixed.pop(key, None)
        if override.is_sweep_override():
            if override.is_hydra_override():
                raise _fail(line, "hydra.* settings cannot be searched")
            if override.value_type is not None and override.value_type.name == "GLOB_CHOICE_SWEEP":
                raise _fail(line, "glob() choices are not supported; list the options in choice()")
            space.distributions[override.key_or_group] = to_distribution(override)
        else:
            space.fixed[key] = override.get_value_element_as_str()
    return space


_PLAIN = re.compile(r"^[A-Za-z_][\w.\-/]*$")
_RESERVED = {"true", "false", "null", "nan", "inf", "-inf"}


def format_value(value: Any) -> str:
    """Formats a sampled value as a Hydra override value that parses back to the same value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if _PLAIN.match(text) and text.lower() not in _RESERVED:
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def to_overrides(params: Mapping[str, Any]) -> list[str]:
    """``{key: value}`` -> ``["key=value", ...]`` in Hydra override syntax."""
    return [f"{key}={format_value(value)}" for key, value in params.items()]
