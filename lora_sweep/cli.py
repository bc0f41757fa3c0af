"""Command line: `python -m lora_sweep [overrides]` runs one trial, `-m` sweeps; `lora-sweep
export` rebuilds a results CSV and `lora-sweep best` exports the best trial's adapter.

Before Hydra starts, the overrides are composed once more with Hydra's compose API and the
result validated, so an unknown option, a wrong type or an impossible value fails with one
line and exit code 2 before any run directory, model or CSV row exists.

The process's one `TrialCache` (`PROCESS_CACHE`) is created here: the preflight warms it up
and every job this process runs (a sweep worker runs many) trains from it.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, cast

import hydra
from omegaconf import DictConfig, OmegaConf

from lora_sweep.best_cli import main as best_main
from lora_sweep.cache import TrialCache
from lora_sweep.config import RunConfig
from lora_sweep.errors import EXIT_BAD_INPUT, INPUT_ERRORS, ConfigError, error_line, error_message
from lora_sweep.export_cli import main as export_main
from lora_sweep.job import run_job
from lora_sweep.model import offline_hub
from lora_sweep.trial import check_inputs, warm_up

log = logging.getLogger("lora_sweep")

PROCESS_CACHE = TrialCache()
"""What this process's trials share (the base model, tokenizer, data); see `lora_sweep.cache`."""
_PACKAGE_CONF = Path(__file__).parent / "conf"  # wheel install
_SOURCE_CONF = Path(__file__).parent.parent / "conf"  # source checkout


def config_dir() -> Path:
    """The packaged config tree: inside the package when installed from a wheel, else `conf/`."""
    return _PACKAGE_CONF if (_PACKAGE_CONF / "config.yaml").is_file() else _SOURCE_CONF


def _split_argv(argv: list[str]) -> tuple[list[str], dict[str, str], bool] | None:
    """(overrides, {config_path, config_name, config_dir}, multirun), or None when the command
    line carries a Hydra flag we do not pre-validate (--help, --cfg, --info, ...)."""
    overrides: list[str] = []
    where: dict[str, str] = {}
    multirun = False
    flags = {
        "-cp": "config_path",
        "--config-path": "config_path",
        "-cn": "config_name",
        "--config-name": "config_name",
        "-cd": "config_dir",
        "--config-dir": "config_dir",
    }
    args = iter(argv)
    for arg in args:
        key, _, value = arg.partition("=")
        if arg in ("-m", "--multirun"):
            multirun = True
        elif key in flags:
            where[flags[key]] = value if value else next(args, "")
        elif arg.startswith("-"):
            return None
        else:
            overrides.append(arg)
    return overrides, where, multirun


def preflight(argv: list[str], *, cache: TrialCache | None = None) -> None:
    """Compose the config the job will see, validate it and check its data file and checkpoint;
    for a sweep also warm `cache` up (None: a throwaway one).

    Raises one of `lora_sweep.errors.INPUT_ERRORS` on bad input, before Hydra creates a run
    directory or the sweeper opens a study.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    split = _split_argv(argv)
    if split is None:
        return
    overrides, where, multirun = split
    try:
        parsed = OverridesParser.create().parse_overrides(overrides=overrides)
    except Exception as err:  # noqa: BLE001 - Hydra raises its own OverrideParseException
        raise ConfigError(f"bad override: {error_line(err)}") from err
    # sweep expressions (choice, range, ...) are the sweeper's to check; compose the rest, the
    # hydra.* ones too (e.g. hydra/sweeper/sampler=foo is refused here in one line)
    # input_line is set on every override parsed from a line
    fixed = [cast(str, o.input_line) for o in parsed if not (multirun and o.is_sweep_override())]
    conf_dir = Path(where.get("config_path", config_dir())).absolute()
    if not conf_dir.is_dir():
        return  # a user config dir given relative to a script; Hydra reports it
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            cfg = compose(config_name=where.get("config_name", "config"), overrides=fixed, return_hydra_config=True)
            cfg = OmegaConf.masked_copy(cfg, [str(key) for key in cfg if key != "hydra"])
            container = cast("dict[str, Any]", OmegaConf.to_container(cfg, resolve=True))  # a DictConfig
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - Hydra/OmegaConf composition errors
        raise ConfigError(error_line(err)) from err
    finally:
        GlobalHydra.instance().clear()
    run_cfg = RunConfig.from_mapping(container)
    cache = cache if cache is not None else TrialCache()
    check_inputs(run_cfg, cache)
    if multirun:
        warm_up(run_cfg, cache)  # a sweep worker loads the base model once, before its first trial


class SweepConsoleFilter(logging.Filter):
    """What a console log handler shows: everything in a single run or with `verbose=true`. In
    a quiet sweep the sweep console has one line per trial and every trial's own log is in
    `<its run dir>/lora_sweep.log`, so the records of `loggers` (and their children; None: every
    logger) below `quiet_level` (None: at any level) are left out.

    Named by `conf/hydra/job_logging/lora_sweep.yaml` (a trial: none of its log) and
    `conf/hydra/hydra_logging/lora_sweep.yaml` (the sweep process: not the app's info lines),
    which pass the app's `verbose` and `hydra.mode`.
    """

    def __init__(
        self,
        *,
        verbose: bool = False,
        mode: Any = None,
        quiet_level: str | int | None = None,
        loggers: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.quiet = not verbose and str(getattr(mode, "name", mode)).upper() == "MULTIRUN"  # RunMode or its name
        if isinstance(quiet_level, str):
            quiet_level = logging.getLevelNamesMapping()[quiet_level.upper()]
        self.quiet_level = quiet_level
        self.loggers = None if loggers is None else tuple(loggers)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.quiet or (self.quiet_level is not None and record.levelno >= self.quiet_level):
            return True
        names = self.loggers
        return names is not None and not any(record.name == n or record.name.startswith(n + ".") for n in names)


def _refuse(err: BaseException) -> None:
    print(error_message(err), file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def _hydra_app(cfg: DictConfig) -> dict[str, Any]:
    return run_job(cfg, cache=PROCESS_CACHE)


def main() -> None:
    """Entry point of `lora-sweep` and `python -m lora_sweep`."""
    argv = sys.argv[1:]
    if argv and argv[0] == "export":
        sys.exit(export_main(argv[1:]))
    if argv and argv[0] == "best":
        sys.exit(best_main(argv[1:]))
    offline_hub()
    try:
        preflight(argv, cache=PROCESS_CACHE)
    except INPUT_ERRORS as err:
        _refuse(err)
    _hydra_app()
