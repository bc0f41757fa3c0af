"""The bad-input battery: one table of bad inputs given to a sweep that already has a study and
a CSV. Each case must print exactly one stderr line naming the problem, exit 2, and leave the
earlier CSV and study byte-identical (and create no trial or run directory). The model-level
cases also run as single runs: exit 2, one line, nothing written.

Also the security checks on untrusted input (cheap, in-process): no remote code unless the
config asks, no pickle loading, servers on 127.0.0.1, no passwords in what a sweep prints."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY, one_worker, run_cli
from tests.test_chat import NOT_PREFIX_PRESERVING
from tests.test_datafiles import bad_inputs
from tests.test_families import _gemma2

SWEEP_TINY = [
    "train.max_steps=6",
    "train.warmup_steps=1",
    "train.batch_size=4",
    "train.log_every=3",
    "data.max_length=64",
    "hydra.sweeper.enqueue=null",
]
UNREACHABLE_PG = "postgresql://postgres@127.0.0.1:1/test"  # nothing listens on port 1
# As root, directory permissions do not bind; drop the capabilities that bypass them.
_DROP_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"]


def run_sweep(*args: str, readonly_user: bool = False) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    prefix = _DROP_DAC if readonly_user and os.geteuid() == 0 else []
    return subprocess.run(
        [*prefix, sys.executable, "-m", "lora_sweep", *one_worker(["-m", *args])],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )


@pytest.fixture(scope="module")
def earlier_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A results dir after a one-trial sweep: its journal study and its CSV (one row)."""
    results = tmp_path_factory.mktemp("battery") / "results"
    proc = run_sweep(f"results_dir={results}", "hydra.sweeper.n_trials=1", *SWEEP_TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return results


@pytest.fixture(scope="module")
def no_pad_no_eos_ckpt(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint whose tokenizer has neither a pad nor an EOS token."""
    out = tmp_path_factory.mktemp("no_pad_no_eos")
    for item in tiny_ckpt.iterdir():
        shutil.copy(item, out / item.name)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = out / name
        if path.is_file():
            config = json.loads(path.read_text())
            for key in ("pad_token", "eos_token"):
                config.pop(key, None)
            path.write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def gemma2_ckpt(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Gemma2 checkpoint (the conftest tokenizer): a class transformers has no SDPA for."""
    out = tmp_path_factory.mktemp("gemma2")
    for item in tiny_ckpt.iterdir():
        if item.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(item, out / item.name)
    _gemma2().save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def odd_chat_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded checkpoint with a chat template that is not prefix-preserving."""
    from lora_sweep.embedded import TINY_LLAMA_DIR

    out = tmp_path_factory.mktemp("odd_chat") / "ckpt"
    shutil.copytree(TINY_LLAMA_DIR, out)
    (out / "chat_template.jinja").write_text(NOT_PREFIX_PRESERVING)
    return out


@pytest.fixture(scope="module")
def columnar_bad(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Bad Parquet files and `save_to_disk` directories (`tests.test_datafiles.bad_inputs`)."""
    out = tmp_path_factory.mktemp("columnar_bad")
    bad_inputs(out)
    return out


def _files(
    tmp: Path, ckpt: Path, no_pad: Path, models: dict[str, Path], columnar: Path | None = None
) -> dict[str, str]:
    files: dict[str, bytes] = {
        "malformed.json": b'[{"instruction": "x", "output": "y"',
        "bad_role.jsonl": b'{"messages": [{"role": "robot", "content": "x"}]}\n',
        "empty.json": b"",
        "no_records.json": b"[]",
        "no_output.json": b'[{"instruction": "x", "input": ""}]',
        "latin1.json": '[{"instruction": "caf\u00e9", "output": "y"}]'.encode("latin-1"),
        "bad_line.jsonl": b'{"instruction": "x", "output": "y"}\n{"instruction": "x", "output"\n',
    }
    for name, data in files.items():
        (tmp / name).write_bytes(data)
    (tmp / "not_a_checkpoint").mkdir()
    (tmp / "not_a_checkpoint" / "weights.bin").write_bytes(b"\0" * 16)
    return {
        "tmp": str(tmp),
        "ckpt": str(ckpt),
        "no_pad": str(no_pad),
        **{name: str(path) for name, path in models.items()},
        "columnar": str(columnar),
        "pg": UNREACHABLE_PG,
    }


ALPACA = "data=alpaca"
# Refused by the model-level preflight: also checked as single runs.
MODEL_LEVEL = [
    ("missing-data-path", [ALPACA, "data.path=/no/such.json"], "data file not found: /no/such.json"),
    (
        "sdpa-without-sdpa",
        ["model=local", "model.path={gemma2}", "model.attn_implementation=sdpa"],
        "model.attn_implementation=sdpa: Gemma2ForCausalLM has no SDPA attention",
    ),
    ("chat-no-template", ["data=chat", "model=local", "model.path={ckpt}"], "has no chat template"),
    (
        "chat-not-prefix-preserving",
        ["data=chat", "model=local", "model.path={odd_chat}"],
        "does not render the conversation",
    ),
    ("chat-bad-role", ["data=chat", "data.path={tmp}/bad_role.jsonl"], "turn 0 has the role 'robot'"),
    (
        "rank-beyond-layer",
        ["lora.r=100000"],
        "lora.r=100000 exceeds the smallest dimension of the targeted layer model.layers.0.self_attn.v_proj",
    ),
    (
        "max-length-beyond-positions",
        ["data.max_length=100000"],
        "data.max_length=100000 exceeds the model's max_position_embeddings=1024",
    ),
    ("empty-training-split", ["data.val_size=400"], "data.val_size=400 leaves 0 training and 400 validation records"),
    ("val-size-not-whole", ["data.val_size=2.5"], "data.val_size must be a fraction below 1 or a whole number"),
]
# (case id, overrides, what the one error line must say)
BATTERY = [
    *MODEL_LEVEL,
    ("malformed-json", [ALPACA, "data.path={tmp}/malformed.json"], "malformed.json is not valid JSON"),
    ("empty-file", [ALPACA, "data.path={tmp}/empty.json"], "empty.json is empty"),
    ("no-records", [ALPACA, "data.path={tmp}/no_records.json"], "holds no records"),
    ("missing-field", [ALPACA, "data.path={tmp}/no_output.json"], "record 0 is missing the field 'output'"),
    ("not-utf8", [ALPACA, "data.path={tmp}/latin1.json"], "latin1.json is not UTF-8 text"),
    ("jsonl-bad-line", [ALPACA, "data.path={tmp}/bad_line.jsonl"], "bad_line.jsonl line 2 is not valid JSON"),
    (
        "parquet-unreadable",
        [ALPACA, "data.path={columnar}/truncated.parquet"],
        "truncated.parquet is not a readable Parquet file",
    ),
    (
        "dir-not-a-dataset",
        [ALPACA, "data.path={columnar}/plain_dir"],
        "plain_dir is a directory but not a saved dataset",
    ),
    ("dataset-dict-dir", [ALPACA, "data.path={columnar}/dict"], "is a DatasetDict with the splits train, validation"),
    ("empty-saved-dataset", [ALPACA, "data.path={columnar}/empty_saved"], "empty_saved holds no records"),
    ("no-pad-no-eos", ["model=local", "model.path={no_pad}"], "has neither a pad nor an EOS token"),
    ("model-not-dir", ["model=local", "model.path={tmp}/absent_ckpt"], "is not a directory"),
    ("model-not-ckpt", ["model=local", "model.path={tmp}/not_a_checkpoint"], "is not a Hugging Face checkpoint"),
    ("rank-zero", ["lora.r=0"], "lora.r must be an integer >= 1"),
    ("negative-lr", ["train.lr=-1"], "train.lr must be a number > 0"),
    (
        "fp16-base-weights",
        ["model.dtype=float16"],
        "model.dtype=float16 cannot be trained here (fp16 needs a gradient scaler, which this trainer does not use): "
        "use model.dtype=bfloat16, or model.dtype=float32 with train.precision=bf16",
    ),
    ("inverted-interval", ["train.lr=interval(1e-2, 1e-4)"], "interval needs low < high"),
    ("empty-range", ["lora.r=range(8, 4)"], "is empty"),
    ("bad-override", ["lora.r=choice(4,"], "bad override"),
    ("unknown-option", ["lora=foo"], "Could not find 'lora/foo'"),
    ("unknown-sampler", ["hydra/sweeper/sampler=foo"], "Could not find 'hydra/sweeper/sampler/foo'"),
    (
        "unreachable-postgres",
        ["hydra.sweeper.storage={pg}", "hydra.sweeper.study_name=battery_unreachable"],
        "cannot open the study storage postgresql://postgres@127.0.0.1:1/test",
    ),
    ("readonly-results-dir", ["READONLY"], "is not writable"),
    ("foreign-csv-header", ["FOREIGN_CSV"], "has a different header"),
    ("direction-mismatch", ["hydra.sweeper.objective=final_loss"], "has directions ['maximize']"),
    (
        "changed-choices",
        ["lora.r=choice(2,3)"],
        "ran lora.r as choice(4, 8, 16, 32), but this sweep asks for choice(2, 3); resume with the same choices",
    ),
    ("unknown-objective", ["hydra.sweeper.objective=bogus"], "'bogus' is not an objective this app reports; valid:"),
    # on a resumed study: refused before the study is opened, so no enqueue message before it
    ("bad-n-jobs", ["hydra.sweeper.n_jobs=0"], "hydra.sweeper.n_jobs=0: give a positive number of workers or 'auto'"),
]


def _digests(results: Path) -> dict[str, str]:
    """Every file of the results dir (CSV, journal, trial directories) by content."""
    return {
        str(p.relative_to(results)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(results.rglob("*"))
        if p.is_file()
    }


def _assert_refused(proc: subprocess.CompletedProcess[str], message: str) -> None:
    """Exit code 2 and exactly one stderr line, the error naming the problem."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("lora_sweep: error: ") and message in lines[0], lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("overrides,message", [pytest.param(o, m, id=i) for i, o, m in BATTERY])
def test_bad_input_one_line_nonzero_exit_csv_and_study_untouched(
    earlier_sweep: Path,
    tiny_ckpt: Path,
    no_pad_no_eos_ckpt: Path,
    gemma2_ckpt: Path,
    odd_chat_ckpt: Path,
    columnar_bad: Path,
    tmp_path: Path,
    overrides: list[str],
    message: str,
) -> None:
    models = {"gemma2": gemma2_ckpt, "odd_chat": odd_chat_ckpt}
    fmt = _files(tmp_path, tiny_ckpt, no_pad_no_eos_ckpt, models, columnar_bad)
    results = tmp_path / "results"
    shutil.copytree(earlier_sweep, results)
    readonly = overrides == ["READONLY"]
    if overrides == ["FOREIGN_CSV"]:
        (results / "lora_tuning_results.csv").write_text("run,loss\nold-tool-run,1.5\n")
    args = [o.format(**fmt) for o in overrides if o not in ("READONLY", "FOREIGN_CSV")]
    before = _digests(results)
    modes = {p: p.stat().st_mode for p in [results, *results.rglob("*")]}
    if readonly:
        for p in modes:
            p.chmod(modes[p] & ~0o222)
    try:
        proc = run_sweep(
            f"results_dir={results}", "hydra.sweeper.n_trials=3", *SWEEP_TINY, *args, readonly_user=readonly
        )
    finally:
        for p, mode in modes.items():
            p.chmod(mode)
    _assert_refused(proc, message)
    assert "Traceback" not in proc.stdout
    assert _digests(results) == before  # CSV, study and trial directories byte-identical, nothing new


@pytest.mark.slow
@pytest.mark.parametrize("overrides,message", [pytest.param(o, m, id=i) for i, o, m in MODEL_LEVEL])
def test_bad_input_single_run_exits_2_with_one_line_and_writes_nothing(
    tiny_ckpt: Path,
    no_pad_no_eos_ckpt: Path,
    gemma2_ckpt: Path,
    odd_chat_ckpt: Path,
    tmp_path: Path,
    overrides: list[str],
    message: str,
) -> None:
    fmt = _files(tmp_path, tiny_ckpt, no_pad_no_eos_ckpt, {"gemma2": gemma2_ckpt, "odd_chat": odd_chat_ckpt})
    results = tmp_path / "results"
    proc = run_cli(*TINY, *[o.format(**fmt) for o in overrides], f"results_dir={results}")  # the case's values win
    _assert_refused(proc, message)
    assert not results.exists()  # no CSV row, no run directory


@pytest.mark.slow
def test_null_targets_train_on_peft_defaults_and_record_them(tmp_path: Path) -> None:
    from lora_sweep.results import read_rows, results_csv_path

    proc = run_cli("lora.target_modules=null", f"results_dir={tmp_path}", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = read_rows(results_csv_path(tmp_path)).iloc[0]
    assert row["lora.target_modules"] == "" and row["adapted_modules"] == "q_proj,v_proj"


# ------------------------------------------------------------------------------ security

SOURCES = sorted((REPO / "lora_sweep").rglob("*.py")) + sorted((REPO / "hydra_plugins").rglob("*.py"))


def test_remote_code_only_when_the_config_asks() -> None:
    import re

    for path in SOURCES:
        assert not re.search(r"trust_remote_code\s*=\s*True", path.read_text()), path
    loader = (REPO / "lora_sweep" / "model.py").read_text()
    loads = loader.count("from_pretrained(") + loader.count("from_config(")
    assert loads == loader.count("trust_remote_code=cfg.trust_remote_code") == 4
    for option in sorted((REPO / "conf" / "model").glob("*.yaml")):
        assert re.search(r"^trust_remote_code: false\b", option.read_text(), re.M), option


@pytest.mark.parametrize("trust", [False, True])
def test_loaders_pass_the_configured_trust_remote_code_and_stay_local(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, trust: bool
) -> None:
    import transformers

    from lora_sweep.config import ModelConfig
    from lora_sweep.model import ModelError, load_model, load_model_config, load_tokenizer

    seen: list[dict[str, object]] = []

    def fake_from_pretrained(*args: object, **kwargs: object) -> object:
        seen.append(kwargs)
        raise OSError("stop here")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_from_pretrained)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", fake_from_pretrained)
    cfg = ModelConfig(name="local", path=str(tmp_path), trust_remote_code=trust)
    loads = (
        lambda: load_tokenizer(tmp_path, cfg),
        lambda: load_model(tmp_path, cfg, None),
        lambda: load_model_config(tmp_path, cfg),
    )
    for load in loads:
        with pytest.raises(ModelError):
            load()
    assert [(k["trust_remote_code"], k["local_files_only"]) for k in seen] == [(trust, True)] * 3


def test_models_load_without_hub_kernels(compose_cfg, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """transformers 5 kernelizes by default where `kernels` is installed (a dependency of its
    own): on a GPU `model.train()` then fetches compiled code from the Hub, or fails offline.
    Every model load of ours turns that off."""
    import re

    import torch
    import transformers
    from omegaconf import OmegaConf

    from lora_sweep.best import merge_adapter
    from lora_sweep.config import ModelConfig, RunConfig
    from lora_sweep.embedded import TINY_LLAMA_DIR
    from lora_sweep.model import load_model

    model = load_model(TINY_LLAMA_DIR, ModelConfig(name="tiny_llama", path=None), torch.device("cpu"))
    model.train()
    assert model.use_kernels is False
    seen: list[dict[str, object]] = []

    def fake_from_pretrained(*args: object, **kwargs: object) -> object:
        seen.append(kwargs)
        raise OSError("stop here")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    with pytest.raises(OSError, match="stop here"):  # merging an adapter (lora-sweep best --merge)
        cfg = RunConfig.from_mapping(OmegaConf.to_container(compose_cfg(f"results_dir={tmp_path}"), resolve=True))
        merge_adapter(cfg, tmp_path / "adapter", tmp_path / "merged")
    assert [k.get("use_kernels") for k in seen] == [False]
    loads = 0
    for path in SOURCES:
        for call in re.findall(r"AutoModelForCausalLM\.from_pretrained\((?:[^()]|\([^()]*\))*\)", path.read_text()):
            if "local_files_only=True" in call:  # a load of ours, not a docstring's or a printed snippet's
                assert "use_kernels=False" in call, (path, call)
                loads += 1
    assert loads == 2  # lora_sweep.model.load_model, lora_sweep.best (merging an adapter)


def test_no_pickle_loading_and_weights_load_safely() -> None:
    import re

    for path in SOURCES:
        text = path.read_text()
        assert not re.search(r"\bpickle\.loads?\(|\bjoblib\.load\(|\bdill\.load", text), path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)
    # transformers loads .bin/.pt weights (when a checkpoint has no safetensors) with weights_only=True
    import inspect

    from transformers import modeling_utils

    assert "weights_only: bool = True" in inspect.getsource(modeling_utils.load_state_dict)


def test_servers_bind_localhost_and_storage_passwords_are_not_printed() -> None:
    for path in [*SOURCES, *sorted((REPO / "conf").rglob("*.yaml")), REPO / "Makefile"]:
        assert "0.0.0.0" not in path.read_text(), path
    from optuna_dashboard._config import DashboardConfig  # the dashboard extra; default bind address

    assert DashboardConfig().host == "127.0.0.1"
    from lora_sweep.sweep.study import dashboard_command, redact

    assert redact("postgresql://u:s3cret@db:5432/x") == "postgresql://u:***@db:5432/x"
    assert redact("hydra.sweeper.storage=postgresql://u:s3cret@db/x") == "hydra.sweeper.storage=postgresql://u:***@db/x"
    assert redact("postgresql://u@db/x") == "postgresql://u@db/x" and redact("/a/journal.log") == "/a/journal.log"
    assert "s3cret" not in dashboard_command(redact("postgresql://u:s3cret@db/x"))
