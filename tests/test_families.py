"""Every mainstream decoder family trains with the defaults: a tiny random checkpoint of each,
saved with save_pretrained, through the real config composition and one trial. The default
LoRA targets are peft's per architecture (all linear layers where peft has none), attention is
SDPA where the model has it, and the self-check says what it verified and what it skipped."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from lora_sweep.cache import TrialCache
from lora_sweep.cli import preflight
from lora_sweep.config import ModelConfig, RunConfig
from lora_sweep.errors import INPUT_ERRORS, ModelError
from lora_sweep.model import load_model
from lora_sweep.trial import check_inputs, run_trial
from tests.conftest import TINY

# The conftest tokenizer's: 384 tokens, <s> 0, </s> 1, <pad> 2.
SHAPE: dict[str, Any] = {
    "vocab_size": 384,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 2,
}
# hidden 32, 2 layers, 4 query heads sharing 2 key/value heads where the family has GQA
DECODER: dict[str, Any] = {
    **SHAPE,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}


@dataclass(frozen=True)
class Family:
    """A tiny checkpoint of one architecture and what its trial must show."""

    name: str
    build: Callable[[], Any]  # -> the random-init causal LM
    adapted: list[str]
    kv_expansion: str  # expected at the start of the self-check's kv_expansion detail
    sdpa: bool = True  # whether transformers has SDPA attention for it


def _llama() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**DECODER))


def _qwen2() -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**DECODER))


def _qwen3() -> Any:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(**DECODER, head_dim=8))


def _mistral() -> Any:
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(**DECODER))


def _gemma2() -> Any:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    return Gemma2ForCausalLM(Gemma2Config(**DECODER, head_dim=8))


def _gemma3() -> Any:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return Gemma3ForCausalLM(Gemma3TextConfig(**DECODER, head_dim=8))


def _phi3() -> Any:
    from transformers import Phi3Config, Phi3ForCausalLM

    return Phi3ForCausalLM(Phi3Config(**DECODER))


def _olmo2() -> Any:
    from transformers import Olmo2Config, Olmo2ForCausalLM

    return Olmo2ForCausalLM(Olmo2Config(**DECODER))


def _granite() -> Any:
    from transformers import GraniteConfig, GraniteForCausalLM

    return GraniteForCausalLM(GraniteConfig(**DECODER))


def _gpt_neox() -> Any:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = {k: v for k, v in DECODER.items() if k != "num_key_value_heads"}  # multi-head only
    return GPTNeoXForCausalLM(GPTNeoXConfig(**config))


def _gpt2() -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(**SHAPE, n_embd=32, n_layer=2, n_head=4, n_positions=256))


GQA = "GQA: 4 query heads share 2 key/value heads (n_rep=2); verified:"
ALL_LINEAR = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
FAMILIES = [
    Family("llama", _llama, ["q_proj", "v_proj"], GQA),
    Family("qwen2", _qwen2, ["q_proj", "v_proj"], GQA),
    Family("qwen3", _qwen3, ["q_proj", "v_proj"], GQA),
    Family("mistral", _mistral, ["q_proj", "v_proj"], GQA),
    Family("gemma2", _gemma2, ["q_proj", "v_proj"], GQA, sdpa=False),
    Family("gemma3_text", _gemma3, ["q_proj", "v_proj"], GQA),
    Family("phi3", _phi3, ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"], GQA),
    Family("olmo2", _olmo2, ALL_LINEAR, GQA),
    Family("granite", _granite, ALL_LINEAR, GQA),
    Family("gpt_neox", _gpt_neox, ["query_key_value"], "no key/value expansion (multi-head attention: 4 heads)"),
    Family("gpt2", _gpt2, ["c_attn"], "no key/value expansion (multi-head attention: 4 heads)"),
]


def _save_checkpoint(fam: Family, tokenizer_dir: Path, out: Path) -> Path:
    """The random-init model saved with save_pretrained beside the conftest checkpoint's
    tokenizer (whose vocabulary the model's matches)."""
    for tokenizer_file in tokenizer_dir.glob("tokenizer*.json"):
        shutil.copy(tokenizer_file, out / tokenizer_file.name)
    torch.manual_seed(0)
    fam.build().save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=FAMILIES, ids=[f.name for f in FAMILIES])
def family(
    request: pytest.FixtureRequest, tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Family, Path]:
    """(family, its checkpoint directory)."""
    fam: Family = request.param
    return fam, _save_checkpoint(fam, tiny_ckpt, tmp_path_factory.mktemp(fam.name))


def _run_cfg(compose_cfg: Callable[..., DictConfig], ckpt: Path, tmp_path: Path, *overrides: str) -> RunConfig:
    composed = compose_cfg(
        "model=local",
        f"model.path={ckpt}",
        f"results_dir={tmp_path}",
        *TINY,
        "train.eval_every=3",
        "data.val_size=8",
        *overrides,
    )
    return RunConfig.from_mapping(OmegaConf.to_container(composed, resolve=True))


def test_every_family_trains_with_the_defaults(
    family: tuple[Family, Path], compose_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    fam, ckpt = family
    cfg = _run_cfg(compose_cfg, ckpt, tmp_path)
    assert cfg.lora.target_modules is None and cfg.model.attn_implementation == "auto"  # the defaults
    cache = TrialCache()
    check_inputs(cfg, cache)
    result = run_trial(cfg, tmp_path / "run", cache=cache)
    assert result.status == "success", (result.status, result.reason)
    assert result.steps_completed == 6
    assert result.adapted_modules == fam.adapted
    checks = result.self_check
    assert checks["kv_expansion"].startswith(fam.kv_expansion), checks["kv_expansion"]
    assert "not verified" not in checks["kv_expansion"]
    # every family computes the labelled positions' logits alone, equal to its full forward's
    assert checks["label_logits"].startswith("logits of the "), checks["label_logits"]
    (entry,) = cache.models
    assert entry.label_logits
    assert entry.model.config._attn_implementation == ("sdpa" if fam.sdpa else "eager")
    if fam.sdpa:
        assert checks["eager_matches_sdpa"].startswith("max |eager - sdpa| = ")
    else:
        skipped = f"skipped: {type(entry.model).__name__} has no SDPA attention; eager only, nothing to compare"
        assert checks["eager_matches_sdpa"] == skipped
        # a second trial on the cached model reuses the model-level checks, the skipped one too
        again = run_trial(cfg, tmp_path / "again", cache=cache)
        assert again.cache_hit and again.status == "success"
        assert again.self_check["eager_matches_sdpa"] == f"cached: {skipped}"


NO_SDPA = next(f for f in FAMILIES if not f.sdpa)  # Gemma2 in transformers 5.24 (softcapping)


@pytest.fixture(scope="module")
def no_sdpa_ckpt(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_checkpoint(NO_SDPA, tiny_ckpt, tmp_path_factory.mktemp(f"{NO_SDPA.name}_no_sdpa"))


def test_explicit_sdpa_without_sdpa_is_refused_in_one_line(
    no_sdpa_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM

    def no_weights(*args: object, **kwargs: object) -> None:
        raise AssertionError("weights were loaded before the refusal")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_weights)
    argv = ["model=local", f"model.path={no_sdpa_ckpt}", "model.attn_implementation=sdpa", f"results_dir={tmp_path}"]
    with pytest.raises(ModelError) as info:
        preflight(argv)  # what `python -m lora_sweep` runs first: refused with exit code 2
    message = str(info.value)
    assert isinstance(info.value, INPUT_ERRORS) and "\n" not in message
    assert message.startswith("model.attn_implementation=sdpa: Gemma2ForCausalLM has no SDPA attention")
    assert message.endswith("use model.attn_implementation=eager or auto")
    # a trial started without the pre-flight is refused the same way, before loading anything
    cfg = ModelConfig(name="local", path=str(no_sdpa_ckpt), attn_implementation="sdpa")
    with pytest.raises(ModelError, match="^model.attn_implementation=sdpa: Gemma2ForCausalLM"):
        load_model(no_sdpa_ckpt, cfg, torch.device("cpu"))


@pytest.mark.parametrize(("ckpt", "resolved"), [("tiny_ckpt", "sdpa"), ("no_sdpa_ckpt", "eager")])
def test_auto_shares_the_cached_model_with_its_resolution(
    ckpt: str, resolved: str, request: pytest.FixtureRequest
) -> None:
    path: Path = request.getfixturevalue(ckpt)
    cache, cpu = TrialCache(), torch.device("cpu")
    auto, hit = cache.checkout_model(path, ModelConfig(name="local", path=str(path)), cpu)
    assert not hit and auto.model.config._attn_implementation == resolved
    cache.give_back(auto, adapted=None)
    same, hit = cache.checkout_model(path, ModelConfig(name="local", path=str(path), attn_implementation=resolved), cpu)
    assert hit and same is auto
    cache.give_back(same, adapted=None)
