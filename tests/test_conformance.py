"""One table runs every registered method on every tiny model through the same life cycle
(../shared/STYLE.md): default init keeps the output, and with randomized adapter weights merged equals
unmerged, unmerge restores the base, double merge is a no-op, disable gives the base, unload leaves no
adapter module, save/load is exact, and only adapter parameters train."""

import copy

import pytest
import torch

import deltatune as dt
from deltatune.core.layer import DeltaLayer, ModulesToSave
from tiny_models import tiny_bert_cls, tiny_convnet, tiny_gpt2, tiny_llama, tiny_t5

MODELS = {
    "llama": (tiny_llama, dict(target_modules="all-linear")),
    "gpt2": (tiny_gpt2, dict(target_modules=["c_attn", "c_fc"])),
    "bert": (tiny_bert_cls, dict(target_modules=["query", "value"], task_type="SEQ_CLS")),
    "t5": (tiny_t5, dict(target_modules=["q", "v", "wi"])),
    "convnet": (tiny_convnet, dict(target_modules=["conv2d", "conv1d", "fc"])),
}
METHODS = {  # name: (config class, its settings)
    "lora": (dt.LoraConfig, dict(r=4, lora_alpha=8)),
    "rslora": (dt.LoraConfig, dict(r=4, lora_alpha=8, use_rslora=True)),
    "dora": (dt.LoraConfig, dict(r=4, lora_alpha=8, use_dora=True)),
    "pissa": (dt.LoraConfig, dict(r=4, lora_alpha=8, init_lora_weights="pissa")),
    "olora": (dt.LoraConfig, dict(r=4, lora_alpha=8, init_lora_weights="olora")),
    "loha": (dt.LoHaConfig, dict(r=4, alpha=8)),
    "lokr": (dt.LoKrConfig, dict(r=4, alpha=8)),
    "oft": (dt.OFTConfig, dict(r=0, oft_block_size=4)),
    "boft": (dt.BOFTConfig, dict(boft_block_size=4)),
    "vera": (dt.VeraConfig, dict(r=4)),
    "adalora": (dt.AdaLoraConfig, dict(init_r=4, target_r=2, total_step=10, lora_alpha=8)),
    "relora": (dt.ReLoraConfig, dict(r=4, lora_alpha=8, relora_steps=3, relora_warmup_steps=1)),
    "ulora": (dt.ULoraConfig, dict(r=4, num_tasks=3, default_task=1)),
}
WEIGHT_INITS = {"pissa", "olora"}  # start from W's factors: the base keeps the residual
LINEAR_ONLY = WEIGHT_INITS | {"vera", "ulora"}  # no conv layers
NO_CONV1D = {"oft", "boft", "adalora"}  # the conv net's Conv1d
NO_GPT2 = {"loha", "lokr", "oft", "boft"}  # Transformers Conv1D: refused, as peft does
CASES = [(m, k) for m in MODELS for k in METHODS
         if not (m == "convnet" and k in LINEAR_ONLY | NO_CONV1D) and not (m == "gpt2" and k in NO_GPT2)]


def make_inputs(model_name: str) -> dict:
    g = torch.Generator().manual_seed(1)
    if model_name == "convnet":
        return {"pixels": torch.randn(3, 3, 8, 8, generator=g)}
    ids = torch.randint(0, 64, (3, 6), generator=g)
    if model_name == "t5":
        return {"input_ids": ids, "decoder_input_ids": ids[:, :4]}
    return {"input_ids": ids}


def output(model, inputs) -> torch.Tensor:
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def build(model_name: str, method: str):
    builder, target = MODELS[model_name]
    base = builder()
    reference = copy.deepcopy(base).requires_grad_(False)  # frozen, like the wrapped base (T5 numerics differ)
    config_class, settings = METHODS[method]
    return reference, dt.get_peft_model(base, config_class(**target, **settings))


@torch.no_grad()
def randomize(model) -> None:
    torch.manual_seed(5)
    for name, param in model.named_parameters():
        if param.requires_grad:
            param.add_(torch.randn_like(param) * 0.2)


def adapted_base_weights(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".base_layer." in n}


@pytest.mark.parametrize("model_name,method", CASES)
def test_life_cycle(model_name, method, tmp_path):
    torch.manual_seed(0)
    reference, model = build(model_name, method)
    inputs = make_inputs(model_name)
    base_out = output(reference, inputs)
    with torch.no_grad():
        torch.testing.assert_close(output(model, inputs), base_out, atol=2e-5, rtol=0)  # init keeps output

    randomize(model)
    with torch.no_grad():
        adapted = output(model, inputs)
        assert (adapted - base_out).abs().max() > 1e-3  # the adapter really changes the output
        weights = adapted_base_weights(model)
        with model.disable_adapter():
            disabled = output(model, inputs)
        plain = output(copy.deepcopy(model).unload(), inputs)
        torch.testing.assert_close(disabled, plain, atol=0, rtol=0)
        if method not in WEIGHT_INITS:
            torch.testing.assert_close(disabled, base_out, atol=0, rtol=0)

        model.merge_adapter()
        torch.testing.assert_close(output(model, inputs), adapted, atol=1e-5, rtol=1e-5)
        model.merge_adapter()  # merging twice is a no-op
        torch.testing.assert_close(output(model, inputs), adapted, atol=1e-5, rtol=1e-5)
        with model.disable_adapter():
            torch.testing.assert_close(output(model, inputs), disabled, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
        for name, weight in adapted_base_weights(model).items():
            torch.testing.assert_close(weight, weights[name], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(output(model, inputs), adapted, atol=1e-5, rtol=1e-5)

        model.save_pretrained(tmp_path)
        fresh = copy.deepcopy(reference)
        loaded = dt.DeltaModel.from_pretrained(fresh, tmp_path)
        torch.testing.assert_close(output(loaded, inputs), adapted, atol=1e-6, rtol=1e-6)

        merged = copy.deepcopy(model).merge_and_unload()
        assert not any(isinstance(m, (DeltaLayer, ModulesToSave)) for m in merged.modules())
        torch.testing.assert_close(output(merged, inputs), adapted, atol=1e-5, rtol=1e-5)
        unloaded = model.unload()
        assert not any(isinstance(m, (DeltaLayer, ModulesToSave)) for m in unloaded.modules())


@pytest.mark.parametrize("model_name,method", CASES)
def test_only_adapter_parameters_train(model_name, method):
    torch.manual_seed(0)
    _, model = build(model_name, method)
    randomize(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters." in n or ".copies." in n or n.startswith("model_adapters.")
                             for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    output(model.train(), make_inputs(model_name)).float().pow(2).mean().backward()
    optimizer.step()
    for name, param in model.named_parameters():
        if name in trainable:  # a gradient reached it (a tiny step may not move a float32 value near 1)
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert torch.equal(param, before[name]), name
