"""compose/: LoRA extraction, hotswap (also under torch.compile) and proxy-tuning, on tiny models."""

from types import SimpleNamespace

import pytest
import torch

import deltatune as dt
from deltatune.compose.extract import convert_to_lora, extract_lora, extract_lora_from_finetune
from deltatune.compose.hotswap import hotswap_adapter, prepare_model_for_hotswap
from deltatune.compose.proxy import ProxyTuningLogitsProcessor, VocabularyMismatchError, proxy_generate
from tiny_models import tiny_llama, token_batch


@torch.no_grad()
def random_lora(r=4, targets=("q_proj", "v_proj", "down_proj"), seed=0, **kwargs):
    torch.manual_seed(seed)
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets),
                                                          **kwargs))
    for name, param in model.named_parameters():
        if ".adapters." in name:
            param.copy_(torch.randn_like(param) * 0.3)
    return model.eval()


# ------------------------------------------------------------------------------------------ extraction
@torch.no_grad()
def test_extract_at_full_rank_is_exact_and_lower_rank_reports_the_svd_error():
    model = random_lora(r=4)
    ids = token_batch(2, 5)
    source = model(ids).logits
    report = extract_lora(model, "default", rank=4, new_adapter_name="same")
    assert report.overall_error < 1e-5 and max(report.layer_errors.values()) < 1e-5
    model.set_adapter("same")
    torch.testing.assert_close(model(ids).logits, source, atol=1e-5, rtol=1e-5)

    report = extract_lora(model, "default", rank=2, new_adapter_name="low")
    layer = dict(model.delta_layers())["model.layers.1.mlp.down_proj"]
    delta = layer.adapters["default"].delta_weight(layer.base_layer)
    s = torch.linalg.svdvals(delta).double()
    assert report.layer_errors["model.layers.1.mlp.down_proj"] == pytest.approx(
        (s[2:].square().sum() / s.square().sum()).sqrt().item(), rel=1e-4)
    u, _, vh = torch.linalg.svd(delta)
    best = u[:, :2] @ torch.diag(s[:2].float()) @ vh[:2]  # Eckart-Young: the best rank-2 approximation
    torch.testing.assert_close(layer.adapters["low"].delta_weight(layer.base_layer), best,
                               atol=1e-5, rtol=1e-4)
    assert 0 < report.overall_error < 1 and set(report.layer_errors) == {n for n, _ in model.delta_layers()}
    assert "relative Frobenius error" in str(report)


@torch.no_grad()
def test_extract_from_a_dora_adapter_carries_its_magnitude():
    model = random_lora(r=2, targets=("q_proj",), use_dora=True)
    ids = token_batch(2, 5)
    source = model(ids).logits
    extract_lora(model, "default", rank=16, new_adapter_name="plain")  # 16 = full rank of a 16x16 layer
    model.set_adapter("plain")
    assert not model.peft_config["plain"].use_dora
    torch.testing.assert_close(model(ids).logits, source, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_extract_from_a_full_finetune():
    base, tuned = tiny_llama(), tiny_llama()
    generator = torch.Generator().manual_seed(3)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"):
        weight = tuned.get_submodule(name).weight
        weight.add_(torch.randn(weight.shape[0], 2, generator=generator) @ torch.randn(2, weight.shape[1],
                                                                                       generator=generator))
    tuned.model.norm.weight.add_(0.1)  # a LoRA cannot carry this one
    model, report = extract_lora_from_finetune(base, tuned.state_dict(), rank=2)
    assert sorted(report.layer_errors) == ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"]
    assert report.overall_error < 1e-5 and report.skipped == ["model.norm.weight"]
    tuned.model.norm.weight.sub_(0.1)
    ids = token_batch(2, 5)
    torch.testing.assert_close(model(ids).logits, tuned(ids).logits, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_convert_writes_a_lora_that_peft_loads(tmp_path):
    import peft

    base_dir, adapter_dir, out_dir = tmp_path / "base", tmp_path / "adapter", tmp_path / "out"
    tiny_llama().save_pretrained(base_dir)
    model = random_lora(r=4, use_dora=True)
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    model.save_pretrained(str(adapter_dir))
    report = convert_to_lora(out_dir, rank=16, adapter=adapter_dir)
    assert report.overall_error < 1e-5 and (out_dir / "extraction_report.json").is_file()
    ids = token_batch(2, 5)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(out_dir)).eval()
    assert theirs.peft_config["default"].r == 16 and not theirs.peft_config["default"].use_dora
    torch.testing.assert_close(theirs(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(dt.DeltaConfigError, match="exactly one"):
        convert_to_lora(out_dir, rank=4)


@pytest.mark.parametrize("method", ["LOHA", "LOKR", "IA3"])
@torch.no_grad()
def test_extract_from_other_methods_at_full_rank_is_exact(method):
    from deltatune.core.config import config_class

    kwargs = dict(target_modules=["q_proj", "down_proj"])
    if method == "IA3":
        kwargs["feedforward_modules"] = ["down_proj"]
    model = dt.get_peft_model(tiny_llama(), config_class(method)(**kwargs))
    for name, param in model.named_parameters():
        if ".adapters." in name:
            param.copy_(torch.randn_like(param) * 0.3 + (1.0 if method == "IA3" else 0.0))
    ids = token_batch(2, 5)
    source = model(ids).logits
    report = extract_lora(model, "default", rank=32, new_adapter_name="lora")  # 32 >= min(out, in)
    model.set_adapter("lora")
    assert report.overall_error < 1e-5 and not report.skipped
    torch.testing.assert_close(model(ids).logits, source, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_extract_reports_what_a_lora_cannot_carry():
    from deltatune.methods.ia3 import IA3Config
    from tiny_models import tiny_gpt2

    gpt2 = tiny_gpt2()
    for block in gpt2.transformer.h:
        block.attn.c_attn.bias.normal_()  # zero at init; IA3 scales it along with the weight
    model = dt.get_peft_model(gpt2, IA3Config(target_modules=["c_attn"], feedforward_modules=[]))
    for name, param in model.named_parameters():
        if ".adapters." in name:
            param.add_(torch.randn_like(param) * 0.3)
    bias = model.model.transformer.h[0].attn.c_attn.base_layer.bias.detach().clone()
    report = extract_lora(model, "default", rank=4)
    assert report.skipped == ["transformer.h.0.attn.c_attn.bias", "transformer.h.1.attn.c_attn.bias"]
    assert torch.equal(model.model.transformer.h[0].attn.c_attn.base_layer.bias, bias)  # left unchanged


# ------------------------------------------------------------------------------------------ hotswap
def saved_lora(tmp_path, name, r, alpha, seed, targets=("q_proj", "v_proj", "down_proj")):
    model = random_lora(r=r, targets=targets, seed=seed)
    model.peft_config["default"].lora_alpha = alpha
    for _, layer in model.delta_layers():
        layer.adapters["default"].scaling = alpha / r
    model.save_pretrained(str(tmp_path / name))
    return tmp_path / name


def reference_logits(directory, ids):
    with torch.no_grad():
        return dt.DeltaModel.from_pretrained(tiny_llama(), str(directory))(ids).logits


@torch.no_grad()
def test_hotswap_equal_rank_replaces_weights_in_place(tmp_path):
    model = random_lora(r=4)
    layers_before = {n: id(layer) for n, layer in model.delta_layers()}
    params_before = [id(p) for p in model.parameters()]
    other = saved_lora(tmp_path, "other", r=4, alpha=3, seed=5)
    hotswap_adapter(model, other, "default")
    ids = token_batch(2, 5)
    torch.testing.assert_close(model(ids).logits, reference_logits(other, ids), atol=1e-5, rtol=1e-5)
    assert {n: id(layer) for n, layer in model.delta_layers()} == layers_before
    assert [id(p) for p in model.parameters()] == params_before


@torch.no_grad()
def test_hotswap_errors_leave_the_adapter_unchanged(tmp_path):
    model = random_lora(r=2)
    ids = token_batch(2, 5)
    before = model(ids).logits
    with pytest.raises(dt.DeltaConfigError, match="prepare_model_for_hotswap"):
        hotswap_adapter(model, saved_lora(tmp_path, "big", r=4, alpha=4, seed=1), "default")
    with pytest.raises(dt.DeltaConfigError, match="same layers"):
        hotswap_adapter(model, saved_lora(tmp_path, "elsewhere", r=2, alpha=4, seed=1, targets=("k_proj",)))
    with pytest.raises(dt.DeltaConfigError, match="use_dora"):
        hotswap_adapter(model, {}, config=dt.LoraConfig(r=2, use_dora=True, target_modules=["q_proj"]))
    torch.testing.assert_close(model(ids).logits, before, atol=0, rtol=0)
    model.merge_adapter()
    with pytest.raises(RuntimeError, match="unmerge"):
        hotswap_adapter(model, tmp_path / "big")


@torch.no_grad()
def test_fewer_targets_zero_the_rest_and_padded_model_saves_consistently(tmp_path):
    model = random_lora(r=2)
    ids = token_batch(2, 5)
    before = model(ids).logits
    prepare_model_for_hotswap(model, target_rank=6)
    torch.testing.assert_close(model(ids).logits, before, atol=1e-6, rtol=1e-6)
    model.save_pretrained(str(tmp_path / "padded"))
    torch.testing.assert_close(reference_logits(tmp_path / "padded", ids), before, atol=1e-5, rtol=1e-5)
    fewer = saved_lora(tmp_path, "fewer", r=3, alpha=5, seed=2, targets=("q_proj",))
    hotswap_adapter(model, fewer)
    torch.testing.assert_close(model(ids).logits, reference_logits(fewer, ids), atol=1e-5, rtol=1e-5)


def test_compiled_model_does_not_recompile_on_swap(tmp_path):
    torch._dynamo.reset()
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    model = random_lora(r=2)
    prepare_model_for_hotswap(model, target_rank=8)
    compiled = torch.compile(model, backend=counting_backend)
    ids = token_batch(2, 5)
    with torch.no_grad():
        compiled(ids)
        compiled_once = len(graphs)
        assert compiled_once > 0
        for name, r, alpha, seed in (("r4", 4, 8, 11), ("r8", 8, 2, 12), ("r2", 2, 16, 13)):
            directory = saved_lora(tmp_path, name, r=r, alpha=alpha, seed=seed)
            hotswap_adapter(compiled, directory, "default")
            torch.testing.assert_close(compiled(ids).logits, reference_logits(directory, ids),
                                       atol=1e-5, rtol=1e-5)
    assert len(graphs) == compiled_once  # no recompilation
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------ proxy-tuning
class BigramLM(torch.nn.Module):
    """Next-token logits read from a table by the last token: easy to check by hand."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(table, requires_grad=False)

    def forward(self, input_ids, attention_mask=None, use_cache=None, past_key_values=None, **_):
        return SimpleNamespace(logits=self.table[input_ids], past_key_values=None)


def test_processor_adds_expert_minus_anti_expert():
    expert = BigramLM(torch.tensor([[0.0, 5.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    anti = BigramLM(torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 0.0], [0.0, 0.0, 3.0]]))
    processor = ProxyTuningLogitsProcessor(expert, anti, alpha=0.5)
    scores = torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]])
    ids = torch.tensor([[2, 0], [0, 2]])  # last tokens 0 and 2
    # row 0: [1, 2, 3] + 0.5 * ([0, 5, 0] - [0, 1, 2]) = [1, 4, 2];  row 1: [1, 1, 1] + 0.5 * [0, 0, -3]
    expected = torch.tensor([[1.0, 4.0, 2.0], [1.0, 1.0, -0.5]])
    torch.testing.assert_close(processor(ids, scores), expected)


@torch.no_grad()
def test_generate_follows_base_plus_expert_minus_anti_expert():
    base, expert, anti = tiny_llama(0), tiny_llama(1), tiny_llama(2)
    ids = token_batch(2, 4)
    out = proxy_generate(base, expert, anti, ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    manual = ids
    for _ in range(6):  # the arithmetic, step by step, without caches
        logits = base(manual).logits[:, -1] + expert(manual).logits[:, -1] - anti(manual).logits[:, -1]
        manual = torch.cat([manual, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, manual)
    plain = base.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(proxy_generate(base, expert, anti, ids, alpha=0.0, max_new_tokens=6, do_sample=False,
                                      pad_token_id=0), plain)
    same = proxy_generate(base, expert, expert, ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(same, plain)  # expert == anti-expert: no steering


@torch.no_grad()
def test_left_padded_batch_equals_each_prompt_alone():
    base, expert, anti = tiny_llama(0), tiny_llama(1), tiny_llama(2)
    ids = token_batch(2, 5)
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    batch = proxy_generate(base, expert, anti, ids, attention_mask=mask, **kwargs)
    alone = proxy_generate(base, expert, anti, ids[:1, 2:], **kwargs)
    assert torch.equal(batch[0, 2:], alone[0])


def word_tokenizer(words):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(words)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token=words[0])))


def test_vocabulary_mismatch_is_an_error():
    base = tiny_llama(0)
    ids = token_batch(1, 3)
    same, other = word_tokenizer(["<unk>", "a", "b"]), word_tokenizer(["<unk>", "b", "a"])
    with pytest.raises(VocabularyMismatchError, match="expert tokenizer"):
        proxy_generate(base, base, base, ids, tokenizer=same, expert_tokenizer=other, max_new_tokens=1)
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = LlamaForCausalLM(LlamaConfig(vocab_size=80, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(VocabularyMismatchError, match="vocabulary sizes differ"):
        proxy_generate(base, wider, base, ids, max_new_tokens=1)
    processor = ProxyTuningLogitsProcessor(BigramLM(torch.zeros(4, 5)), BigramLM(torch.zeros(4, 5)))
    with pytest.raises(VocabularyMismatchError, match="gives 5"):
        processor(torch.tensor([[1]]), torch.zeros(1, 3))


# ------------------------------------------------------------------------------------------ mixed batches
@pytest.mark.parametrize("dense_below", [0, 10**9])  # the gather+bmm path, the dense masked path
@torch.no_grad()
def test_mixed_kernel_paths_equal_each_sample_alone_and_see_updates(dense_below, monkeypatch):
    from deltatune.methods import lora_ops

    monkeypatch.setattr(lora_ops, "DENSE_BELOW", dense_below)
    model = random_lora(r=2)
    model.add_adapter("other", dt.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    model.eval()
    ids = token_batch(4, 5)
    names = ["default", "other", "__base__", "other"]

    def alone():
        rows = []
        for sample, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    rows.append(model(ids[sample:sample + 1]).logits)
            else:
                model.set_adapter(name)
                rows.append(model(ids[sample:sample + 1]).logits)
        return torch.cat(rows)

    current = model(ids, adapter_names=names).logits
    torch.testing.assert_close(current, alone(), atol=1e-5, rtol=1e-5)
    layer = dict(model.delta_layers())["model.layers.0.self_attn.q_proj"]
    layer.adapters["other"].lora_B.weight.mul_(3)  # in place: the cached stack must be rebuilt
    updated = model(ids, adapter_names=names).logits
    torch.testing.assert_close(updated, alone(), atol=1e-5, rtol=1e-5)
    assert (updated - current).abs().max() > 1e-4
