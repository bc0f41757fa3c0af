"""The sweep's per-job config cache builds exactly the config Hydra composes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode
from omegaconf import OmegaConf

from lora_sweep.cli import config_dir
from lora_sweep.sweep.compose_cache import CachingConfigLoader


@pytest.fixture()
def loader() -> Iterator:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        yield GlobalHydra.instance().config_loader()
    GlobalHydra.instance().clear()


def _job(r: int, lr: float, length: int, trial: str, *extra: str) -> list[str]:
    return [
        "results_dir=/tmp/x",
        f"lora.r={r}",
        f"train.lr={lr}",
        f"data.max_length={length}",
        f"lora.alpha={2 * r}",
        f"++hydra.job.env_set.LORA_SWEEP_TRIAL={trial}",
        *extra,
    ]


def test_cached_job_configs_equal_hydra_composition(loader) -> None:
    master = loader.load_configuration(
        config_name="config", overrides=["hydra.verbose=false"], run_mode=RunMode.MULTIRUN
    )
    cached = CachingConfigLoader(loader)
    jobs = [
        _job(8, 1e-2, 256, "a"),
        _job(16, 3e-3, 128, "b"),  # same keys, other values: built from the first
        _job(4, 1e-4, 64, "c", "lora=all_linear"),  # a group choice: composed by Hydra
        _job(32, 5e-2, 256, "d", "lora=all_linear"),  # same shape as the previous one
        _job(8, 1e-2, 256, "e", "lora.target_modules=[q_proj,k_proj]"),  # a list value: composed by Hydra
        _job(16, 2e-2, 64, "f"),
    ]
    for overrides in jobs:
        got = cached.load_sweep_config(master, list(overrides))
        want = loader.load_sweep_config(master, list(overrides))
        assert OmegaConf.to_container(got, resolve=False) == OmegaConf.to_container(want, resolve=False), overrides
        assert got.lora.r == int(overrides[1].split("=")[1])
        assert OmegaConf.is_readonly(got.hydra) == OmegaConf.is_readonly(want.hydra)
        assert OmegaConf.is_struct(got) == OmegaConf.is_struct(want)
    assert cached.hits == 3  # jobs 2, 4 and 6


def test_sweep_primes_the_cache_so_every_trial_is_a_hit(loader, tmp_path, capfd) -> None:
    """The sweeper composes one job config of the trials' shape before its first trial (worker
    start-up), so no trial pays a full composition; the configs still equal Hydra's own."""
    from hydra.core.utils import JobReturn, JobStatus
    from hydra.types import HydraContext

    from lora_sweep.sweep.runner import SweepRunner

    master = loader.load_configuration(
        config_name="config",
        run_mode=RunMode.MULTIRUN,
        overrides=[f"results_dir={tmp_path}", "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=1"],
    )
    composed: list[list[str]] = []

    class InProcessLauncher:  # what Hydra's basic launcher does with the loader, without running jobs
        hydra_context = HydraContext(config_loader=loader, callbacks=None)
        config = master

        def launch(self, job_overrides, initial_job_idx):  # noqa: ANN001, ANN202
            out = []
            for overrides in job_overrides:
                got = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
                want = loader.load_sweep_config(master, list(overrides))
                assert OmegaConf.to_container(got, resolve=False) == OmegaConf.to_container(want, resolve=False)
                composed.append(list(overrides))
                ret = JobReturn(status=JobStatus.COMPLETED)
                ret.return_value = {"stability_index": 0.5, "constraint": -1.0}
                out.append(ret)
            return out

    runner = SweepRunner(settings=master.hydra.sweeper, config=master, launcher=InProcessLauncher(), argv=["app.py"])
    summary = runner.run([])
    assert summary.finished == 3 and len(composed) == 3 and len(runner.study.trials) == 3  # no scratch trial
    assert runner.launcher.hydra_context.config_loader.hits == 3  # the first trial included
    assert "created in memory" not in capfd.readouterr().err  # the scratch study stays quiet
