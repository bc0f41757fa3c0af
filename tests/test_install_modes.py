"""Every install mode works outside the checkout: `pip install .`, `pip install -e .` (the
build backend's default editable mode) and a built wheel.

Each mode installs the project into its own scratch venv that reuses this interpreter's
installed dependencies through a .pth line naming its site-packages. Python does not read
the .pth files inside a directory added that way, so the checkout's own (editable) install
stays invisible: a scratch venv imports lora_sweep only once its own install is in it. The
installs use `--no-deps --no-build-isolation` (no downloads), and every command runs from a
directory outside the repository, where Hydra finds its plugins only through what was
installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest

from lora_sweep.results import read_rows
from lora_sweep.sweep.study import open_storage
from tests.conftest import REPO

pytestmark = pytest.mark.slow

MODES = ("regular", "editable", "wheel")
SWEEP = [
    "hydra.sweeper.n_trials=2",
    "hydra.sweeper.n_jobs=1",
    "results_dir=out",
    "train.max_steps=6",
    "train.warmup_steps=1",
    "train.batch_size=4",
    "data.max_length=64",
    "hydra.sweeper.enqueue=null",
    "hydra.sweeper.report_every=1",
]
APP_DIR = REPO / "tests" / "sweep_apps"
# Where the installed package says it lives, seen from inside the scratch venv.
WHERE = """
import importlib.metadata, json, lora_sweep, lora_sweep.cli, hydra_plugins.lora_sweep_sweeper as plugin
dist = importlib.metadata.distribution("lora-sweep")
print(json.dumps({"module": lora_sweep.__file__, "conf": str(lora_sweep.cli.config_dir()),
                  "plugin": plugin.__file__, "dist": str(dist.locate_file(""))}))
"""


@dataclass(frozen=True)
class Install:
    """The project installed one way into a scratch venv; commands run in `work`."""

    mode: str
    python: Path
    site: Path
    work: Path

    def run(self, *args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess[str]:
        # No PYTHONPATH: only what the scratch venv has installed may be importable.
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        env.update(OMP_NUM_THREADS="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
        return subprocess.run(
            [str(self.python), *args], cwd=cwd or self.work, env=env, capture_output=True, text=True, timeout=timeout
        )


def _scratch_venv(root: Path) -> tuple[Path, Path]:
    """A venv without pip whose site-packages reaches this interpreter's installed packages."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, capture_output=True)
    python = root / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    ours = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (site / "_deps.pth").write_text("".join(f"{path}\n" for path in ours))
    return python, site


@pytest.fixture(scope="module", params=MODES)
def install(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Install]:
    mode: str = request.param
    root = tmp_path_factory.mktemp(f"install-{mode}")
    work = root / "work"
    work.mkdir()
    assert not work.resolve().is_relative_to(REPO)
    python, site = _scratch_venv(root / "venv")
    inst = Install(mode=mode, python=python, site=site, work=work)
    before = inst.run("-c", "import lora_sweep")
    assert before.returncode != 0, "the scratch venv sees an install of lora_sweep it did not make"

    # --ignore-installed: pip sees the checkout's own install through _deps.pth; never touch it.
    pip = ["-m", "pip", "install", "--no-deps", "--no-build-isolation", "--ignore-installed", "-q"]
    if mode == "regular":
        done = inst.run(*pip, str(REPO))
    elif mode == "editable":
        done = inst.run(*pip, "-e", str(REPO))
    else:
        wheels = root / "wheels"
        built = inst.run("-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(REPO))
        assert built.returncode == 0, built.stderr
        (wheel,) = wheels.glob("lora_sweep-*.whl")
        done = inst.run(*pip, str(wheel))
    assert done.returncode == 0, done.stderr
    yield inst


def test_the_scratch_install_is_what_is_imported(install: Install) -> None:
    proc = install.run("-c", WHERE)
    assert proc.returncode == 0, proc.stderr
    where = json.loads(proc.stdout)
    assert Path(where["dist"]) == install.site
    # The sweeper plugin stays in the namespace package `hydra_plugins`, which has no __init__.py.
    assert not (install.site / "hydra_plugins" / "__init__.py").exists()
    if install.mode == "editable":
        # One .pth line, the checkout; the configs are read from its conf/.
        assert (install.site / "_lora_sweep.pth").read_text().split() == [str(REPO)]
        assert not (install.site / "lora_sweep").exists()
        home = REPO
        assert where["conf"] == str(REPO / "conf")
    else:
        home = install.site
        assert where["conf"] == str(install.site / "lora_sweep" / "conf")
    assert where["module"] == str(home / "lora_sweep" / "__init__.py")
    assert where["plugin"] == str(home / "hydra_plugins" / "lora_sweep_sweeper" / "__init__.py")


def test_default_sweep_runs_outside_the_checkout(install: Install) -> None:
    work = install.work / "sweep"
    work.mkdir()
    proc = install.run("-m", "lora_sweep", "-m", *SWEEP, cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_rows(work / "out" / "lora_tuning_results.csv")
    assert len(rows) == 2
    assert list(rows["model"]) == ["tiny_llama"] * 2 and list(rows["steps_completed"]) == [6, 6]


def test_foreign_app_picks_the_sweeper(install: Install) -> None:
    # A copy of the test app outside the repository that selects the sweeper on the command
    # line only, so Hydra has to find it among the installed plugins.
    app = install.work / "app"
    shutil.copytree(APP_DIR, app, ignore=shutil.ignore_patterns("__pycache__"))
    conf = app / "conf" / "app.yaml"
    text = conf.read_text()
    assert "  - override hydra/sweeper: lora_sweep\n" in text
    conf.write_text(text.replace("  - override hydra/sweeper: lora_sweep\n", ""))
    results = app / "results"
    proc = install.run(
        str(app / "app.py"),
        "-m",
        f"results_dir={results}",
        "hydra/sweeper=lora_sweep",
        "hydra.sweeper.n_trials=2",
        cwd=app,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "best trial" in proc.stdout
    study = optuna.load_study(study_name="app", storage=open_storage(str(results / "optuna_journal.log")))
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]


def test_bad_option_exits_2_with_one_line(install: Install) -> None:
    work = install.work / "bad"
    work.mkdir()
    proc = install.run("-m", "lora_sweep", "lora=nope", "results_dir=out", cwd=work)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Available options in 'lora': all_linear, default, qv" in lines[0], proc.stderr
    assert not (work / "out").exists()
