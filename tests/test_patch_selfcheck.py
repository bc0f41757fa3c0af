"""The patched forward, the GQA expansion check, and the start-up self-check catching real bugs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_sweep import data as d
from lora_sweep.config import LoraSettings, ModelConfig
from lora_sweep.lora import LoraTargetError, apply_lora
from lora_sweep.model import (
    AttentionMaskError,
    ModelError,
    attention_heads,
    check_attention_mask,
    is_patched,
    load_model,
    load_tokenizer,
    resolve_model_dir,
    verify_kv_expansion,
)
from lora_sweep.selfcheck import (
    MODEL_LEVEL_CHECKS,
    SelfCheckError,
    _logit_tolerance,
    _logits,
    check_eager_matches_sdpa,
    model_level_details,
    run_self_check,
)

CPU = torch.device("cpu")


def tiled_repeat_kv(hidden: torch.Tensor, n_rep: int) -> torch.Tensor:
    """The classic GQA bug: heads tiled (0,1,0,1) instead of interleaved (0,0,1,1)."""
    return hidden.repeat(1, n_rep, 1, 1)


@pytest.fixture
def model_and_batch(tiny_ckpt: Path):
    cfg = ModelConfig(name="local", path=str(tiny_ckpt))
    tokenizer = load_tokenizer(tiny_ckpt, cfg)
    torch.manual_seed(0)
    model = apply_lora(load_model(tiny_ckpt, cfg, CPU), LoraSettings(r=4, alpha=8))
    records = [
        {"instruction": "Reverse the words", "input": "red green blue yellow", "output": "yellow blue green red"},
        {"instruction": "Say hi", "input": "", "output": "hi"},
        {"instruction": "Add", "input": "2 3", "output": "5"},
    ]
    examples = d.tokenize_records(records, tokenizer, template="plain", max_length=128, mask_prompt=False)
    batch = d.Collator(tokenizer.pad_token_id)([d.SanityDataset(examples)[i] for i in range(3)])
    return model, batch


def test_mask_rules() -> None:
    assert check_attention_mask(torch.ones(2, 3, dtype=torch.long)).dtype == torch.bool
    assert check_attention_mask(None) is None
    with pytest.raises(AttentionMaskError, match="must be 2-D"):
        check_attention_mask(torch.ones(2, 1, 3, 3, dtype=torch.long))
    with pytest.raises(AttentionMaskError, match="additive float masks"):
        check_attention_mask(torch.zeros(2, 3))
    with pytest.raises(AttentionMaskError, match="only 0 and 1"):
        check_attention_mask(torch.full((2, 3), 2))


def test_patched_forward_refuses_4d_and_float_masks(model_and_batch) -> None:
    model, batch = model_and_batch
    assert is_patched(model.get_base_model())
    ids = batch["input_ids"]
    four_d = batch["attention_mask"][:, None, None, :].expand(-1, 1, ids.shape[1], -1)
    with pytest.raises(AttentionMaskError, match="4-D"):
        model(input_ids=ids, attention_mask=four_d)
    with pytest.raises(AttentionMaskError, match="float"):
        model(input_ids=ids, attention_mask=batch["attention_mask"].float())
    assert model(input_ids=ids, attention_mask=batch["attention_mask"]).logits.shape[:2] == ids.shape


def test_self_check_passes_on_a_correct_pipeline(model_and_batch) -> None:
    model, batch = model_and_batch
    report = run_self_check(model, batch, vocab_size=model.get_base_model().config.vocab_size)
    assert set(report.details) == {
        "labels_ignore_padding",
        "only_lora_trainable",
        "kv_expansion",
        "eager_matches_sdpa",
        "padding_invariance",
        "label_logits",
        "first_backward",
    }
    assert "n_rep=2" in report.details["kv_expansion"]
    assert report.label_logits and report.details["label_logits"].startswith("logits of the ")
    assert all(p.grad is None for p in model.parameters())  # leaves no gradients behind


def test_self_check_does_not_change_the_random_stream(model_and_batch) -> None:
    model, batch = model_and_batch
    torch.manual_seed(5)
    run_self_check(model, batch, vocab_size=model.get_base_model().config.vocab_size)
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(3))


def test_self_check_catches_labels_cloned_from_input_ids(model_and_batch) -> None:
    model, batch = model_and_batch
    seed_style = dict(batch, labels=batch["input_ids"].clone())  # the original seed's bug
    with pytest.raises(SelfCheckError, match="labels_ignore_padding"):
        run_self_check(model, seed_style, vocab_size=model.get_base_model().config.vocab_size)


def test_self_check_catches_broken_kv_expansion(model_and_batch, monkeypatch) -> None:
    model, batch = model_and_batch
    monkeypatch.setattr("transformers.integrations.sdpa_attention.repeat_kv", tiled_repeat_kv)
    with pytest.raises(SelfCheckError, match="kv_expansion"):
        verify = run_self_check(model, batch, vocab_size=model.get_base_model().config.vocab_size)
        del verify
    # the end-to-end comparison catches it on its own too (SDPA with a padding mask uses repeat_kv)
    model.eval()
    with torch.no_grad(), pytest.raises(SelfCheckError, match="eager_matches_sdpa"):
        check_eager_matches_sdpa(model, batch)


def test_self_check_catches_broken_eager_expansion(model_and_batch, monkeypatch) -> None:
    model, batch = model_and_batch
    monkeypatch.setattr("transformers.models.llama.modeling_llama.repeat_kv", tiled_repeat_kv)
    with pytest.raises(ModelError, match="modeling_llama.repeat_kv"):
        verify_kv_expansion(model.get_base_model())
    model.eval()
    with torch.no_grad(), pytest.raises(SelfCheckError, match="eager_matches_sdpa"):
        check_eager_matches_sdpa(model, batch)


def test_self_check_catches_trainable_base_weights(model_and_batch) -> None:
    model, batch = model_and_batch
    model.get_base_model().get_input_embeddings().weight.requires_grad_(True)
    with pytest.raises(SelfCheckError, match="only_lora_trainable"):
        run_self_check(model, batch, vocab_size=model.get_base_model().config.vocab_size)


def test_self_check_catches_implausible_initial_loss(nan_ckpt: Path, model_and_batch) -> None:
    _, batch = model_and_batch
    model = apply_lora(
        load_model(nan_ckpt, ModelConfig(name="local", path=str(nan_ckpt)), CPU), LoraSettings(r=4, alpha=8)
    )
    with pytest.raises(
        SelfCheckError, match="self-check '(eager_matches_sdpa|padding_invariance|initial_loss)' failed"
    ):
        run_self_check(model, batch, vocab_size=model.get_base_model().config.vocab_size)


def test_model_path_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="is not a directory"):
        resolve_model_dir(ModelConfig(name="local", path=str(tmp_path / "nope")))
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model_dir(ModelConfig(name="local", path=str(tmp_path)))


def test_unknown_lora_targets_name_the_available_modules(tiny_ckpt: Path) -> None:
    model = load_model(tiny_ckpt, ModelConfig(name="local", path=str(tiny_ckpt)), CPU)
    with pytest.raises(LoraTargetError, match="linear modules here: .*q_proj"):
        apply_lora(model, LoraSettings(r=4, alpha=8, target_modules=("nonexistent",)))


def test_kv_expansion_says_not_verified_where_it_finds_no_repeat_kv(model_and_batch, monkeypatch) -> None:
    model, _ = model_and_batch
    monkeypatch.delattr("transformers.models.llama.modeling_llama.repeat_kv")
    detail = verify_kv_expansion(model.get_base_model())
    assert detail.startswith("GQA: 4 query heads share 2 key/value heads (n_rep=2); verified: sdpa_attention.repeat_kv")
    assert detail.endswith(
        "not verified: transformers.models.llama.modeling_llama has no eager_attention_forward calling repeat_kv"
    )


def test_kv_expansion_checks_torch_enable_gqa(model_and_batch, monkeypatch) -> None:
    """SDPA without a mask leaves the expansion to torch (`enable_gqa`): a broken one is caught."""
    model, _ = model_and_batch
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def tiled_gqa(query, key, value, *args, enable_gqa: bool = False, **kwargs):
        if enable_gqa:
            rep = query.shape[1] // key.shape[1]
            key, value = tiled_repeat_kv(key, rep), tiled_repeat_kv(value, rep)
        return sdpa(query, key, value, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", tiled_gqa)
    with pytest.raises(ModelError, match="enable_gqa"):
        verify_kv_expansion(model.get_base_model())


def test_attention_heads_read_nested_and_renamed_configs() -> None:
    from transformers import FalconConfig, Gemma3Config, GPT2Config

    text = {"num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 16, "hidden_size": 64}
    assert attention_heads(Gemma3Config(text_config=text)) == (8, 2)  # multimodal: its text_config
    assert attention_heads(GPT2Config(n_head=4)) == (4, 4)  # n_head through attribute_map
    assert attention_heads(FalconConfig(num_attention_heads=8, multi_query=True)) == (8, 1)


def test_bf16_logits_get_the_bf16_tolerance(tiny_ckpt: Path, model_and_batch) -> None:
    """The tolerance follows the dtype the logits were computed in, not their float32 copy."""
    _, batch = model_and_batch
    assert _logit_tolerance(torch.ones(3), dtype=torch.float32) == pytest.approx(2e-3)
    assert _logit_tolerance(torch.ones(3), dtype=torch.bfloat16) == pytest.approx(1e-1)
    cfg = ModelConfig(name="local", path=str(tiny_ckpt), dtype="bfloat16")
    model = apply_lora(load_model(tiny_ckpt, cfg, CPU), LoraSettings(r=4, alpha=8))
    logits, dtype = _logits(model, batch)
    assert logits.dtype == torch.float32 and dtype == torch.bfloat16
    model.eval()
    with torch.no_grad():
        assert check_eager_matches_sdpa(model, batch).startswith("max |eager - sdpa| = ")


def test_packing_isolation_passes_and_catches_sequences_that_see_each_other(model_and_batch, monkeypatch) -> None:
    model, batch = model_and_batch
    report = run_self_check(model, batch, vocab_size=model.get_base_model().config.vocab_size, packing=True)
    assert report.details["packing_isolation"].startswith("2 packed sequences")
    assert "packing_isolation" not in run_self_check(model, batch, vocab_size=384).details  # only when packing

    # positions that never restart: transformers then sees one long sequence, and the second
    # sequence attends to the first
    real_collate = d.PackingCollator.__call__

    def one_sequence(self, items):
        packed = real_collate(self, items)
        packed["position_ids"] = torch.arange(packed["input_ids"].shape[1])[None]
        return packed

    monkeypatch.setattr(d.PackingCollator, "__call__", one_sequence)
    # a base model that passed it already (a later trial of the sweep) reports it without running it
    checks = model_level_details(report)
    again = run_self_check(model, batch, vocab_size=384, packing=True, model_checks=checks)
    assert again.details["packing_isolation"] == f"cached: {report.details['packing_isolation']}"
    assert set(checks) == {*MODEL_LEVEL_CHECKS, "packing_isolation"}
    with pytest.raises(SelfCheckError, match="packing_isolation.*data.packing=false"):
        run_self_check(model, batch, vocab_size=384, packing=True)
