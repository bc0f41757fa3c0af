"""Sample answers of a completed trial: which prompts, greedy and repeatable, the base model's
own answers, no effect on training, and the cost recorded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from lora_sweep import data as data_lib
from lora_sweep import samples as samples_mod
from lora_sweep.cache import TrialCache
from lora_sweep.config import RunConfig
from lora_sweep.model import load_model, load_tokenizer, resolve_model_dir
from lora_sweep.samples import SAMPLE_FIELDS, SAMPLES_FILENAME, read_samples, sample_prompts
from lora_sweep.trial import TrialResult, run_trial, split_data
from tests.conftest import TINY

MAX_NEW = 8  # tokens per answer: enough to compare answers, cheap on 2 cores


def _cfg(compose_cfg, tmp_path: Path, *overrides: str) -> RunConfig:
    cfg = compose_cfg(f"results_dir={tmp_path}", *TINY, f"train.sample_max_new_tokens={MAX_NEW}", *overrides)
    return RunConfig.from_mapping(OmegaConf.to_container(cfg, resolve=True))


def _local(ckpt: Path) -> tuple[str, str]:
    return "model=local", f"model.path={ckpt}"


def _samples(result: TrialResult) -> list[dict]:
    return read_samples(result.run_dir / SAMPLES_FILENAME)


def _steps(run_dir: Path) -> list[tuple[str, ...]]:
    """The step log without its wall-clock column."""
    rows = [line.split(",") for line in (run_dir / "steps.csv").read_text().splitlines()]
    keep = [i for i, name in enumerate(rows[0]) if name != "elapsed_s"]
    return [tuple(row[i] for i in keep) for row in rows]


def _greedy(model: torch.nn.Module, tokenizer, ids: tuple[int, ...], max_new_tokens: int) -> str:
    """transformers' own greedy decoding of one prompt, up to and without EOS."""
    prompt = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True)


def test_completed_trial_writes_its_samples_and_their_cost(compose_cfg, tiny_ckpt: Path, tmp_path: Path) -> None:
    cfg = _cfg(compose_cfg, tmp_path, *_local(tiny_ckpt))
    result = run_trial(cfg, tmp_path / "run")
    assert result.status == "success"
    lines = _samples(result)
    assert len(lines) == cfg.train.sample_prompts == 3
    assert [tuple(line) for line in lines] == [SAMPLE_FIELDS] * 3
    assert [line["index"] for line in lines] == [0, 1, 2]
    assert len({line["prompt"] for line in lines}) == 3
    for line in lines:
        assert 1 <= line["tokens"] <= MAX_NEW and 1 <= line["base_tokens"] <= MAX_NEW
        assert line["finished"] or line["tokens"] == MAX_NEW
        assert line["reference"] and line["prompt"].endswith("### Response:\n")
    saved = json.loads((result.run_dir / "result.json").read_text())
    assert saved["sample_seconds"] == result.sample_seconds > 0
    assert result.csv_row(cfg)["sample_seconds"] == round(result.sample_seconds, 3)


def test_samples_are_greedy_and_leave_training_unchanged(compose_cfg, tiny_ckpt: Path, tmp_path: Path) -> None:
    cfg = _cfg(compose_cfg, tmp_path, *_local(tiny_ckpt))
    first = run_trial(cfg, tmp_path / "a")
    second = run_trial(cfg, tmp_path / "b")  # a fresh cache: base answers generated again
    without = run_trial(_cfg(compose_cfg, tmp_path, *_local(tiny_ckpt), "train.sample_prompts=0"), tmp_path / "c")
    assert _samples(first) == _samples(second)
    assert first.metrics == second.metrics == without.metrics
    assert _steps(tmp_path / "a") == _steps(tmp_path / "c")  # every step's loss and grad norm
    assert not (tmp_path / "c" / SAMPLES_FILENAME).exists() and without.sample_seconds == 0.0


def test_samples_only_for_completed_trials(compose_cfg, tiny_ckpt: Path, tmp_path: Path) -> None:
    cfg = _cfg(compose_cfg, tmp_path, *_local(tiny_ckpt))
    result = run_trial(cfg, tmp_path / "run", on_step=lambda history, evals: history[-1].step == 2)
    assert result.status == "pruned"
    assert not (tmp_path / "run" / SAMPLES_FILENAME).exists() and result.sample_seconds == 0.0


def _base_models_own(cfg: RunConfig) -> tuple[list[str], list[str]]:
    """(prompt texts, greedy answers) of the base model loaded fresh from disk, never adapted."""
    model_dir = resolve_model_dir(cfg.model)
    tokenizer = load_tokenizer(model_dir, cfg.model)
    base = load_model(model_dir, cfg.model, torch.device("cpu"))
    _, _, _, val_records = split_data(cfg, TrialCache())
    prompts = sample_prompts(val_records, tokenizer, template=cfg.data.template, count=3, max_prompt_tokens=10_000)
    return [p.text for p in prompts.prompts], [_greedy(base, tokenizer, p.input_ids, MAX_NEW) for p in prompts.prompts]


@pytest.mark.parametrize("init", ["default", "pissa"])
def test_base_answers_are_the_base_models_own(
    compose_cfg, tiny_ckpt: Path, tmp_path: Path, init: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # PiSSA moves part of each targeted weight into the adapter: the model with its adapter
    # disabled is not the base model, so the base answers must come from before the adapter.
    # A learning rate high enough that the trained answers differ from the base model's.
    cfg = _cfg(compose_cfg, tmp_path, *_local(tiny_ckpt), f"lora.init={init}", "train.lr=5e-2", "train.max_steps=12")
    cache = TrialCache()
    result = run_trial(cfg, tmp_path / "run", cache=cache)
    assert result.status == "success", result.reason
    lines = _samples(result)
    prompts, own = _base_models_own(cfg)
    assert [line["prompt"] for line in lines] == prompts
    assert [line["base_answer"] for line in lines] == own
    assert [line["answer"] for line in lines] != own  # the trained adapter answered, not the base model

    # the next trial of the same cache reuses them: the base model answers once per cached model
    entry = cache.models[0]
    assert [[a.text for a in answers] for answers in entry.base_samples.values()] == [own]
    generated: list[bool] = []  # whether each generation ran on the bare base model
    real_generate = samples_mod.generate_answers

    def counting(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        generated.append(model is entry.model)
        return real_generate(model, *args, **kwargs)

    monkeypatch.setattr(samples_mod, "generate_answers", counting)
    again = run_trial(cfg, tmp_path / "again", cache=cache)
    assert [line["base_answer"] for line in _samples(again)] == own
    assert len(entry.base_samples) == 1 and generated == [False]  # only the trained model answered


def test_instruction_prompts_are_the_training_prompts(tiny_ckpt: Path) -> None:
    from transformers import AutoTokenizer

    from lora_sweep.embedded import SANITY_SAMPLES_PATH

    tokenizer = AutoTokenizer.from_pretrained(tiny_ckpt)
    records = data_lib.load_records(SANITY_SAMPLES_PATH)[:20]
    prompts = sample_prompts(records, tokenizer, template="plain", count=3, max_prompt_tokens=10_000)
    # the same three whatever the file order: chosen by content, not position
    shuffled = sample_prompts(records[::-1], tokenizer, template="plain", count=3, max_prompt_tokens=10_000)
    assert prompts == shuffled
    by_output = {r["output"]: r for r in records}
    for prompt in prompts.prompts:
        record = by_output[prompt.reference]
        expected = (
            data_lib.added_prefix(tokenizer)
            + tokenizer(data_lib.format_prompt(record, "plain"), add_special_tokens=False)["input_ids"]
        )
        assert list(prompt.input_ids) == expected and expected[0] == tokenizer.bos_token_id
    cut = sample_prompts(records, tokenizer, template="plain", count=1, max_prompt_tokens=5)
    assert cut.prompts[0].input_ids == prompts.prompts[0].input_ids[-5:]  # the end of the prompt is kept


def test_chat_prompts_end_with_the_generation_prompt(compose_cfg, tmp_path: Path) -> None:
    # batches of 8: smaller chat batches swing enough to trip the drawup gate (DESIGN.md)
    cfg = _cfg(compose_cfg, tmp_path, "data=chat", "train.batch_size=8", "data.max_length=128")
    result = run_trial(cfg, tmp_path / "run")
    assert result.status == "success", result.reason
    lines = _samples(result)
    assert len(lines) == 3
    tokenizer = load_tokenizer(resolve_model_dir(cfg.model), cfg.model)
    _, _, _, val_records = split_data(cfg, TrialCache())
    by_prompt = {}
    for record in val_records:
        messages = record["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        text = tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
        by_prompt[text] = (messages, last)
    for line in lines:
        messages, last = by_prompt[line["prompt"]]  # the conversation up to its last assistant turn
        without = tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=False)
        assert line["prompt"].startswith(without) and line["prompt"][len(without) :].strip()  # the generation prompt
        assert line["reference"] == messages[last]["content"]


def test_analysis_reads_samples_and_puts_base_beside_best(compose_cfg, tiny_ckpt: Path, tmp_path: Path) -> None:
    from lora_sweep import analysis
    from lora_sweep.results import append_row, results_csv_path

    results = tmp_path / "results"
    cache = TrialCache()
    lines = {}
    for number, lr in enumerate(("1e-2", "5e-2")):
        cfg = _cfg(compose_cfg, results, *_local(tiny_ckpt), f"train.lr={lr}", "train.max_steps=12")
        result = run_trial(cfg, results / "sweeps" / "s" / str(number), cache=cache)
        append_row(
            results_csv_path(results), result.csv_row(cfg, study_name="s", trial_number=number, state="COMPLETE")
        )
        lines[number] = _samples(result)
    samples = analysis.load_samples(results, study_name="s")
    assert list(samples["trial_number"]) == [0, 0, 0, 1, 1, 1] and list(samples.columns[1:]) == list(SAMPLE_FIELDS)
    assert samples[samples["trial_number"] == 1].drop(columns="trial_number").to_dict("records") == lines[1]

    shown = analysis.compare_answers(results, trial=1, study_name="s")
    assert list(shown.columns) == ["trial_number", "prompt", "reference", "base_answer", "answer"]
    assert shown["answer"].tolist() == [line["answer"] for line in lines[1]]
    assert shown["base_answer"].tolist() == [line["base_answer"] for line in lines[0]]  # one base model
    trials = analysis.load_trials(results, "s")
    ranked = analysis.best_trials(trials, n=1)
    if ranked.empty:  # no trial learned enough: the best of any
        ranked = analysis.best_trials(trials, n=1, feasible_only=False)
    best = analysis.compare_answers(results, study_name="s")
    assert best["trial_number"].iloc[0] == ranked["trial_number"].iloc[0]
    with pytest.raises(analysis.NotEnoughTrialsError):
        analysis.compare_answers(results, trial=7, study_name="s")
