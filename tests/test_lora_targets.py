"""LoRA targets and rank against the model's layers: peft's defaults for `target_modules=null`
(all linear layers where peft has none), refusals in one line naming the key, and a base model
left as it was."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from lora_sweep import lora
from lora_sweep.config import LoraSettings, ModelConfig
from lora_sweep.errors import LoraTargetError
from lora_sweep.lora import adapted_modules, apply_lora, resolve_targets, targeted_layers
from lora_sweep.model import load_model

CPU = torch.device("cpu")


@pytest.fixture
def tiny_model(tiny_ckpt: Path) -> nn.Module:
    """The conftest Llama: hidden 32, key/value projections 32 -> 16."""
    return load_model(tiny_ckpt, ModelConfig(name="local", path=str(tiny_ckpt)), CPU)


def _names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules()]


def test_null_targets_take_peft_defaults_and_are_recorded(tiny_model: nn.Module) -> None:
    peft_model = apply_lora(tiny_model, LoraSettings(r=4, alpha=8, target_modules=None))
    assert adapted_modules(peft_model) == ["q_proj", "v_proj"]  # peft's mapping for llama


def test_null_targets_without_a_peft_default_fall_back_to_all_linear(caplog: pytest.LogCaptureFixture) -> None:
    from transformers import GraniteConfig, GraniteForCausalLM

    model = GraniteForCausalLM(
        GraniteConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    settings = LoraSettings(r=4, alpha=8, target_modules=None)
    lora._log_all_linear_fallback.cache_clear()  # logged once per process: not by an earlier test
    with caplog.at_level(logging.INFO, logger="lora_sweep.lora"):
        peft_model = apply_lora(model, settings)
        apply_lora(peft_model.unload(), settings)  # a second trial: no second notice
    # every linear layer of the decoder, not the output head (peft's all-linear)
    assert adapted_modules(peft_model) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    fallback = [r.getMessage() for r in caplog.records if "all-linear" in r.getMessage()]
    assert len(fallback) == 1 and "no default target modules for model type 'granite'" in fallback[0]
    assert resolve_targets(model, LoraSettings(r=4, alpha=8)) == ["q_proj", "v_proj"]  # a list stays as set


def test_unknown_targets_list_conv1d_modules_of_gpt2() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    with pytest.raises(LoraTargetError, match="linear modules here: c_attn, c_fc, c_proj, lm_head"):
        apply_lora(model, LoraSettings(r=4, alpha=8, target_modules=("nonexistent",)))
    peft_model = apply_lora(model, LoraSettings(r=4, alpha=8, target_modules=None))
    assert adapted_modules(peft_model) == ["c_attn"]


def test_rank_beyond_a_targeted_layer_is_refused_before_anything_is_injected(tiny_model: nn.Module) -> None:
    before, rng = _names(tiny_model), torch.get_rng_state()
    with pytest.raises(LoraTargetError) as info:
        apply_lora(tiny_model, LoraSettings(r=17, alpha=8, target_modules=("q_proj", "v_proj")))
    message = str(info.value)
    assert message.startswith(
        "lora.r=17 exceeds the smallest dimension of the targeted layer model.layers.0.self_attn.v_proj"
    )
    assert "(in_features=32, out_features=16); choose lora.r <= 16" in message
    assert _names(tiny_model) == before and torch.equal(torch.get_rng_state(), rng)
    assert all(p.device.type == "cpu" for p in tiny_model.parameters())  # no meta tensor left behind


def test_rank_is_checked_against_the_targeted_layers_only(tiny_model: nn.Module) -> None:
    """r=20 exceeds the key/value width (16) but not q_proj's (32): allowed on q_proj alone."""
    q_only = LoraSettings(r=20, alpha=8, target_modules=("q_proj",))
    assert set(targeted_layers(tiny_model, q_only).values()) == {(32, 32)}
    peft_model = apply_lora(tiny_model, LoraSettings(r=20, alpha=8, target_modules=("q_proj",)))
    assert adapted_modules(peft_model) == ["q_proj"]
    assert apply_lora(peft_model.unload(), LoraSettings(r=16, alpha=8)) is not None  # the limit itself is fine
