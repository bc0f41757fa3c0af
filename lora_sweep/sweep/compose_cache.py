"""Per-trial config composition without composing the whole config tree again.

Hydra's basic launcher composes the full config for every job: it reads the YAML tree and
merges every structured config again (~0.1 s on the default config, 2-3 % of a default trial
and more of a pruned one). The trials of one sweep usually differ only in the *values* of the
same keys (``lora.r=8`` then ``lora.r=16``), which leave the defaults list unchanged.
:class:`CachingConfigLoader` composes the first job of each such shape through Hydra and builds
the later ones from a copy of it, applying the overrides with Hydra's own calls. Anything else
(a config group choice, ``+``/``~``, a list or dict value, a sweep expression) goes through
Hydra's loader as before. ``tests/test_sweep_compose_cache.py`` checks the result equals
Hydra's own composition.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from typing import Any, cast

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from omegaconf import DictConfig, OmegaConf


class CachingConfigLoader:
    """Wraps Hydra's config loader; only ``load_sweep_config`` differs (see the module docstring)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self._parser = OverridesParser.create()
        self._templates: dict[tuple, DictConfig] = {}
        self.hits = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def load_sweep_config(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        hydra_lines = cast("list[str]", OmegaConf.to_container(master_config.hydra.overrides.hydra))  # a ListConfig
        parsed = self._parser.parse_overrides(overrides=hydra_lines + list(sweep_overrides))
        shape = _shape(parsed)
        template = self._templates.get(shape) if shape is not None else None
        if template is None:
            cfg = self._inner.load_sweep_config(master_config, list(sweep_overrides))
            if shape is not None:
                self._templates[shape] = copy.deepcopy(cfg)
            return cfg
        cfg = copy.deepcopy(template)
        for override in filter(_is_value_override, parsed):  # the calls Hydra's loader makes
            OmegaConf.update(
                cfg, override.key_or_group, override.value(), merge=True, force_add=override.is_force_add()
            )
        cfg.hydra.overrides.hydra = [o.input_line for o in parsed if o.is_hydra_override()]
        app = [o for o in parsed if not o.is_hydra_override()]
        cfg.hydra.overrides.task = [o.input_line for o in app]
        dirname = cfg.hydra.job.config.override_dirname
        cfg.hydra.job.override_dirname = _overrides_dirname(
            app, exclude_keys=list(dirname.exclude_keys), item_sep=dirname.item_sep, kv_sep=dirname.kv_sep
        )
        OmegaConf.copy_cache(from_config=master_config, to_config=cfg)
        self.hits += 1
        return cfg


def _shape(parsed: Sequence[Override]) -> tuple | None:
    """What must match for two override lists to compose the same structure; None when an
    override may change the structure (then every job is composed by Hydra)."""
    shape: list[tuple[Any, ...]] = []
    for override in parsed:
        key = override.key_or_group
        if (
            override.is_sweep_override()
            or override.package is not None
            or override.is_delete()
            or override.is_add()
            or isinstance(override.value(), (dict, list))
        ):
            return None
        if _is_value_override(override):
            shape.append((key, override.is_force_add()))
        else:  # a config group choice or a top-level key: part of the structure, value and all
            shape.append((key, override.is_force_add(), override.input_line))
    return tuple(shape)


def _is_value_override(override: Override) -> bool:
    """A value inside the config (``a.b=v``); config groups are ``a`` or ``a/b``."""
    return "." in override.key_or_group and "/" not in override.key_or_group


def _overrides_dirname(overrides: Sequence[Override], *, exclude_keys: list[str], item_sep: str, kv_sep: str) -> str:
    """``hydra.job.override_dirname``, computed as Hydra computes it."""
    # input_line is set on every override parsed from a line (Hydra's own version asserts it)
    lines = sorted(cast(str, o.input_line) for o in overrides if o.key_or_group not in exclude_keys)
    return re.sub(pattern="[=]", repl=kv_sep, string=item_sep.join(lines))
