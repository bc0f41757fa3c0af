"""LoRA variants as config: DoRA, PiSSA / OLoRA / Gaussian init, rsLoRA and LoRA+, each in a
trial and in the `lora_variants` sweep; inits that move W into the adapter leave the cached
base model bit-identical for the next trial."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lora_sweep.cache import TrialCache
from lora_sweep.config import LoraSettings, ModelConfig, RunConfig, TrainConfig
from lora_sweep.embedded import TINY_LLAMA_DIR
from lora_sweep.lora import apply_lora, base_weights_to_restore, restore_base_weights
from lora_sweep.model import load_model
from lora_sweep.results import read_rows
from lora_sweep.train import make_optimizer
from lora_sweep.trial import run_trial
from tests.conftest import TINY, run_cli

CPU = torch.device("cpu")


def _cfg(compose_cfg, tmp_path: Path, *overrides: str) -> RunConfig:
    composed = compose_cfg(f"results_dir={tmp_path}", *TINY, *overrides)
    return RunConfig.from_mapping(OmegaConf.to_container(composed, resolve=True))


def _base_state(cache: TrialCache) -> dict[str, torch.Tensor]:
    [entry] = cache.models
    return {k: v.detach().clone() for k, v in entry.model.state_dict().items()}


@pytest.mark.parametrize(
    "overrides",
    [
        ["lora.use_dora=true"],
        ["lora.init=gaussian"],
        ["lora.init=pissa"],
        ["lora.init=olora"],
        ["lora.use_rslora=true"],
        ["train.loraplus_lr_ratio=16"],
    ],
    ids=["dora", "gaussian", "pissa", "olora", "rslora", "loraplus"],
)
def test_each_variant_trains_and_leaves_the_cached_base_model_as_it_was(
    compose_cfg, tmp_path: Path, overrides: list[str]
) -> None:
    cache = TrialCache()
    plain = _cfg(compose_cfg, tmp_path)
    reference = run_trial(plain, tmp_path / "plain", cache=cache)
    before = _base_state(cache)
    variant = run_trial(_cfg(compose_cfg, tmp_path, *overrides), tmp_path / "variant", cache=cache)
    assert variant.status == "success", variant.reason
    assert variant.metrics["final_loss"] != reference.metrics["final_loss"]  # the variant changed training
    after = _base_state(cache)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # the next trial on the cached model equals the one before the variant, to the bit
    again = run_trial(plain, tmp_path / "again", cache=cache)
    assert again.metrics == reference.metrics and again.cache_hit


def test_pissa_moves_the_principal_part_of_w_into_the_adapter_and_restore_undoes_it() -> None:
    model = load_model(TINY_LLAMA_DIR, ModelConfig(name="tiny_llama", path=None), CPU)
    settings = LoraSettings(r=4, alpha=4, target_modules=("q_proj",), init="pissa")
    saved = base_weights_to_restore(model, settings)
    assert sorted(saved) == [f"model.layers.{i}.self_attn.q_proj" for i in range(len(saved))] and saved
    original = saved["model.layers.0.self_attn.q_proj"].clone()
    peft_model = apply_lora(model, settings)
    layer = peft_model.get_base_model().model.layers[0].self_attn.q_proj
    residual = layer.base_layer.weight.detach()
    assert not torch.equal(residual, original)  # W - B A: PiSSA changed the base weight
    delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight) * layer.scaling["default"]
    torch.testing.assert_close(residual + delta, original, rtol=0, atol=1e-5)  # ... by exactly its adapter
    base = peft_model.unload()
    restore_base_weights(base, saved)
    assert torch.equal(base.model.layers[0].self_attn.q_proj.weight, original)
    assert base_weights_to_restore(model, LoraSettings(r=4, alpha=4, init="gaussian")) == {}


def test_dora_adds_a_trainable_magnitude_per_output() -> None:
    model = load_model(TINY_LLAMA_DIR, ModelConfig(name="tiny_llama", path=None), CPU)
    peft_model = apply_lora(model, LoraSettings(r=4, alpha=8, target_modules=("q_proj",), use_dora=True))
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector" in n for n in names) and any("lora_B" in n for n in names)


def test_loraplus_gives_the_b_matrices_ratio_times_the_learning_rate() -> None:
    model = load_model(TINY_LLAMA_DIR, ModelConfig(name="tiny_llama", path=None), CPU)
    peft_model = apply_lora(model, LoraSettings(r=4, alpha=8))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    cfg = TrainConfig(lr=1e-3, max_steps=10, batch_size=2, loraplus_lr_ratio=16.0, weight_decay=0.1)
    optimizer = make_optimizer(peft_model, params, cfg)
    ids = {id(p): n for n, p in peft_model.named_parameters()}
    by_lr: dict[float, set[str]] = {}
    for group in optimizer.param_groups:
        if group["params"]:
            by_lr.setdefault(group["lr"], set()).update(ids[id(p)].split(".")[-3] for p in group["params"])
    assert by_lr == {1e-3: {"lora_A"}, 16e-3: {"lora_B"}}
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(params)  # every tensor, once
    plain = make_optimizer(peft_model, params, TrainConfig(lr=1e-3, max_steps=10, batch_size=2))
    assert [g["lr"] for g in plain.param_groups] == [1e-3]


@pytest.mark.slow
def test_lora_variants_sweep_records_every_variant(tmp_path: Path) -> None:
    from tests.scale_helpers import SWEEP_TINY

    run = run_cli("-m", "sweep=lora_variants", f"results_dir={tmp_path}", "hydra.sweeper.n_trials=4", *SWEEP_TINY)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = read_rows(tmp_path / "lora_tuning_results.csv")
    assert len(rows) == 4 and "failed" not in set(rows["status"])
    for column in ("lora.use_dora", "lora.init", "lora.use_rslora", "train.loraplus_lr_ratio"):
        assert rows[column].notna().all(), column
    assert set(rows["lora.init"]) <= {"default", "gaussian", "pissa", "olora"}


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_saved_pissa_or_olora_adapter_is_a_plain_lora_right_on_the_original_base(init: str, tmp_path: Path) -> None:
    """Saved as trained, the adapter is only right after peft re-runs the init at load time,
    rewriting the loaded base weights (so it cannot share them with other adapters, and tools
    that do not re-run it get it wrong). A trial saves it through peft's conversion instead: a
    plain LoRA of rank 2r, the same outputs, the base weights untouched."""
    from peft import PeftModel

    from lora_sweep.adapters import save_adapter
    from lora_sweep.lora import initial_adapter_state

    settings = LoraSettings(r=4, alpha=8, target_modules=("q_proj", "v_proj"), init=init)
    model = load_model(TINY_LLAMA_DIR, ModelConfig(name="tiny_llama", path=None), CPU)
    original_q = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    peft_model = apply_lora(model, settings)
    initial = initial_adapter_state(peft_model, settings)
    assert initial and initial_adapter_state(peft_model, LoraSettings(r=4, alpha=8)) is None
    torch.manual_seed(0)
    with torch.no_grad():  # "training": move every LoRA weight away from its init
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.add_(0.05 * torch.randn_like(param))
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])
    peft_model.eval()
    with torch.no_grad():
        trained = peft_model(input_ids=ids).logits
    converted, _ = save_adapter(peft_model, tmp_path / "converted", initial=initial)
    as_trained, _ = save_adapter(peft_model, tmp_path / "as_trained")

    def load(adapter: Path) -> tuple[torch.Tensor, torch.Tensor]:
        base = load_model(TINY_LLAMA_DIR, ModelConfig(name="tiny_llama", path=None), CPU)
        loaded = PeftModel.from_pretrained(base, str(adapter)).eval()
        with torch.no_grad():
            logits = loaded(input_ids=ids).logits
        return logits, loaded.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight

    logits, base_q = load(converted)
    torch.testing.assert_close(logits, trained, rtol=0, atol=1e-4)
    assert torch.equal(base_q, original_q)  # the checkpoint's own weights, as loaded
    config = json.loads((converted / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True  # a plain LoRA of rank 2r
    assert json.loads((as_trained / "adapter_config.json").read_text())["init_lora_weights"] == init
    assert not torch.equal(load(as_trained)[1], original_q)  # what the unconverted one does at load
