"""Additive and selective methods (IA3, LN tuning, BitFit, bottleneck adapters, Child-Tuning): numbers
against an independent reference. The life cycle (init, merge, disable, unload, save/load, gradients,
counts) runs in the conformance table (tests/test_conformance.py). IA3 and LN tuning are checked against
the `peft` package (files both ways, same logits within 1e-5 in float32); the others against their
formulas written out here; mixed-adapter batches row by row.
"""

from __future__ import annotations

import json
import math

import peft
import pytest
import torch

import deltatune as dt
from deltatune.core.config import DeltaConfigError, config_class
from deltatune.core.layer import DeltaLayer
from tiny_models import tiny_bert_cls, tiny_gpt2, tiny_llama, tiny_t5, token_batch

TOL = 1e-5
MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert_cls, "t5": tiny_t5}


def config(peft_type: str, **kwargs):
    return config_class(peft_type)(**kwargs)


# (method id, model) -> config, for the mixed-batch test; T5's default feed-forward target is `wo`
# (PEFT_CASES covers it), `wi` here.
T5_IA3 = {"target_modules": ["k", "v", "wi"], "feedforward_modules": ["wi"]}
METHODS = {
    "ia3": lambda m: config("IA3", task_type="SEQ_CLS" if m == "bert" else None, **(T5_IA3 if m == "t5" else {})),
    "ia3_all_ff": lambda m: config("IA3",
                                   target_modules=".*(v_proj|c_attn|value|\\.v|wi|down_proj|c_fc|intermediate.dense)",
                                   feedforward_modules=".*(wi|down_proj|c_fc|intermediate.dense)"),
    "ln_tuning": lambda m: config("LN_TUNING"),
    "bitfit": lambda m: config("BITFIT", **BITFIT[m]),
    "houlsby": lambda m: config("BOTTLENECK", bottleneck_type="houlsby", bottleneck_size=4),
    "pfeiffer": lambda m: config("BOTTLENECK", bottleneck_type="pfeiffer", reduction_factor=4, non_linearity="gelu"),
    "parallel": lambda m: config("BOTTLENECK", bottleneck_type="parallel", bottleneck_size=4, scaling=2.0),
    "child_tuning_f": lambda m: config("CHILD_TUNING", **CHILD[m]),
}
CHILD = {
    "llama": dict(target_modules=["q_proj", "down_proj"]),
    "gpt2": dict(target_modules=["c_attn", "c_fc"]),
    "bert": dict(target_modules=["query", "value"], task_type="SEQ_CLS"),
    "t5": dict(target_modules=["q", "wi"]),
}
BITFIT = {  # models with biases train theirs; Llama and T5 have none, so BitFit adds them
    "llama": dict(add_missing_bias=True),
    "gpt2": dict(target_modules=["c_attn", "c_proj", "c_fc", "ln_1", "ln_2", "ln_f"]),
    "bert": dict(target_modules=["query", "key", "value", "dense", "LayerNorm"], task_type="SEQ_CLS"),
    "t5": dict(target_modules=["q", "v", "wi"], add_missing_bias=True),
}


def make_inputs(model_name: str) -> dict:
    ids = token_batch(batch=3, length=6)
    if model_name == "t5":
        return {"input_ids": ids, "decoder_input_ids": ids[:, :4]}
    return {"input_ids": ids}


@torch.no_grad()
def output(model, inputs) -> torch.Tensor:
    """Logits and the last hidden state, flattened: tiny BERT's classifier logits alone barely move."""
    out = model(**inputs, output_hidden_states=True)
    hidden = out.hidden_states if getattr(out, "hidden_states", None) is not None else out.decoder_hidden_states
    return torch.cat([out.logits.flatten(), hidden[-1].flatten()])


@torch.no_grad()
def randomize(model, seed: int = 5) -> None:
    """Move every trainable tensor away from its init, so a wrong formula shows in the logits."""
    generator = torch.Generator().manual_seed(seed)
    for _, param in model.named_parameters():
        if param.requires_grad:
            param.add_(torch.randn(param.shape, generator=generator) * 0.2)


@pytest.mark.parametrize("method", list(METHODS))
def test_mixed_batch_rows_match_each_adapter_alone(method):
    model = dt.get_peft_model(tiny_gpt2(), METHODS[method]("gpt2"), adapter_name="a")
    model.add_adapter("b", METHODS[method]("gpt2"))
    randomize(model)
    ids = token_batch(batch=3)
    order = ["b", "__base__", "a"]
    with torch.no_grad():
        mixed = model(ids, adapter_names=order).logits
        for row, name in enumerate(order):
            if name == "__base__":
                with model.disable_adapter():
                    alone = model(ids[row:row + 1]).logits
            else:
                model.set_adapter(name)
                alone = model(ids[row:row + 1]).logits
            torch.testing.assert_close(mixed[row:row + 1], alone, atol=TOL, rtol=TOL)
        assert (mixed[0] - mixed[2]).abs().max() > 1e-4


# ---------------------------------------------------------------------- against the peft package
PEFT_CASES = {
    "ia3_llama_default": (tiny_llama, "IA3", {}),
    "ia3_gpt2_default": (tiny_gpt2, "IA3", {}),
    "ia3_bert_seq_cls": (tiny_bert_cls, "IA3", {"task_type": "SEQ_CLS"}),
    "ia3_t5": (tiny_t5, "IA3", T5_IA3),
    "ia3_t5_default": (tiny_t5, "IA3", {}),  # k, v and the feed-forward `wo`, whose weight T5 reads itself
    "ia3_llama_regex": (tiny_llama, "IA3", {"target_modules": ".*(q_proj|up_proj|down_proj)",
                                            "feedforward_modules": ".*(up_proj|down_proj)"}),
    "ia3_gpt2_ff_c_fc": (tiny_gpt2, "IA3", {"target_modules": ["c_attn", "c_fc"], "feedforward_modules": ["c_fc"],
                                           "fan_in_fan_out": True}),
    "ln_llama_default": (tiny_llama, "LN_TUNING", {}),
    "ln_gpt2": (tiny_gpt2, "LN_TUNING", {"target_modules": ["ln_1", "ln_2", "ln_f"]}),
    "ln_bert": (tiny_bert_cls, "LN_TUNING", {"target_modules": ["LayerNorm"], "task_type": "SEQ_CLS"}),
    "ln_t5": (tiny_t5, "LN_TUNING", {"target_modules": ["layer_norm", "final_layer_norm"]}),
}
PEFT_CONFIGS = {"IA3": peft.IA3Config, "LN_TUNING": peft.LNTuningConfig}
DIRECTIONS = [pytest.param("deltatune", "peft", id="deltatune-to-peft"),
              pytest.param("peft", "deltatune", id="peft-to-deltatune")]


def peft_inputs(build) -> dict:
    return make_inputs("t5" if build is tiny_t5 else "other")


@torch.no_grad()
def randomize_adapter_tensors(model, seed: int = 0) -> None:
    """Random adapter tensors (and heads) in either library; scaling vectors and norm gains near 1."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if param.requires_grad or "ia3_l" in name or "ln_tuning_layers" in name:
            noise = torch.randn(param.shape, generator=generator) * 0.3
            param.copy_(1.0 + noise if ("ia3_l" in name or name.endswith("weight") and "ln_tuning" in name)
                        else noise)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("saver,loader", DIRECTIONS)
@pytest.mark.parametrize("case_id", list(PEFT_CASES))
def test_files_move_between_libraries_with_same_logits(case_id, saver, loader, tmp_path):
    build_model, peft_type, settings = PEFT_CASES[case_id]
    inputs = peft_inputs(build_model)
    if saver == "deltatune":
        trained = dt.get_peft_model(build_model(), config(peft_type, **settings))
    else:
        trained = peft.get_peft_model(build_model(), PEFT_CONFIGS[peft_type](**settings))
    randomize_adapter_tensors(trained)
    expected = output(trained, inputs)
    assert (expected - output(build_model(), inputs)).abs().max() > 1e-3
    trained.save_pretrained(str(tmp_path))
    if loader == "deltatune":
        loaded = dt.DeltaModel.from_pretrained(build_model(), str(tmp_path))
    else:
        loaded = peft.PeftModel.from_pretrained(build_model(), str(tmp_path))
    assert (output(loaded, inputs) - expected).abs().max().item() <= TOL
    if loader == "deltatune":  # and merged, the same logits again
        loaded.merge_adapter()
        assert (output(loaded, inputs) - expected).abs().max().item() <= TOL


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case_id", list(PEFT_CASES))
def test_same_keys_shapes_and_config_as_peft(case_id, tmp_path):
    from safetensors.torch import load_file

    build_model, peft_type, settings = PEFT_CASES[case_id]
    dt.get_peft_model(build_model(), config(peft_type, **settings)).save_pretrained(str(tmp_path / "ours"))
    peft.get_peft_model(build_model(), PEFT_CONFIGS[peft_type](**settings)).save_pretrained(str(tmp_path / "peft"))
    ours = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    theirs = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    ours_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(ours_cfg) <= set(theirs_cfg), set(ours_cfg) - set(theirs_cfg)
    assert ours_cfg["peft_type"] == theirs_cfg["peft_type"] == peft_type


# ---------------------------------------------------------------------- IA3 by hand
def test_ia3_formula_by_hand():
    model = dt.get_peft_model(tiny_llama(), config("IA3", target_modules=["v_proj", "down_proj"],
                                                   feedforward_modules=["down_proj"]))
    layer = model.model.model.layers[0]
    randomize(model)
    v, down = layer.self_attn.v_proj, layer.mlp.down_proj
    x_v, x_d = torch.randn(2, 16), torch.randn(2, 32)
    l_v, l_d = v.adapters["default"].ia3_l, down.adapters["default"].ia3_l
    assert l_v.shape == (16, 1) and l_d.shape == (1, 32)
    with torch.no_grad():
        torch.testing.assert_close(v(x_v), (x_v @ v.base_layer.weight.T) * l_v.T)
        torch.testing.assert_close(down(x_d), (x_d * l_d) @ down.base_layer.weight.T)


def test_ia3_feedforward_must_be_targeted():
    with pytest.raises(DeltaConfigError, match="feedforward_modules"):
        config("IA3", target_modules=["k_proj"], feedforward_modules=["down_proj"])


# ---------------------------------------------------------------------- BitFit by hand
def test_bitfit_formula_and_merge_into_bias_by_hand():
    model = dt.get_peft_model(tiny_llama(), config("BITFIT", target_modules=["q_proj", "down_proj"],
                                                   add_missing_bias=True))
    randomize(model)
    q = model.model.model.layers[0].self_attn.q_proj
    d = q.adapters["default"].bitfit_bias
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        torch.testing.assert_close(q(x), x @ q.base_layer.weight.T + d)
        assert q.base_layer.bias is None
        model.merge_adapter()
        torch.testing.assert_close(q.base_layer.bias, d)  # created at merge time
        torch.testing.assert_close(q(x), x @ q.base_layer.weight.T + d)
        model.unmerge_adapter()
        assert q.base_layer.bias is None and "bias" not in dict(q.base_layer.named_parameters())


def test_bitfit_two_adapters_switch_stack_and_mix():
    model = dt.get_peft_model(tiny_gpt2(), config("BITFIT"))
    model.add_adapter("other", config("BITFIT", target_modules=["c_fc"]))
    randomize(model)
    inputs = {"input_ids": token_batch(batch=2)}
    outs = {}
    for names in ("default", "other", ["default", "other"]):
        model.set_adapter(names)
        outs[str(names)] = output(model, inputs)
    layer = model.model.transformer.h[0].mlp.c_fc
    x = torch.randn(2, 16)
    with torch.no_grad():  # both active: both deltas add up
        expected = layer.base_layer(x) + layer.adapters["default"].bitfit_bias + layer.adapters["other"].bitfit_bias
        torch.testing.assert_close(layer(x), expected)
    mixed = model(**inputs, adapter_names=["other", "default"]).logits
    torch.testing.assert_close(mixed[0], model.set_adapter("other") or model(**inputs).logits[0])
    torch.testing.assert_close(mixed[1], model.set_adapter("default") or model(**inputs).logits[1])


def test_bitfit_refuses_a_layer_without_bias():
    with pytest.raises(DeltaConfigError, match="has no bias; set add_missing_bias=True"):
        dt.get_peft_model(tiny_llama(), config("BITFIT", target_modules=["q_proj"]))


# ---------------------------------------------------------------------- bottleneck adapters by hand
BLOCKS = {  # the default targets found on each architecture, by block name only
    "llama": (["self_attn", "mlp"], ["mlp"]),
    "gpt2": (["attn", "mlp"], ["mlp"]),
    "bert": (["attention.output", "output"], ["output"]),
    "t5": (["SelfAttention", "DenseReluDense"], ["DenseReluDense"]),
}


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("bottleneck_type", ["houlsby", "pfeiffer", "parallel"])
def test_bottleneck_default_placement(model_name, bottleneck_type):
    model = dt.get_peft_model(MODELS[model_name](), config("BOTTLENECK", bottleneck_type=bottleneck_type))
    wrapped = {n for n, m in model.model.named_modules() if isinstance(m, DeltaLayer)}
    houlsby, feedforward = BLOCKS[model_name]
    blocks = houlsby if bottleneck_type == "houlsby" else feedforward
    expected = {n for n, _ in MODELS[model_name]().named_modules()
                if any(n.endswith("." + b) for b in blocks)
                and not (bottleneck_type != "houlsby" and n.endswith("attention.output"))}
    assert wrapped == expected and wrapped


def bottleneck_by_hand(adapter, z):
    return adapter.adapter_up(torch.nn.functional.relu(adapter.adapter_down(z)))


def test_bottleneck_formulas_by_hand():
    model = dt.get_peft_model(tiny_llama(), config("BOTTLENECK", bottleneck_type="houlsby", bottleneck_size=3,
                                                   init_weights=False))
    model.add_adapter("par", config("BOTTLENECK", bottleneck_type="parallel", reduction_factor=8, scaling=0.5,
                                    init_weights=False))
    mlp = model.model.model.layers[0].mlp
    seq, par = mlp.adapters["default"], mlp.adapters["par"]
    assert seq.adapter_down.weight.shape == (3, 16) and seq.adapter_up.weight.shape == (16, 3)
    assert par.adapter_down.weight.shape == (2, 16)  # 16 // 8
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        h = mlp.base_layer(x)
        torch.testing.assert_close(mlp(x), h + bottleneck_by_hand(seq, h))
        model.set_adapter("par")
        torch.testing.assert_close(mlp(x), h + 0.5 * bottleneck_by_hand(par, x))
        model.set_adapter(["default", "par"])  # stacked: one after the other, in order
        first = h + bottleneck_by_hand(seq, h)
        torch.testing.assert_close(mlp(x), first + 0.5 * bottleneck_by_hand(par, x))
        # attention block returns a tuple and is called with keyword arguments: the adapter sees its output
        attn = model.model.model.layers[0].self_attn
        assert "default" in attn.adapters and "par" not in attn.adapters


def test_bottleneck_stack_order_matters():
    from deltatune.compose.fusion import stack_adapters

    model = dt.get_peft_model(tiny_gpt2(), config("BOTTLENECK", bottleneck_size=4, init_weights=False))
    model.add_adapter("task", config("BOTTLENECK", bottleneck_size=2, init_weights=False,
                                     non_linearity="tanh"))
    inputs = {"input_ids": token_batch()}
    stack_adapters(model, ["default", "task"])
    ab = output(model, inputs)
    stack_adapters(model, ["task", "default"])
    assert (output(model, inputs) - ab).abs().max() > 1e-4
    mlp = model.model.transformer.h[1].mlp
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        h = mlp.base_layer(x)
        lang = h + bottleneck_by_hand(mlp.adapters["default"], h)
        task = mlp.adapters["task"]
        expected = lang + task.adapter_up(torch.tanh(task.adapter_down(lang)))
        stack_adapters(model, ["default", "task"])
        torch.testing.assert_close(mlp(x), expected)


def test_bottleneck_mixed_batch_matches_each_sample_alone():
    model = dt.get_peft_model(tiny_llama(), config("BOTTLENECK", bottleneck_type="houlsby", init_weights=False,
                                                   bottleneck_size=4))
    model.add_adapter("par", config("BOTTLENECK", bottleneck_type="parallel", init_weights=False,
                                    bottleneck_size=4))
    ids = token_batch(batch=3)
    mixed = model(ids, adapter_names=["par", "__base__", "default"]).logits
    for row, name in enumerate(["par", "__base__", "default"]):
        if name == "__base__":
            with model.disable_adapter():
                alone = model(ids[row:row + 1]).logits
        else:
            model.set_adapter(name)
            alone = model(ids[row:row + 1]).logits
        torch.testing.assert_close(mixed[row:row + 1], alone, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("lora_first", [True, False])
def test_a_lora_inside_a_wrapped_block_keeps_its_peft_keys(lora_first, tmp_path):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    lora, block = dt.LoraConfig(target_modules=["down_proj"], init_lora_weights=False), config("BOTTLENECK")
    model = dt.get_peft_model(tiny_llama(), lora if lora_first else block, adapter_name="first")
    model.add_adapter("second", block if lora_first else lora)
    lora_name = "first" if lora_first else "second"
    model.set_adapter(lora_name)
    model.save_pretrained(str(tmp_path), selected_adapters=[lora_name])
    folder = tmp_path if lora_name == "default" else tmp_path / lora_name
    keys = set(load_file(str(folder / "adapter_model.safetensors")))
    assert keys == {f"base_model.model.model.layers.{i}.mlp.down_proj.lora_{ab}.weight" for i in (0, 1) for ab in "AB"}
    ids = token_batch()
    with torch.no_grad():
        reloaded = dt.DeltaModel.from_pretrained(tiny_llama(), str(folder))
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("field_name,value", [("bottleneck_type", "serial"), ("bottleneck_size", 0),
                                              ("reduction_factor", -1), ("non_linearity", "softsign")])
def test_bottleneck_config_errors_name_the_field(field_name, value):
    with pytest.raises(DeltaConfigError, match=field_name):
        config("BOTTLENECK", **{field_name: value})


# ---------------------------------------------------------------------- Child-Tuning by hand
def lm_batches(count: int = 3) -> list[dict]:
    return [{"input_ids": token_batch(batch=2, seed=s), "labels": token_batch(batch=2, seed=s)}
            for s in range(count)]


def test_child_tuning_f_masks_and_rescales_gradients():
    model = dt.get_peft_model(tiny_llama(), config("CHILD_TUNING", target_modules=["q_proj"], reserve_p=0.25))
    model.train()
    model(**lm_batches(1)[0]).loss.backward()
    deltas = [m.adapters["default"].child_delta for _, m in model.delta_layers()]
    grads = [d.grad.clone() for d in deltas]
    torch.manual_seed(7)
    expected = [g * torch.bernoulli(torch.full_like(g, 0.25)) / 0.25 for g in grads]
    torch.manual_seed(7)
    model.before_optimizer_step(0)
    for delta, want in zip(deltas, expected):
        torch.testing.assert_close(delta.grad, want)
    kept = sum((d.grad != 0).sum().item() for d in deltas) / sum(d.numel() for d in deltas)
    assert 0.15 < kept < 0.35


def fisher_by_hand(names: list[str], batches: list[dict]) -> dict[str, torch.Tensor]:
    """sum over batches of (dL/dW)^2 on the plain model: the reference for estimate_fisher_mask."""
    plain = tiny_llama().requires_grad_(False)
    weights = {n: m.weight.requires_grad_(True) for n, m in plain.named_modules() if n.split(".")[-1] in names}
    fisher = {n: torch.zeros_like(w) for n, w in weights.items()}
    for batch in batches:
        plain(**batch).loss.backward()
        for n, w in weights.items():
            fisher[n] += w.grad ** 2
            w.grad = None
    return fisher


def test_child_tuning_d_mask_from_fisher_and_sparse_file(tmp_path):
    from safetensors.torch import load_file

    from deltatune.methods.child_tuning import estimate_fisher_mask

    names = ["q_proj", "down_proj"]
    model = dt.get_peft_model(tiny_llama(), config("CHILD_TUNING", target_modules=names, child_tuning_mode="D",
                                                   reserve_p=0.1))
    model.train()
    model(**lm_batches(1)[0]).loss.backward()
    with pytest.raises(RuntimeError, match="call estimate_fisher_mask"):
        model.before_optimizer_step(0)
    model.zero_grad()

    masks = estimate_fisher_mask(model, lm_batches())
    fisher = fisher_by_hand(names, lm_batches())
    flat = torch.cat([f.flatten() for f in fisher.values()])
    threshold = flat.sort(descending=True).values[math.ceil(0.1 * flat.numel()) - 1]  # top 10%, rounded up
    for name, mask in masks.items():
        torch.testing.assert_close(mask, (fisher[name] >= threshold).float())
    kept = sum(m.sum().item() for m in masks.values())
    assert kept == pytest.approx(0.1 * flat.numel(), abs=2)
    assert all(p.grad is None for p in model.parameters())  # the estimate leaves no gradients behind

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step, batch in enumerate(lm_batches()):
        model(**batch).loss.backward()
        model.before_optimizer_step(step)
        optimizer.step()
        optimizer.zero_grad()
    moved = 0
    for name, layer in model.delta_layers():  # only the child network moved (a global threshold may
        delta = layer.adapters["default"].child_delta  # leave a matrix with little Fisher mass untouched)
        assert ((delta != 0) <= masks[name].bool()).all()
        moved += (delta != 0).sum().item()
    assert moved > 0.5 * kept

    model.save_pretrained(str(tmp_path))
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert all(k.endswith(("child_indices", "child_values")) for k in tensors)
    stored = sum(t.numel() for k, t in tensors.items() if k.endswith("child_values"))
    assert 0 < stored <= kept
    entries = json.loads((tmp_path / "adapter_config.json").read_text())["child_entries"]
    assert sum(entries.values()) == stored

    model.eval()
    inputs = {"input_ids": token_batch()}
    loaded = dt.DeltaModel.from_pretrained(tiny_llama(), str(tmp_path))
    torch.testing.assert_close(output(loaded, inputs), output(model, inputs), atol=0, rtol=0)
    for name, layer in loaded.delta_layers():  # expanded back to the same dense delta
        torch.testing.assert_close(layer.adapters["default"].child_delta,
                                   model.model.get_submodule(name).adapters["default"].child_delta)
    loaded.save_pretrained(str(tmp_path / "again"))  # saving a loaded adapter writes the same entries
    again = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert sorted(again) == sorted(tensors) and all(torch.equal(again[k], tensors[k]) for k in tensors)


def test_child_tuning_merge_formula_by_hand():
    model = dt.get_peft_model(tiny_gpt2(), config("CHILD_TUNING", target_modules=["c_fc"]))
    randomize(model)
    layer = model.model.transformer.h[0].mlp.c_fc
    x = torch.randn(2, 16)
    with torch.no_grad():
        delta = layer.adapters["default"].child_delta  # Conv1D layout (in, out), like W
        expected = x @ (layer.base_layer.weight + delta) + layer.base_layer.bias
        torch.testing.assert_close(layer(x), expected)
        model.merge_adapter()
        torch.testing.assert_close(layer.base_layer.weight, tiny_gpt2().transformer.h[0].mlp.c_fc.weight + delta)


@pytest.mark.parametrize("field_name,value", [("child_tuning_mode", "G"), ("reserve_p", 0), ("reserve_p", 1.5)])
def test_child_tuning_config_errors_name_the_field(field_name, value):
    with pytest.raises(DeltaConfigError, match=field_name):
        config("CHILD_TUNING", target_modules=["q_proj"], **{field_name: value})
