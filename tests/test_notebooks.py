"""The notebooks: committed without outputs, and run top to bottom headless on a real sweep."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.test_analysis import tiny_sweep_dir
from tests.test_experiments import tiny_experiments_dir

nbformat = pytest.importorskip("nbformat")

NOTEBOOKS = REPO / "notebooks"
# notebook -> figures it must draw (image/png outputs) and the files it saves
EXPECTED = {
    "compare_trials.ipynb": {"curves", "stability_by_param", "r_alpha", "importances", "pareto"},
    "stability_index.ipynb": {"stability_components"},
}
# experiment notebook -> the experiment (conf/experiment/NAME.yaml, study NAME) it draws; it saves
# one figure named after it
EXPERIMENT_NOTEBOOKS = {
    "experiment_rslora.ipynb": "rslora",
    "experiment_lora_without_regret.ipynb": "lora_without_regret",
    "experiment_loraplus.ipynb": "loraplus",
}
# experiment -> what its closing cell prints about the tiny grid (ranks 1 and 4, ratios 1 and 16)
CLOSING_LINE = {
    "rslora": r"rsLoRA\) +r=1: \d+\.\d{4} -> r=4: \d+\.\d{4} \([+-]\d+\.\d%\)",
    "lora_without_regret": r"largest / smallest optimal lr across ranks: (1\.00|10\.00)",
    "loraplus": r"best ratio (1|16) at lr_A [\d.e-]+: \d+\.\d{4}",
}
ALL_NOTEBOOKS = sorted([*EXPECTED, *EXPERIMENT_NOTEBOOKS])
MIN_IMAGES = {"compare_trials.ipynb": 5, "stability_index.ipynb": 2}
# notebook -> columns of the tables it must show (HTML outputs)
TABLE_COLUMNS = {
    "compare_trials.ipynb": {"prompt", "reference", "base_answer", "answer"},
    "stability_index.ipynb": set(),
}


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_sweep_dir(tmp_path_factory)


def test_every_notebook_is_tested() -> None:
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == ALL_NOTEBOOKS


@pytest.fixture(scope="session")
def tiny_experiments(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_experiments_dir(tmp_path_factory.getbasetemp() / "tiny_experiments")


@pytest.mark.parametrize("name", ALL_NOTEBOOKS)
def test_committed_notebook_has_no_outputs(name: str) -> None:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{name} was committed with outputs; clear them (e.g. jupyter nbconvert "
                "--clear-output --inplace) before committing"
            )
    assert nb.metadata["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("name", ALL_NOTEBOOKS)
def test_notebook_reads_through_lora_sweep_analysis(name: str) -> None:
    source = "\n".join(c.source for c in nbformat.read(NOTEBOOKS / name, as_version=4).cells if c.cell_type == "code")
    assert "from lora_sweep import analysis" in source
    assert "read_csv" not in source and "steps.csv" not in source  # parsing lives in the package
    assert 'os.environ.get("LORA_SWEEP_RESULTS", "../results")' in source


def test_readme_images_exist() -> None:
    readme = (REPO / "README.md").read_text()
    for image in (
        "notebooks/images/dashboard.png",
        "notebooks/images/dashboard_artifacts.png",
        "notebooks/images/curves.png",
        *(f"notebooks/images/experiments/{study}.png" for study in EXPERIMENT_NOTEBOOKS.values()),
    ):
        assert f"]({image})" in readme
        assert (REPO / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _kernel_env(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A python3 kernelspec that runs this interpreter, ahead of any other on the machine,
    and Jupyter/IPython state in a temp dir."""
    spec = tmp / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Python 3 (lora_sweep tests)",
                "language": "python",
            }
        )
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp / "ipython"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")


def _execute(name: str, results: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[list, set[str]]:
    """Runs a notebook top to bottom on `results` with this interpreter's kernel: its outputs and
    the names of the figures it saved."""
    nbclient = pytest.importorskip("nbclient")
    _kernel_env(tmp_path, monkeypatch)
    figures = tmp_path / "figures"
    monkeypatch.setenv("LORA_SWEEP_RESULTS", str(results))
    monkeypatch.setenv("LORA_SWEEP_FIGURES", str(figures))
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    # first cell: prove the kernel is this environment's Python
    nb.cells.insert(0, nbformat.v4.new_code_cell("import sys; print(sys.prefix)"))
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=300,
        allow_errors=False,
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute()  # a cell that raises fails the test (CellExecutionError)

    assert nb.cells[0].outputs[0]["text"].strip() == sys.prefix
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o["output_type"] == "error"]
    text = "".join(o.get("text", "") for o in outputs if o["output_type"] == "stream")
    assert "Traceback" not in text
    return outputs, {p.stem for p in figures.glob("*.png")}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_runs_headless(name: str, tiny_sweep: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    outputs, figures = _execute(name, tiny_sweep, tmp_path, monkeypatch)
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= MIN_IMAGES[name]
    assert figures == EXPECTED[name]
    text = "".join(o.get("text", "") for o in outputs if o["output_type"] == "stream")
    html = "".join(o["data"].get("text/html", "") for o in outputs if "data" in o)
    assert all(f"<th>{column}</th>" in html for column in TABLE_COLUMNS[name])
    if TABLE_COLUMNS[name]:  # the base model against the best trial: a table, not the "no samples" note
        assert "against the base model" in text and "no samples" not in text


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPERIMENT_NOTEBOOKS))
def test_experiment_notebook_runs_headless_on_its_tiny_version(
    name: str, tiny_experiments: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outputs, figures = _execute(name, tiny_experiments, tmp_path, monkeypatch)
    study = EXPERIMENT_NOTEBOOKS[name]
    assert figures == {study}
    assert len([o for o in outputs if "image/png" in o.get("data", {})]) == 1
    text = "".join(o.get("text", "") for o in outputs if o["output_type"] == "stream")
    assert f"4 trials of study '{study}'" in text  # the tiny grid, read from its own study
    # the closing cell reads its verdict's numbers off the tiny grid's curves
    assert re.search(CLOSING_LINE[study], text), text[-2000:]
