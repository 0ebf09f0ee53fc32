"""The adapter contract's decisions for BitFit, IA3, LN tuning, bottleneck, soft prompts, LLaMA-Adapter and
X-LoRA (issue 16): a declared protocol that misses a piece fails at registration; X-LoRA's experts are read
by io/ (the config only names them), before the model is touched, and never written into its file."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import deltatune as dt
from conformance_rows import xlora_experts
from deltatune.core.config import DeltaConfig, register_method, registered_methods
from deltatune.core.protocols import Additive, TakesOverForward
from deltatune.errors import AdapterContractError
from tiny_models import tiny_llama


class NoDelta(nn.Module, Additive):
    """Declares Additive but gives no delta_weight."""

    merge_rule = "additive"

    def forward(self, x, base_out, base, call, owns_base_out=False):
        return base_out

    def merge_refusal(self):
        return None


class NoCallState(nn.Module, TakesOverForward):
    """Declares TakesOverForward but gives no call_state (what a checkpointed recompute must see again)."""

    disk_prefix = ""

    def forward_model(self, model, *args, **kwargs):
        return model(*args, **kwargs)

    def generate_model(self, model, *args, **kwargs):
        return model.generate(*args, **kwargs)


@pytest.mark.parametrize("field_name,value,refusal", [
    ("adapter_types", (NoDelta,), "NoDelta declares Additive but does not define 'delta_weight'"),
    ("model_adapter_type", NoCallState,
     "NoCallState declares TakesOverForward but does not define 'call_state'")])
def test_a_declared_protocol_missing_a_piece_is_refused_at_registration(field_name, value, refusal):
    before = registered_methods()
    fields = {"peft_type": "INCOMPLETE", field_name: value, "targets_layers": field_name == "adapter_types"}
    config_cls = dataclass(type("Incomplete", (DeltaConfig,), fields))
    with pytest.raises(AdapterContractError, match=refusal):
        register_method(config_cls)
    assert registered_methods() == before  # nothing half-registered


def experts_copy(tmp_path) -> dict[str, str]:
    """The shared saved experts, copied so a test may spoil one."""
    return {name: shutil.copytree(path, tmp_path / name) for name, path in xlora_experts().items()}


def test_xlora_experts_not_read_are_refused_before_the_model_is_touched():
    """The public DeltaModel(...) reads a hand-built config's experts itself (the api layer calls io), as
    get_peft_model does; core's own inject, which reads no file, refuses a config whose experts nobody read: one
    clear error naming them, and the model is left as it was."""
    ids, experts = torch.randint(0, 64, (1, 5)), xlora_experts()  # saved once per session (draws numbers)
    torch.manual_seed(0)
    built = dt.DeltaModel(tiny_llama(), dt.XLoraConfig(adapters=experts, hidden_size=16))
    torch.manual_seed(0)
    from_peft_entry = dt.get_peft_model(tiny_llama(), dt.XLoraConfig(adapters=experts, hidden_size=16))
    torch.testing.assert_close(built(ids).logits, from_peft_entry(ids).logits, rtol=0, atol=0)
    plain = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    with pytest.raises(dt.DeltaConfigError, match="not read") as err:
        plain.inject("x", dt.XLoraConfig(adapters=xlora_experts(), hidden_size=16))
    assert xlora_experts()["0"] in str(err.value)
    assert list(plain.peft_config) == ["default"]
    assert plain.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in plain.state_dict().items())


def test_xlora_expert_files_are_read_by_io_and_errors_name_the_expert(tmp_path):
    experts = experts_copy(tmp_path)
    (tmp_path / "1" / "adapter_model.safetensors").unlink()
    with pytest.raises(dt.DeltaConfigError, match=r"adapter '1' in .*adapter_model.safetensors"):
        dt.get_peft_model(tiny_llama(), dt.XLoraConfig(adapters=experts, hidden_size=16))

    dora = tmp_path / "dora"
    dora_config = dt.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)
    dt.get_peft_model(tiny_llama(), dora_config).save_pretrained(str(dora))
    with pytest.raises(dt.DeltaConfigError, match="DoRA"):
        dt.get_peft_model(tiny_llama(), dt.XLoraConfig(adapters={"0": str(dora)}, hidden_size=16))


def test_xlora_file_holds_the_expert_directories_only(tmp_path):
    """What io/ read stays on the config object: the saved config names the experts (as `peft` writes it),
    the weights file holds the classifier alone, and a reload reads the experts again: same outputs."""
    model = dt.get_peft_model(tiny_llama(), dt.XLoraConfig(adapters=xlora_experts(), hidden_size=16,
                                                           xlora_depth=2, xlora_size=8)).eval()
    adapted = ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")  # by either expert
    assert model.peft_config["default"].target_modules == sorted(f"model.layers.{i}.{m}" for i in (0, 1)
                                                                 for m in adapted)
    with torch.no_grad():
        for param in model.model_adapters["default"].parameters():
            param.copy_(torch.randn_like(param))
    model.save_pretrained(str(tmp_path / "x"))
    saved = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    assert saved["adapters"] == xlora_experts()
    assert set(saved) == set(model.peft_config["default"].to_dict())  # no runtime-only field written

    ids = torch.tensor([[3, 5, 7, 9]])
    loaded = dt.DeltaModel.from_pretrained(tiny_llama(), str(tmp_path / "x")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, use_cache=False).logits,
                                   model(input_ids=ids, use_cache=False).logits, rtol=0, atol=0)
