"""The sweep loop: ask -> build job overrides -> launch through Hydra's launcher -> tell.

``n_jobs`` (trials in flight):

* basic (in-process) launcher: ``n_jobs`` worker PROCESSES. The sweeper's own process is
  worker 0; it re-executes the same command ``n_jobs - 1`` times with
  ``hydra.sweeper.worker_id=i`` (and the resolved storage, study and sweep dir pinned). Every
  worker loops ask -> run one trial -> tell against the shared storage until the study has
  ``n_trials`` finished trials, so a new trial starts as soon as any worker is free (no batch
  barrier). Threads: ``OMP_NUM_THREADS = cores // n_jobs`` for the spawned workers and
  ``torch.set_num_threads`` (if torch is loaded) plus the same env var in worker 0. Finished
  trials end between ``n_trials`` and ``n_trials + n_jobs - 1`` (a check-then-ask race).
  GPUs (:mod:`lora_sweep.sweep.placement`): ``auto`` on a machine with K visible GPUs starts
  K workers, one per GPU; N workers take the GPUs round-robin. Each spawned worker gets
  ``CUDA_VISIBLE_DEVICES=<its GPU>``; worker 0 sets its own before its first job (and puts the
  old value back when the sweep ends).
* any other launcher (joblib, submitit, ...): ``n_jobs`` is the batch size of each
  ``launcher.launch`` call (Hydra's launcher API waits for the whole batch).

The same command started by hand on several machines against one PostgreSQL study also
cooperates (Optuna's distributed optimisation); each process is just another worker.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

from lora_sweep.sweep import study as study_mod
from lora_sweep.sweep.compose_cache import CachingConfigLoader
from lora_sweep.sweep.console import (
    ATTR_OVERRIDES,
    LEADERBOARD_SIZE,
    SweepConsole,
    SweepSummary,
    TrialRow,
    format_header,
)
from lora_sweep.sweep.context import ATTR_JOB_RESULT, STUDY_ATTR_PRUNER, TrialContext
from lora_sweep.sweep.faults import crash_point
from lora_sweep.sweep.hooks import SweepHooks, SweepHooksError, load_hooks
from lora_sweep.sweep.objective import (
    ObjectiveConfigError,
    ObjectiveSpec,
    Outcome,
    outcome_from_exception,
    outcome_from_return,
    parse_objective,
)
from lora_sweep.sweep.placement import (
    CUDA_VISIBLE_DEVICES,
    Placement,
    cuda_in_use,
    parse_n_jobs,
    pin_this_process,
    pinned_gpu,
    plan_placement,
    spawned_worker_gpu,
    visible_gpus,
    worker_env,
)
from lora_sweep.sweep.samplers import (
    SamplerConfigError,
    build_pruner,
    build_sampler,
    grid_size,
    is_grid,
    pruner_config,
    sampler_seed,
)
from lora_sweep.sweep.space import SearchSpace, SearchSpaceError, format_value, parse_search_space, to_overrides

log = logging.getLogger(__name__)
DEFAULT_SUBDIR = "${hydra.job.num}"
BASIC_LAUNCHER_LOGGER = "hydra._internal.core_plugins.basic_launcher"
_VALUE_FLAGS = {"-cp", "-cn", "-cd", "--config-path", "--config-name", "--config-dir"}
# Exit codes of a sweep: bad settings or input (one line, nothing written), too many failed
# trials, and Ctrl-C (128 + SIGINT, the shell's convention).
EXIT_USER_ERROR = 2
EXIT_ABORTED = 1
EXIT_INTERRUPTED = 130
# After a Ctrl-C, how long worker 0 waits for its workers (they got the same SIGINT from the
# terminal) before it sends them one itself (a SIGINT sent to worker 0 alone).
WORKER_STOP_GRACE_S = 15.0
# How often worker 0 reads the study back for the lines of the trials its workers finished.
WORKER_POLL_S = 2.0


class SweepError(RuntimeError):
    """A sweep that cannot start or must stop; the message says why and what to do."""


class SweepAbortedError(SweepError):
    """Too many failed trials."""


#: Errors reported to the user as one line (bad settings, bad search space, abort).
USER_ERRORS = (
    SweepError,
    SearchSpaceError,
    ObjectiveConfigError,
    SamplerConfigError,
    SweepHooksError,
    study_mod.StudyMismatchError,
)


def _setting(settings: Any, key: str, default: Any = None) -> Any:
    value = settings.get(key, default) if hasattr(settings, "get") else getattr(settings, key, default)
    return default if value is None else value


def _plain(value: Any) -> Any:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return value


def launch_prefix(argv: Sequence[str] | None = None, python: str = "python") -> list[str]:
    """``python -m pkg`` when this process runs a module, else ``python path/to/app.py``."""
    argv = list(sys.argv if argv is None else argv)
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and getattr(spec, "name", None):
        name = spec.name[: -len(".__main__")] if spec.name.endswith(".__main__") else spec.name
        return [python, "-m", name]
    return [python, argv[0] if argv else "app.py"]


def app_command(argv: Sequence[str] | None = None, python: str = "python") -> list[str]:
    """The command that started this app, with Hydra's config flags but no overrides/``-m``."""
    argv = list(sys.argv if argv is None else argv)
    cmd = launch_prefix(argv, python)
    rest = argv[1:]
    i = 0
    while i < len(rest):
        token = rest[i]
        flag = token.split("=", 1)[0]
        if flag in _VALUE_FLAGS:
            cmd.append(token)
            if "=" not in token and i + 1 < len(rest):
                cmd.append(rest[i + 1])
                i += 1
        i += 1
    return cmd


def _storage_error(storage: str, exc: BaseException) -> str:
    """One line saying why the storage cannot be opened (password redacted) and what to do."""
    text = str(exc).strip()
    first = text.splitlines()[0].strip() if text else type(exc).__name__
    if isinstance(exc, ImportError) or isinstance(exc.__cause__, ImportError):
        cause = exc.__cause__ if isinstance(exc.__cause__, ImportError) else exc
        hint = f"no database driver ({cause}); install it, e.g. pip install 'lora-sweep[postgres]'"
        return f"cannot open the study storage {study_mod.redact(storage)}: {hint}"
    if isinstance(exc, PermissionError):
        hint = "the directory is not writable; choose another results_dir or hydra.sweeper.storage"
    elif study_mod.is_journal(storage):
        hint = "check the path of hydra.sweeper.storage"
    else:
        hint = "is the database server running and reachable, and the URL right?"
    return f"cannot open the study storage {study_mod.redact(storage)}: {first} ({hint})"


def exit_on_next_sigint() -> Any:
    """After the first Ctrl-C the sweep records the interrupted trial; a second one exits at once
    (the records are single appends or transactions: nothing is left torn, and a trial left
    RUNNING is recovered and re-queued by the next run). Returns the handler it replaced (None
    when it could not install one), for `restore_sigint`."""
    try:
        return signal.signal(signal.SIGINT, lambda signum, frame: os._exit(EXIT_INTERRUPTED))
    except ValueError:  # not the main thread: the default handler stays
        return None


def restore_sigint(previous: Any) -> None:
    """Put back the SIGINT handler `exit_on_next_sigint` replaced (an in-process caller, e.g. a
    notebook, keeps its own Ctrl-C after an interrupted sweep)."""
    if previous is not None:
        try:
            signal.signal(signal.SIGINT, previous)
        except ValueError:
            pass


def _load_hook(path: str) -> Callable[[Any, Any], Any]:
    module_name, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise SweepError(
            f"hydra.sweeper.custom_search_space={path!r} cannot be imported ({exc}); give 'package.module.function'"
        ) from exc


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def _cache_job_configs(launcher: Any) -> None:
    """Let an in-process launcher build each job's config from a composed one of the same
    shape instead of composing the whole tree again (see :mod:`lora_sweep.sweep.compose_cache`)."""
    context = getattr(launcher, "hydra_context", None)
    if context is None or isinstance(context.config_loader, CachingConfigLoader):
        return
    from hydra.core.config_loader import ConfigLoader
    from hydra.types import HydraContext

    # a duck-typed wrapper: it forwards every other ConfigLoader attribute to the one it wraps
    launcher.hydra_context = HydraContext(
        config_loader=cast(ConfigLoader, CachingConfigLoader(context.config_loader)), callbacks=context.callbacks
    )


def resolve_n_jobs(
    value: Any, *, is_basic: bool, cores: int | None = None, cuda: bool | None = None, gpus: int | None = None
) -> int:
    """Trials in flight for a ``hydra.sweeper.n_jobs`` setting: a positive int, or ``auto``.

    ``auto``: with the in-process (basic) launcher on a machine without a CUDA device, one
    worker process per core with one thread each (measured on 2 cores: more trials per hour than
    one worker with all threads, see BENCHMARKS.md); with K GPUs (`gpus`; `cuda` True: one; by
    default counted without initialising CUDA, `placement.visible_gpus`) K, one per GPU; with
    another launcher, 1.
    """
    try:
        n = parse_n_jobs(value)
    except ValueError as exc:
        raise SweepError(str(exc)) from exc
    if n is not None:
        return n
    if not is_basic:
        return 1
    if gpus is None:
        gpus = int(cuda) if cuda is not None else len(visible_gpus())
    return gpus if gpus > 0 else max(1, cores if cores is not None else _cpu_count())


def set_threads(threads: int) -> None:
    """Threads for trials in this process: env for later imports, torch if already loaded."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)


def quiet_launcher_log(hydra_verbose: Any = False) -> None:
    """No ``Launching 1 jobs locally`` and ``#N : <overrides>`` (with the base64 trial context)
    per trial from Hydra's in-process launcher: the console has one line per trial. The logger's
    level is set, not Hydra patched: ``hydra.verbose`` keeps the lines, and a
    ``hydra/hydra_logging`` config that names the logger sets its own level at each launch."""
    if not hydra_verbose:
        logging.getLogger(BASIC_LAUNCHER_LOGGER).setLevel(logging.WARNING)


def best_trials(study: Any, hooks: SweepHooks) -> list[Any]:
    """The summary's best trial(s): the hooks' choice, else Optuna's best feasible trial (its
    Pareto front with several objectives); never a penalty record."""
    best = hooks.best_trials(study)
    if best is None:
        try:
            best = study.best_trials if len(study.directions) > 1 else [study.best_trial]
        except ValueError:  # no feasible completed trial
            best = []
    return [t for t in best if study_mod.ATTR_PENALTY_FOR not in t.user_attrs]


def rank_trials(study: Any, hooks: SweepHooks, *, limit: int = LEADERBOARD_SIZE) -> list[Any]:
    """The study's top ``limit`` trials, best first, by its own ranking: the best trial(s) as
    :func:`best_trials` chooses them, then the best of the other trials by the same rule, and
    so on (with several objectives: successive Pareto fronts, each by its first objective)."""
    ranked: list[Any] = []
    while len(ranked) < limit:
        view = _StudyView(study, {t.number for t in ranked}) if ranked else study
        taken = {t.number for t in ranked}
        picks = [t for t in best_trials(view, hooks) if t.number not in taken]
        if not picks:
            break
        ranked.extend(sorted(picks, key=lambda t: _first_objective_key(study, t)))
    return ranked[:limit]


def _first_objective_key(study: Any, trial: Any) -> tuple[float, int]:
    from optuna.study import StudyDirection

    value = trial.values[0] if trial.values else math.inf
    return (-value if study.directions[0] == StudyDirection.MAXIMIZE else value), trial.number


class _StudyView:
    """A study without some trials (read-only), for :func:`rank_trials`: ``get_trials``,
    ``trials`` and Optuna's ``best_trial``/``best_trials`` rule see only the others."""

    def __init__(self, study: Any, excluded: set[int]) -> None:
        self._study = study
        self._excluded = excluded

    def get_trials(self, deepcopy: bool = True, states: Any = None) -> list[Any]:
        trials = self._study.get_trials(deepcopy=deepcopy, states=states)
        return [t for t in trials if t.number not in self._excluded]

    @property
    def trials(self) -> list[Any]:
        return self.get_trials()

    def _feasible(self) -> list[Any]:
        from optuna.trial import TrialState

        return [
            t
            for t in self.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.values is not None and study_mod.is_counted(t) and all(v <= 0 for v in t.constraints.values())
        ]

    @property
    def best_trial(self) -> Any:
        feasible = self._feasible()
        if not feasible:
            raise ValueError("no feasible completed trial")
        return min(feasible, key=lambda t: _first_objective_key(self._study, t))

    @property
    def best_trials(self) -> list[Any]:
        from optuna.study import StudyDirection

        signs = [-1.0 if d == StudyDirection.MAXIMIZE else 1.0 for d in self._study.directions]
        feasible = self._feasible()

        def dominates(a: Any, b: Any) -> bool:
            pairs = [(s * x, s * y) for s, x, y in zip(signs, a.values, b.values, strict=True)]
            return all(x <= y for x, y in pairs) and any(x < y for x, y in pairs)

        return [t for t in feasible if not any(dominates(o, t) for o in feasible)]

    def __getattr__(self, name: str) -> Any:  # directions, metric_names, user_attrs, ...
        return getattr(self._study, name)


class SweepRunner:
    """Runs one sweep (one worker) of a Hydra app against an Optuna study.

    Args:
        settings: ``hydra.sweeper`` config (or a dict with the same keys).
        config: The full composed config (with ``hydra``) given to ``Sweeper.setup``.
        launcher: Hydra launcher (``launch(job_overrides, initial_job_idx)``).
        argv: The process's command line (for worker processes and replay commands).
        is_basic_launcher: True for Hydra's in-process basic launcher.
        console: Where the sweep shows itself (default: this process's stdout; worker 0 prints
            the trials' lines, the other workers print none).
    """

    def __init__(
        self,
        *,
        settings: Any,
        config: Any,
        launcher: Any,
        argv: Sequence[str] | None = None,
        is_basic_launcher: bool = True,
        console: SweepConsole | None = None,
    ) -> None:
        self.settings = settings
        self.config = config
        self._app_cfg: Any = None  # `_app_config`
        self.launcher = launcher
        self.argv = list(sys.argv if argv is None else argv)
        self.is_basic = is_basic_launcher
        if is_basic_launcher:
            _cache_job_configs(launcher)
        self.worker_id = int(_setting(settings, "worker_id", 0))
        leader = self.worker_id == 0
        self.console = console if console is not None else SweepConsole(trials=leader, live=None if leader else False)
        self.study: Any = None
        self.space = SearchSpace()
        self.spec: ObjectiveSpec | None = None
        self.storage = ""
        self.study_name = ""
        self._hook: Callable[[Any, Any], Any] | None = None
        self.hooks: SweepHooks = SweepHooks()
        self.interrupted: list[int] = []  # trials this process recorded as interrupted (Ctrl-C)
        self.previous_sigint: Any = None  # the SIGINT handler to restore after a Ctrl-C
        self._relays: list[threading.Thread] = []  # copy the spawned workers' output to the console
        self._gpu: str | None = None  # the GPU this process's trials run on, when placement pinned one

    # ----------------------------------------------------------------- setup
    def _app_config(self) -> Any:
        """The app's part of the config (without ``hydra``), read-only: made once (a copy costs
        ~1.5 ms, and the search-space hook reads it every trial)."""
        from omegaconf import OmegaConf

        if self._app_cfg is None:
            self._app_cfg = OmegaConf.masked_copy(self.config, [k for k in self.config if k != "hydra"])
            OmegaConf.set_readonly(self._app_cfg, True)
        return self._app_cfg

    def _sweep_dir(self) -> str:
        return str(Path(str(self.config.hydra.sweep.dir)).absolute())

    def _subdir_is_default(self) -> bool:
        from omegaconf import OmegaConf

        raw = OmegaConf.to_container(self.config.hydra.sweep, resolve=False)
        return isinstance(raw, dict) and raw.get("subdir") == DEFAULT_SUBDIR

    def prepare(self, arguments: Sequence[str]) -> None:
        """Parses everything that can fail before the storage is touched."""
        s = self.settings
        self.hooks = load_hooks(_setting(s, "hooks"))
        self.spec = parse_objective(
            _plain(_setting(s, "objective")), _plain(_setting(s, "direction", "minimize")), self.hooks.objectives
        )
        self.space = parse_search_space(_plain(_setting(s, "params", {})), arguments)
        hook = _setting(s, "custom_search_space")
        self._hook = _load_hook(str(hook)) if hook else None
        storage = _setting(s, "storage")
        self.storage = (
            study_mod.normalize_storage(str(storage))
            if storage
            else study_mod.default_storage(self.hooks.storage_dir(self._app_config()) or self._sweep_dir())
        )
        self.study_name = str(_setting(s, "study_name") or self.config.hydra.job.name)
        if is_grid(_setting(s, "sampler")) and not self.space.distributions:
            raise SweepError("the grid sampler needs at least one choice/range parameter")

    def _target(self) -> int:
        n = int(_setting(self.settings, "n_trials", 20))
        if is_grid(_setting(self.settings, "sampler")):
            size = grid_size(self.space.distributions)
            if size < n:
                log.debug("Grid has %d points: n_trials capped from %d to %d", size, n, size)
                n = size
        return n

    def open(self) -> None:
        """Opens/creates the study, recovers stale trials, installs the seeded sampler."""
        assert self.spec is not None
        import optuna

        pruner_cfg = pruner_config(_setting(self.settings, "pruner"))
        try:
            self.study = study_mod.open_study(
                storage=self.storage,
                study_name=self.study_name,
                directions=self.spec.directions,
                sampler=optuna.samplers.RandomSampler(seed=0),
                pruner=build_pruner(pruner_cfg),
                engine_kwargs=_plain(_setting(self.settings, "engine_kwargs")),
            )
        except study_mod.StudyMismatchError:
            raise
        except Exception as exc:  # noqa: BLE001 - driver, network, permission: one line, not a traceback
            raise SweepError(_storage_error(self.storage, exc)) from exc
        study_mod.check_search_space(self.study, self.space.distributions)
        if self.worker_id == 0:
            stale = study_mod.recover_stale(self.study, finish=self._finish_recorded)
            if stale:
                log.warning("Marked stale RUNNING trials %s FAIL and re-queued their params", stale)
        sampler_cfg = _setting(self.settings, "sampler")
        seed = sampler_seed(
            sampler_cfg,
            base_seed=_setting(self.settings, "seed"),
            n_trials_so_far=len(self.study.get_trials(deepcopy=False)),
            worker_id=self.worker_id,
        )
        self.study.sampler = build_sampler(sampler_cfg, seed=seed, distributions=self.space.distributions)
        if self.worker_id == 0:
            self._annotate_study(pruner_cfg)

    def _annotate_study(self, pruner_cfg: dict[str, Any]) -> None:
        from omegaconf import OmegaConf

        assert self.spec is not None
        study = self.study
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ExperimentalWarning since v3.2, stable in use
            study.set_metric_names(self.spec.metric_names)
        study.set_user_attr(STUDY_ATTR_PRUNER, pruner_cfg)
        study.set_user_attr("sweep.search_space", self.space.describe())
        study.set_user_attr("sweep.objective", dict(zip(self.spec.metric_names, self.spec.directions, strict=False)))
        study.set_user_attr("sweep.base_config", OmegaConf.to_yaml(self._app_config(), resolve=False))
        study.set_user_attr("sweep.command", shlex.join(study_mod.redact(a) for a in self.argv))  # no passwords
        for params in _plain(_setting(self.settings, "enqueue", [])) or []:
            study.enqueue_trial(dict(params), skip_if_exists=True)

    # ----------------------------------------------------------------- trials
    def _task_overrides(self, trial: Any) -> list[str]:
        """The job overrides of a trial whose params are suggested: fixed values, the searched
        params and what the ``custom_search_space`` hook adds."""
        params = {k: trial.params[k] for k in self.space.distributions}
        extra: Mapping[str, Any] = {}
        if self._hook is not None:
            extra = self._hook(self._app_config(), trial) or {}
        task_overrides = [f"{k}={v}" for k, v in self.space.fixed.items()]
        return task_overrides + to_overrides(params) + to_overrides(extra)

    def _hidden_overrides(self, trial_id: int, trial_number: int, subdir: str | None) -> list[str]:
        """What the sweeper adds to a trial's own overrides: the context its job reports through,
        and its job directory (None: the user's ``hydra.sweep.subdir`` applies)."""
        assert self.spec is not None
        context = TrialContext(
            storage=self.storage,
            study_name=self.study_name,
            trial_id=trial_id,
            trial_number=trial_number,
            objective_names=tuple(self.spec.names or ()),
            directions=self.spec.directions,
            report_every=max(1, int(_setting(self.settings, "report_every", 1))),
        )
        hidden = [context.override()]
        if subdir is not None:
            hidden.append(f"hydra.sweep.subdir={subdir}")
        return hidden

    def _prime_job_configs(self) -> None:
        """Compose one job config of the trials' shape before the first trial.

        The first job of a shape is a full Hydra composition (~60 ms on the default config);
        done here, at worker start like the base model load, every trial's config comes from
        the cache. The params come from a scratch in-memory study, so the study is untouched.
        A failure only means the first trial composes its config itself.
        """
        context = getattr(self.launcher, "hydra_context", None)
        loader = getattr(context, "config_loader", None)
        master = getattr(self.launcher, "config", None)
        if not isinstance(loader, CachingConfigLoader) or master is None:
            return
        import optuna

        verbosity = optuna.logging.get_verbosity()
        try:
            optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "new study created" line for it
            scratch = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
            trial = scratch.ask(fixed_distributions=dict(self.space.distributions))
            subdir = str(trial.number) if self._subdir_is_default() else None
            overrides = self._task_overrides(trial) + self._hidden_overrides(trial._trial_id, trial.number, subdir)
            loader.load_sweep_config(master, overrides)
        except Exception as err:  # noqa: BLE001 - the first trial composes (and reports) it again
            log.debug("job config not primed: %s", err)
        finally:
            optuna.logging.set_verbosity(verbosity)

    def _ask(self) -> tuple[Any, list[str]]:
        trial = self.study.ask(fixed_distributions=dict(self.space.distributions))
        task_overrides = self._task_overrides(trial)
        subdir = None
        with study_mod.batched_writes(self.storage):  # the trial's first attrs: one journal append
            if self._subdir_is_default():
                subdir = str(trial.number)
                sweep_dir = Path(self._sweep_dir())
                k = 1
                while (sweep_dir / subdir).exists():  # never overwrite an old job dir
                    subdir = f"{trial.number}_rerun{k}"
                    k += 1
                trial.set_user_attr("job_dir", str(sweep_dir / subdir))
            trial.set_user_attr(study_mod.ATTR_WORKER, study_mod.worker_tag())
            trial.set_user_attr(ATTR_OVERRIDES, shlex.join(task_overrides))
        hidden = self._hidden_overrides(trial._trial_id, trial.number, subdir)
        log.debug("[trial %d] %s", trial.number, " ".join(task_overrides) or "(no overrides)")
        return trial, task_overrides + hidden

    def _outcome(self, job_return: Any) -> Outcome:
        from hydra.core.utils import JobStatus

        assert self.spec is not None
        if job_return is None:
            return Outcome(state="fail", status="failed", reason="the launcher returned no result")
        if job_return.status == JobStatus.COMPLETED:
            return outcome_from_return(job_return.return_value, self.spec)
        try:
            _ = job_return.return_value  # re-raises the job's exception
        except BaseException as exc:  # noqa: BLE001 - any job failure becomes FAIL
            return outcome_from_exception(exc)
        return Outcome(state="fail", status="failed", reason=f"job status {job_return.status}")

    def _tell(self, trial: Any, outcome: Outcome) -> None:
        from optuna.trial import TrialState

        attrs = {**outcome.user_attrs, study_mod.ATTR_STATUS: outcome.status, study_mod.ATTR_REASON: outcome.reason}
        if self._gpu is not None and cuda_in_use():  # the plan's GPU, if the job did train on one
            attrs[study_mod.ATTR_GPU] = self._gpu
        params = trial.params
        with study_mod.batched_writes(self.storage):  # one journal append for them all, before tell reads them
            for key, value in attrs.items():
                if key not in params or params[key] != value:  # a param's own value is already shown
                    trial.set_user_attr(key, value)
            if outcome.state == "complete":
                for name, value in outcome.constraints.items():
                    trial.set_constraint(name, value)
        if outcome.state == "complete":
            self.study.tell(trial, outcome.values)
        elif outcome.state == "pruned":
            self.study.tell(trial, state=TrialState.PRUNED)
        else:
            frozen = self.study.tell(trial, state=TrialState.FAIL)
            if _setting(self.settings, "penalize_failures", True):
                study_mod.add_penalty_record(self.study, frozen)
        self.console.poll()  # its line (with state, values and reason) and the progress line

    def _finish_recorded(self, frozen: Any) -> bool:
        """Tell a dead process's trial whose job had recorded its result (killed before `tell`)."""
        import optuna

        recorded = frozen.user_attrs.get(ATTR_JOB_RESULT)
        if not isinstance(recorded, Mapping) or self.spec is None:
            return False
        self._tell(optuna.trial.Trial(self.study, frozen._trial_id), outcome_from_return(dict(recorded), self.spec))
        self.hooks.on_recovered(recorded)
        self.console.note(f"trial {frozen.number} finished from the result its job recorded before the sweep stopped")
        return True

    def _check_failure_rate(self) -> None:
        max_rate = float(_setting(self.settings, "max_failure_rate", 1.0))
        min_trials = int(_setting(self.settings, "failure_min_trials", 5))
        p = study_mod.progress(self.study)
        if p.finished >= min_trials and p.failure_rate > max_rate:
            from optuna.trial import TrialState

            reasons = []
            for t in self.study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
                reason = t.user_attrs.get(study_mod.ATTR_REASON)
                if not study_mod.is_counted(t):  # stale, interrupted: not failed configurations
                    continue
                if reason and reason not in reasons:
                    reasons.append(str(reason))
            raise SweepAbortedError(
                f"Aborting the sweep: {p.failed} of {p.finished} finished trials failed "
                f"({p.failure_rate:.0%}), above hydra.sweeper.max_failure_rate={max_rate:g} "
                f"(checked from {min_trials} trials on). Recent reasons: {reasons[-3:]}. "
                "Fix the cause (see the trials' 'reason' in the dashboard/CSV), or raise "
                "max_failure_rate; rerunning the command resumes the study."
            )

    def _loop(self, target: int, batch_size: int) -> None:
        from optuna.exceptions import UpdateFinishedTrialError

        while True:
            self._check_failure_rate()
            p = study_mod.progress(self.study)
            remaining = target - p.finished - p.running
            if remaining <= 0:
                return
            batch = [self._ask() for _ in range(min(batch_size, remaining))]
            trials = [t for t, _ in batch]
            try:
                returns = self.launcher.launch([o for _, o in batch], initial_job_idx=trials[0].number)
            except KeyboardInterrupt:
                self._note_sigint_handler(exit_on_next_sigint())
                for trial in trials:  # not a failed configuration: no penalty, queued again
                    study_mod.interrupt_trial(self.study, trial)
                    self.interrupted.append(trial.number)
                    self.console.note(f"trial {trial.number} interrupted; its params are queued again")
                raise
            except BaseException as exc:
                for trial in trials:  # the launcher itself failed: do not leave RUNNING trials
                    self._tell(trial, outcome_from_exception(exc))
                raise
            returns = list(returns) + [None] * (len(trials) - len(returns))
            crash_point("before_tell")
            for trial, job_return in zip(trials, returns, strict=False):
                try:
                    self._tell(trial, self._outcome(job_return))
                except UpdateFinishedTrialError:  # another process judged this worker dead
                    self.console.note(f"trial {trial.number} was finished by another process; result not recorded")

    # ----------------------------------------------------------------- workers
    def _spawn_workers(self, placement: Placement, visible: Sequence[str]) -> list[subprocess.Popen[bytes]]:
        """Start workers 1..n-1 of `placement`, each with its threads and GPU (`worker_env`)."""
        pinned = {
            "hydra.sweeper.worker_id": None,
            "hydra.sweeper.storage": self.storage,
            "hydra.sweeper.study_name": self.study_name,
            "hydra.sweep.dir": self._sweep_dir(),
        }
        prefix = launch_prefix(self.argv, python=sys.executable)
        keep = [a for a in self.argv[1:] if a.lstrip("+~").split("=", 1)[0] not in pinned]
        extra = [f"{k}={format_value(v)}" for k, v in pinned.items() if v is not None]
        base = dict(os.environ)  # before worker 0 pins its own GPU
        procs = []
        for slot in placement.workers[1:]:
            i = slot.worker_id
            cmd = [*prefix, *keep, *extra, f"hydra.sweeper.worker_id={i}"]
            if "-m" not in keep and "--multirun" not in keep:
                cmd.append("-m")
            env = worker_env(slot, visible, base)
            log.debug("Starting worker %d (GPU %s): %s", i, env.get("CUDA_VISIBLE_DEVICES", "-"), shlex.join(cmd))
            # its output comes through this process's console: whole lines, above the progress line
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            assert proc.stdout is not None and proc.stderr is not None
            self._relays += [self.console.relay(proc.stdout), self.console.relay(proc.stderr, error=True)]
            procs.append(proc)
        return procs

    def _note_sigint_handler(self, replaced: Any) -> None:
        if self.previous_sigint is None:  # keep the caller's own, not our exit handler
            self.previous_sigint = replaced

    @staticmethod
    def _wait_workers(procs: Sequence[subprocess.Popen[bytes]], *, interrupted: bool) -> list[int]:
        """Exit codes of the spawned workers; after a Ctrl-C, a worker still running after
        ``WORKER_STOP_GRACE_S`` is sent SIGINT (it records its own trial as interrupted)."""
        if interrupted:
            deadline = time.monotonic() + WORKER_STOP_GRACE_S
            for proc in procs:
                try:
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGINT)
        return [proc.wait() for proc in procs]

    # ----------------------------------------------------------------- run
    def _header(
        self,
        *,
        target: int,
        finished: int,
        n_jobs: int,
        threads: int,
        placement: Placement | None = None,
        visible: Sequence[str] | None = None,
    ) -> None:
        assert self.spec is not None
        dashboard = study_mod.dashboard_command(study_mod.redact(self.storage))
        dashboard += "".join(f" {shlex.quote(a)}" for a in self.hooks.dashboard_args(self._app_config()))
        objective = ", ".join(f"{d} {n}" for n, d in zip(self.spec.metric_names, self.spec.directions, strict=True))
        if finished >= target:
            workers = ""
        elif not self.is_basic:
            workers = f"batches of {n_jobs} through {type(self.launcher).__name__}"
        elif placement is not None:
            workers = placement.describe(visible)
        elif n_jobs > 1:
            workers = f"{n_jobs} workers x {threads} thread{'s' if threads > 1 else ''}"
        else:
            workers = "1 worker"
        header = format_header(
            study_name=self.study_name,
            storage=study_mod.redact(self.storage),
            dashboard=dashboard,
            target=target,
            finished=finished,
            objective=objective,
            workers=workers,
        )
        for line in header:
            self.console.write(line)
        if placement is not None and placement.note and finished < target:
            self.console.note(placement.note)

    def run(self, arguments: Sequence[str]) -> SweepSummary:
        """Runs the sweep until the study has ``n_trials`` finished trials."""
        started = time.monotonic()
        self.prepare(arguments)
        if self.is_basic:
            quiet_launcher_log(_omegaconf_select(self.config, "hydra.verbose"))
        try:  # refused before the study is opened, so nothing is enqueued or printed before the error
            parse_n_jobs(_setting(self.settings, "n_jobs", 1))
        except ValueError as exc:
            raise SweepError(str(exc)) from exc
        self.open()
        assert self.spec is not None
        target = self._target()
        p = study_mod.progress(self.study)
        leader = self.worker_id == 0
        placement: Placement | None = None
        visible: list[str] = []
        if self.is_basic:  # workers, their GPUs and threads; no more workers than trials left to run
            visible = visible_gpus() if leader else []  # a spawned worker sees its one GPU and spawns none
            placement = plan_placement(  # n_jobs was checked before the study was opened
                _setting(self.settings, "n_jobs", 1),
                gpus=len(visible),
                cores=_cpu_count(),
                max_workers=max(1, target - p.finished),
            )
            n_jobs, threads = placement.n_workers, placement.threads
        else:
            n_jobs = resolve_n_jobs(_setting(self.settings, "n_jobs", 1), is_basic=False)
            threads = max(1, _cpu_count() // n_jobs)
        if leader:
            self._header(
                target=target, finished=p.finished, n_jobs=n_jobs, threads=threads, placement=placement, visible=visible
            )
            requested = int(_setting(self.settings, "n_trials", 20))
            if target < requested:
                self.console.note(f"the grid has {target} points: n_trials capped from {requested} to {target}")
        if p.finished >= target:
            if leader:
                self.console.note(
                    f"nothing to do: the study already has {p.finished} finished "
                    f"trials (n_trials={target}); raise hydra.sweeper.n_trials to continue"
                )
            summary = self.summary()
            summary.nothing_to_do = True
            return summary
        procs: list[subprocess.Popen[bytes]] = []
        if n_jobs > 1 and self.is_basic and leader:
            if self.storage.startswith("sqlite:///:memory:"):
                raise SweepError("n_jobs > 1 needs a shared storage, not in-memory SQLite")
            assert placement is not None
            set_threads(threads)
            procs = self._spawn_workers(placement, visible)
            batch_size = 1
        elif n_jobs > 1 and not self.is_basic:
            set_threads(threads)
            batch_size = n_jobs
        else:
            batch_size = 1
        visible_before = os.environ.get(CUDA_VISIBLE_DEVICES)  # put back at the end (an in-process caller sweeps again)
        self._gpu = pinned_gpu(placement, visible) if leader else spawned_worker_gpu()
        if placement is not None and leader and not pin_this_process(placement.slot(0), visible):
            log.debug("CUDA was initialised before the sweep: worker 0 keeps its device (cuda:0, GPU 0 of the plan)")
        self._prime_job_configs()
        if leader:
            self.console.follow(
                self.study,
                total=target,
                metric_names=self.spec.metric_names,
                fixed=list(self.space.fixed),
                best=lambda: best_trials(self.study, self.hooks),
                poll_every_s=WORKER_POLL_S if procs else None,
            )
        interrupted = False
        try:
            # this process's own output (its jobs' logs, warnings) as whole lines through the console
            with self.console.capture() if leader else contextlib.nullcontext():
                try:
                    self._loop(target, batch_size)
                except KeyboardInterrupt:
                    interrupted = True
                    self._note_sigint_handler(exit_on_next_sigint())
                    raise
                finally:
                    codes = self._wait_workers(procs, interrupted=interrupted)
                    for relay in self._relays:  # the workers' last lines before the summary
                        relay.join(timeout=10)
                    if any(codes) and not interrupted:
                        self.console.note(f"worker exit codes: {codes}")
                if procs:
                    if study_mod.recover_stale(self.study, finish=self._finish_recorded):  # a worker died mid-trial
                        self._loop(target, 1)
                    self._check_failure_rate()
        finally:
            self.console.close()
            if visible_before is None:
                os.environ.pop(CUDA_VISIBLE_DEVICES, None)
            else:
                os.environ[CUDA_VISIBLE_DEVICES] = visible_before
        if leader:  # once, after every worker stopped
            self.hooks.on_sweep_end(self.study)
        summary = self.summary()
        summary.elapsed_s = time.monotonic() - started
        return summary

    def summary(self) -> SweepSummary:
        """Counts, the best feasible trial(s) with their values and replay commands, and the
        top trials by the study's ranking."""
        assert self.spec is not None
        p = study_mod.progress(self.study)
        out = SweepSummary(
            study_name=self.study_name,
            storage=self.storage,
            finished=p.finished,
            failed=p.failed,
            pruned=p.pruned,
            metric_names=self.spec.metric_names,
        )
        best = best_trials(self.study, self.hooks)
        out.notes = list(self.hooks.summary_lines(self.study))
        replay = _setting(self.settings, "replay_command")
        base = shlex.split(str(replay)) if replay else app_command(self.argv)
        for trial in best:
            overrides = shlex.split(str(trial.user_attrs.get(ATTR_OVERRIDES, "")))
            command = shlex.join([*base, *overrides])
            out.best.append(
                {
                    "number": trial.number,
                    "values": dict(zip(self.spec.metric_names, trial.values, strict=False)),
                    "params": dict(trial.params),
                }
            )
            out.replay_commands.append(command)
        fixed = list(self.space.fixed)
        out.leaderboard = [
            TrialRow.from_trial(t, metric_names=self.spec.metric_names, fixed=fixed)
            for t in rank_trials(self.study, self.hooks)
        ]
        return out


def _omegaconf_select(config: Any, key: str) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.select(config, key, default=None)
