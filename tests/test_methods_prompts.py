"""Soft-prompt methods (prompt tuning, P-tuning, prefix tuning, LLaMA-Adapter) against the `peft` package
and against invariants computed without it.

One table of cases (tiny model, method, settings written the same for both libraries) runs through the
same checks: files move both ways with the same logits (max abs diff <= 1e-5, float32); the same
weights give the same logits and loss as `peft`; greedy generation equals stepwise greedy decoding by full
forward passes (tests/invariants.py), and `peft`'s where `peft` itself keeps that invariant; save/load is
exact; the saved keys, shapes and config fields match `peft`'s; only the prompt parameters train; merge is
refused.

Where `peft` cannot run a case on the installed Transformers (it raises; prefix tuning on BERT with
Transformers 5.2x, whose BertModel takes its cache as `cache`), the case is checked against a reference
computed by hand instead (`bert_prefix_by_hand`), never skipped. Batches compared with `peft` pad on the
right: on a left-padded row `peft` puts the virtual tokens before the padding, which makes the row's result
depend on its padding (tests/test_padding_invariance.py holds ours to the invariant instead).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import deltatune
from deltatune.core.config import DeltaConfigError
from deltatune.core.layer import MergeError
from deltatune.methods.llama_adapter import AdaptionPromptConfig
from deltatune.methods.prefix import PrefixTuningConfig
from deltatune.methods.prompt import PromptTuningConfig
from deltatune.methods.ptuning import PromptEncoderConfig
from invariants import assert_generate_matches_stepwise, greedy_stepwise
from tiny_models import VOCAB, tiny_bert_cls, tiny_gpt2, tiny_llama, tiny_t5, token_batch

TOL = 1e-5
OURS = {"PROMPT_TUNING": PromptTuningConfig, "P_TUNING": PromptEncoderConfig,
        "PREFIX_TUNING": PrefixTuningConfig, "ADAPTION_PROMPT": AdaptionPromptConfig}
THEIRS = {"PROMPT_TUNING": peft.PromptTuningConfig, "P_TUNING": peft.PromptEncoderConfig,
          "PREFIX_TUNING": peft.PrefixTuningConfig, "ADAPTION_PROMPT": peft.AdaptionPromptConfig}


def tiny_llama_gqa(seed: int = 0) -> nn.Module:
    """tiny_llama with grouped-query attention: 4 query heads share 2 key/value heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).float().eval()


@dataclass
class Case:
    build: object
    method: str
    settings: dict

    @property
    def task(self) -> str:
        return self.settings["task_type"]


def prompt(task: str = "CAUSAL_LM", **extra) -> dict:
    return {"task_type": task, "num_virtual_tokens": 3, **extra}


def adaption(layers: int, length: int = 3) -> dict:
    return {"task_type": "CAUSAL_LM", "adapter_len": length, "adapter_layers": layers}


CASES = {
    "prompt_llama": Case(tiny_llama, "PROMPT_TUNING", prompt()),
    "prompt_gpt2": Case(tiny_gpt2, "PROMPT_TUNING", prompt(prompt_tuning_init="SAMPLE_VOCAB")),
    "prompt_bert_seq_cls": Case(tiny_bert_cls, "PROMPT_TUNING", prompt("SEQ_CLS")),
    "prompt_t5": Case(tiny_t5, "PROMPT_TUNING", prompt("SEQ_2_SEQ_LM")),
    "ptuning_mlp_llama": Case(tiny_llama, "P_TUNING", prompt(encoder_hidden_size=8)),
    "ptuning_lstm_gpt2": Case(tiny_gpt2, "P_TUNING", prompt(encoder_reparameterization_type="LSTM",
                                                             encoder_hidden_size=8)),
    "ptuning_bert_seq_cls": Case(tiny_bert_cls, "P_TUNING", prompt("SEQ_CLS")),
    "prefix_llama": Case(tiny_llama, "PREFIX_TUNING", prompt()),
    "prefix_llama_gqa": Case(tiny_llama_gqa, "PREFIX_TUNING", prompt()),
    "prefix_projection_llama": Case(tiny_llama, "PREFIX_TUNING", prompt(prefix_projection=True,
                                                                        encoder_hidden_size=8)),
    "prefix_gpt2": Case(tiny_gpt2, "PREFIX_TUNING", prompt()),
    "prefix_projection_gpt2": Case(tiny_gpt2, "PREFIX_TUNING", prompt(prefix_projection=True)),
    "prefix_bert_seq_cls": Case(tiny_bert_cls, "PREFIX_TUNING", prompt("SEQ_CLS")),
    "llama_adapter": Case(tiny_llama, "ADAPTION_PROMPT", adaption(layers=1)),
    "llama_adapter_gqa": Case(tiny_llama_gqa, "ADAPTION_PROMPT", adaption(layers=2)),
    "llama_adapter_gpt2": Case(tiny_gpt2, "ADAPTION_PROMPT", adaption(layers=2)),
}
CASE_IDS = list(CASES)
GENERATE_IDS = [k for k in CASE_IDS if CASES[k].task in ("CAUSAL_LM", "SEQ_2_SEQ_LM")]
DIRECTIONS = [pytest.param("deltatune", "peft", id="to-peft"),
              pytest.param("peft", "deltatune", id="from-peft")]


def file_case_ids() -> list:
    return list(CASE_IDS)


# ---------------------------------------------------------------------- the two libraries, one interface
def wrap(library: str, case: Case, **extra) -> nn.Module:
    settings = {**case.settings, **extra}
    if library == "deltatune":
        return deltatune.get_peft_model(case.build(), OURS[case.method](**settings))
    return peft.get_peft_model(case.build(), THEIRS[case.method](**settings))


def load(library: str, case: Case, path: Path, **kwargs) -> nn.Module:
    if library == "deltatune":
        return deltatune.DeltaModel.from_pretrained(case.build(), str(path), **kwargs)
    return peft.PeftModel.from_pretrained(case.build(), str(path), **kwargs)


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0) -> None:
    """Random trainable weights (with an encoder in use, `prompt_embeddings` only mirrors its output
    and does not train)."""
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        if param.requires_grad:
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def inputs(case: Case, labels: bool = False, side: str = "left") -> dict:
    """3 rows of 6 tokens, the first padded by 2 on `side`."""
    ids = token_batch(batch=3, length=6)
    mask = torch.ones_like(ids)
    mask[0, slice(0, 2) if side == "left" else slice(4, 6)] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    if case.task == "SEQ_2_SEQ_LM":
        batch["decoder_input_ids"] = ids[:, :4]
    if labels:
        by_task = {"SEQ_CLS": torch.tensor([0, 2, 1]), "SEQ_2_SEQ_LM": ids[:, :4].contiguous()}
        batch["labels"] = by_task.get(case.task, ids)
    return batch


def run(model: nn.Module, batch: dict):
    with torch.no_grad():
        return model(**batch)


# `peft`'s own refusal where it cannot run a case on the installed Transformers (see the module docstring).
PEFT_CANNOT_RUN = "Model does not support past key values which are required for prefix tuning"
PEFT_CANNOT_RUN_CASES = {"prefix_bert_seq_cls"}


def run_peft(case_id: str, model: nn.Module, batch: dict):
    """peft's outputs, or None where peft raises PEFT_CANNOT_RUN (only for the cases known to need it)."""
    try:
        return run(model, batch)
    except ValueError as error:
        if PEFT_CANNOT_RUN not in str(error) or case_id not in PEFT_CANNOT_RUN_CASES:
            raise
        return None


@torch.no_grad()
def bert_prefix_by_hand(model: nn.Module, table: torch.Tensor,
                        batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """BertForSequenceClassification with prefix tuning, written from the weights with plain torch ops: in
    every layer, attention over [prefix keys; the tokens' keys] and [prefix values; the tokens' values], the
    prefix always attended to; the tokens numbered after the T prefix positions (as Transformers numbers
    tokens after a cache). `table` (T, N*2*D): for each layer its keys then its values. Returns logits and
    the cross-entropy loss."""
    bert, config = model.bert, model.config
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    tokens, (size, length) = table.shape[0], ids.shape
    heads, dim = config.num_attention_heads, config.hidden_size
    head_dim = dim // heads
    prefix = table.view(tokens, config.num_hidden_layers, 2, heads, head_dim)  # (T, N, 2, H, Dh)
    positions = torch.arange(tokens, tokens + length)
    emb = bert.embeddings
    hidden = emb.word_embeddings(ids) + emb.position_embeddings(positions) + emb.token_type_embeddings(
        torch.zeros_like(ids))
    hidden = emb.LayerNorm(hidden)  # (B, L, D)
    visible = torch.cat([torch.ones(size, tokens, dtype=mask.dtype), mask], dim=1)  # (B, T + L)
    bias = (1.0 - visible[:, None, None, :].float()) * torch.finfo(torch.float32).min

    def split(x):  # (B, L, D) -> (B, H, L, Dh)
        return x.view(size, -1, heads, head_dim).transpose(1, 2)

    for index, layer in enumerate(bert.encoder.layer):
        attention = layer.attention.self
        keys = torch.cat([prefix[:, index, 0].permute(1, 0, 2).expand(size, -1, -1, -1),
                          split(attention.key(hidden))], dim=2)  # (B, H, T + L, Dh)
        values = torch.cat([prefix[:, index, 1].permute(1, 0, 2).expand(size, -1, -1, -1),
                            split(attention.value(hidden))], dim=2)
        scores = split(attention.query(hidden)) @ keys.transpose(2, 3) / head_dim ** 0.5 + bias
        context = (scores.softmax(-1) @ values).transpose(1, 2).reshape(size, length, dim)
        hidden = layer.attention.output.LayerNorm(layer.attention.output.dense(context) + hidden)
        inner = torch.nn.functional.gelu(layer.intermediate.dense(hidden))
        hidden = layer.output.LayerNorm(layer.output.dense(inner) + hidden)
    logits = model.classifier(torch.tanh(bert.pooler.dense(hidden[:, 0])))
    return logits, torch.nn.functional.cross_entropy(logits, labels)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def copy_prompt_weights(ours: nn.Module, theirs: nn.Module) -> None:
    """Our trainable prompt module's weights into peft's prompt encoder (same local names)."""
    module = ours.model_adapters["default"]
    if isinstance(ours.peft_config["default"], AdaptionPromptConfig):  # peft keeps them in the blocks
        with torch.no_grad():
            for key, value in module.state_dict().items():
                theirs.get_parameter(module.disk_prefix + key).copy_(value)
        return
    if module.encoder is None:  # a plain table
        state = {"embedding.weight": module.prompt_embeddings}
    else:
        state = module.encoder.state_dict()
    theirs.prompt_encoder["default"].load_state_dict(state)
    for (_, ours_param), (_, theirs_param) in zip(heads(ours), heads(theirs)):
        with torch.no_grad():
            theirs_param.copy_(ours_param)


def heads(model: nn.Module) -> list:
    return [(n, p) for n, p in model.named_parameters() if "classifier" in n and p.requires_grad]


# ---------------------------------------------------------------------- numbers against peft
def expected_outputs(case_id: str, theirs: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's logits and loss; by hand where peft cannot run the case (from peft's own prefix table)."""
    out = run_peft(case_id, theirs, batch)
    if out is not None:
        return out.logits, out.loss
    table = theirs.prompt_encoder["default"].embedding.weight
    return bert_prefix_by_hand(theirs.base_model, table, batch)


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_same_weights_same_logits_and_loss_as_peft(case_id):
    case = CASES[case_id]
    ours, theirs = wrap("deltatune", case), wrap("peft", case)
    randomize(ours)
    copy_prompt_weights(ours, theirs)
    batch = inputs(case, labels=True, side="right")
    got = run(ours, batch)
    logits, loss = expected_outputs(case_id, theirs, batch)
    assert max_diff(got.logits, logits) <= TOL
    assert abs(got.loss.item() - loss.item()) <= TOL
    base = run(case.build(), batch).logits
    assert max_diff(got.logits[..., -base.shape[-2]:, :] if base.dim() == 3 else got.logits, base) > 1e-3, \
        "the prompt must change the output"


@pytest.mark.parametrize("saver, loader", DIRECTIONS)
@pytest.mark.parametrize("case_id", file_case_ids())
def test_adapter_file_moves_between_libraries_with_same_logits(case_id, saver, loader, tmp_path):
    case = CASES[case_id]
    trained = wrap(saver, case)
    randomize(trained)
    batch = inputs(case, labels=True, side="right")
    trained.save_pretrained(str(tmp_path))
    loaded = load(loader, case, tmp_path)
    ours, theirs = (trained, loaded) if saver == "deltatune" else (loaded, trained)
    assert max_diff(run(ours, batch).logits, expected_outputs(case_id, theirs, batch)[0]) <= TOL


@pytest.mark.parametrize("case_id", GENERATE_IDS)
def test_greedy_generation_matches_stepwise_forward_and_peft(case_id, tmp_path):
    """Ours equals stepwise greedy forward (left-padded batch too); `peft`'s generate where `peft` keeps
    that invariant itself (on Transformers 5.2x its soft-prompt generate does not: it is not compared)."""
    case = CASES[case_id]
    ours = wrap("deltatune", case)
    randomize(ours)
    ours.eval().save_pretrained(str(tmp_path))
    theirs = load("peft", case, tmp_path)
    # Decoder-only models generate after left padding (right padding confuses Transformers' own numbering).
    for side in ("left", "right") if case.task == "SEQ_2_SEQ_LM" else ("left",):
        batch = inputs(case, side=side)
        assert_generate_matches_stepwise(ours, batch["input_ids"], batch["attention_mask"], 6)
    ids = token_batch(batch=3, length=6)  # no padding: where both libraries number tokens alike
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, "output_logits": True,
                "return_dict_in_generate": True}
    with torch.no_grad():
        got = ours.generate(input_ids=ids, **settings)
        theirs_generated = theirs.generate(input_ids=ids, **settings).sequences.tolist()
        if theirs_generated == greedy_stepwise(theirs, ids, None, 6)[0].tolist():
            assert got.sequences.tolist() == theirs_generated
        with ours.disable_adapter():
            base = case.build().generate(input_ids=ids, **settings)
            assert ours.generate(input_ids=ids, **settings).sequences.tolist() == base.sequences.tolist()
        assert max_diff(got.logits[0], base.logits[0]) > 1e-3, "the adapter must change what is generated"


# ---------------------------------------------------------------------- files
@pytest.mark.parametrize("case_id", file_case_ids())
def test_saved_keys_shapes_and_config_match_peft(case_id, tmp_path):
    case = CASES[case_id]
    saved = {}
    for library in ("deltatune", "peft"):
        wrap(library, case).save_pretrained(str(tmp_path / library))
        tensors = load_file(str(tmp_path / library / "adapter_model.safetensors"))
        config = json.loads((tmp_path / library / "adapter_config.json").read_text())
        saved[library] = ({k: tuple(v.shape) for k, v in tensors.items()}, config)
    (ours, ours_config), (theirs, theirs_config) = saved["deltatune"], saved["peft"]
    assert ours == theirs
    assert set(ours_config) <= set(theirs_config), set(ours_config) - set(theirs_config)
    for key, value in ours_config.items():
        if key != "modules_to_save":  # peft lists the task heads twice
            assert value == theirs_config[key], key
    THEIRS[case.method].from_pretrained(str(tmp_path / "deltatune"))  # peft's own parser takes our file


@pytest.mark.parametrize("is_trainable", [False, True])
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_save_load_is_exact(case_id, is_trainable, tmp_path):
    case = CASES[case_id]
    model = wrap("deltatune", case)
    randomize(model)
    batch = inputs(case)
    expected = run(model, batch).logits
    model.save_pretrained(str(tmp_path))
    loaded = load("deltatune", case, tmp_path, is_trainable=is_trainable)
    assert torch.equal(run(loaded, batch).logits, expected)
    if is_trainable:  # the loaded prompt (and head) train, nothing else
        saved = loaded.model_adapters["default"].state_dict(keep_vars=True)
        assert all(p.requires_grad for p in saved.values())
        owners = {n.split(".")[0] for n, p in loaded.named_parameters() if p.requires_grad}
        assert owners <= {"model_adapters", "model"}
        assert all("classifier" in n for n, p in loaded.model.named_parameters() if p.requires_grad)


# ---------------------------------------------------------------------- training and life cycle
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_only_prompt_parameters_train(case_id):
    case = CASES[case_id]
    model = wrap("deltatune", case).train()
    frozen = {n: p.detach().clone() for n, p in model.model.named_parameters() if "classifier" not in n}
    prompt_before = {n: p.detach().clone() for n, p in model.model_adapters.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):  # LLaMA-Adapter's prompt gets gradient once its zero-init gate has moved
        optimizer.zero_grad()
        model(**inputs(case, labels=True)).loss.backward()
        optimizer.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.model.named_parameters() if n in frozen)
    changed = [n for n, p in model.model_adapters.named_parameters() if not torch.equal(p, prompt_before[n])]
    trainable = [n for n, p in model.model_adapters.named_parameters() if p.requires_grad]
    assert changed and sorted(changed) == sorted(trainable), "every trainable prompt parameter trains"
    theirs = wrap("peft", case)
    assert model.get_nb_trainable_parameters()[0] == theirs.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_disable_gives_base_and_merge_is_refused(case_id):
    case = CASES[case_id]
    model = wrap("deltatune", case)
    randomize(model)
    batch = inputs(case)
    with model.disable_adapter():
        base = run(model, batch).logits
    assert torch.equal(base, run(case.build(), batch).logits)
    with pytest.raises(MergeError, match="cannot be merged"):
        model.merge_adapter()
    with pytest.raises(MergeError, match="cannot be merged"):
        model.merge_and_unload()
    plain = model.unload()
    assert not any("adapters" in n for n, _ in plain.named_modules())


# ---------------------------------------------------------------------- prompt tuning init
def word_tokenizer():
    """A whitespace word-level tokenizer over the tiny vocabulary, built in memory (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0")


@pytest.mark.parametrize("num_virtual_tokens, expected_ids", [(2, [5, 9]), (7, [5, 9, 3, 5, 9, 3, 5])])
def test_text_init_repeats_or_cuts_the_text_like_peft(num_virtual_tokens, expected_ids, tmp_path):
    tokenizer = word_tokenizer()
    tokenizer.save_pretrained(str(tmp_path))
    settings = {"task_type": "CAUSAL_LM", "num_virtual_tokens": num_virtual_tokens,
                "prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "w5 w9 w3"}
    ours = deltatune.get_peft_model(tiny_llama(), PromptTuningConfig(**settings,
                                                                     tokenizer_name_or_path=tokenizer))
    by_path = deltatune.get_peft_model(tiny_llama(), PromptTuningConfig(**settings,
                                                                       tokenizer_name_or_path=str(tmp_path)))
    theirs = peft.get_peft_model(tiny_llama(), peft.PromptTuningConfig(**settings,
                                                                       tokenizer_name_or_path=str(tmp_path)))
    table = ours.model_adapters["default"].prompt_embeddings
    expected = tiny_llama().get_input_embeddings().weight[expected_ids]
    assert torch.equal(table, expected)
    assert torch.equal(by_path.model_adapters["default"].prompt_embeddings, expected)
    assert torch.equal(theirs.prompt_encoder["default"].embedding.weight, expected)
    ours.save_pretrained(str(tmp_path / "saved"))  # the tokenizer object is written by name, not pickled
    assert "tokenizer_name_or_path" in json.loads((tmp_path / "saved" / "adapter_config.json").read_text())


def test_sample_vocab_init_takes_rows_of_the_embedding_matrix():
    torch.manual_seed(0)
    model = deltatune.get_peft_model(tiny_llama(), PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=5, prompt_tuning_init="SAMPLE_VOCAB"))
    vocabulary = tiny_llama().get_input_embeddings().weight
    for row in model.model_adapters["default"].prompt_embeddings:
        assert (vocabulary == row).all(dim=1).any()


# ---------------------------------------------------------------------- config errors name the field
BAD_CONFIGS = [
    (PromptTuningConfig, {"task_type": "CAUSAL_LM", "num_virtual_tokens": 0}, "num_virtual_tokens"),
    (PromptTuningConfig, {"num_virtual_tokens": 3}, "task_type"),
    (PromptTuningConfig, {"task_type": "TOKEN_CLS", "num_virtual_tokens": 3}, "task_type"),
    (PromptTuningConfig, {"task_type": "CAUSAL_LM", "num_virtual_tokens": 3, "prompt_tuning_init": "ZEROS"},
     "prompt_tuning_init"),
    (PromptTuningConfig, {"task_type": "CAUSAL_LM", "num_virtual_tokens": 3, "prompt_tuning_init": "TEXT",
                          "prompt_tuning_init_text": "hi"}, "tokenizer_name_or_path"),
    (PromptTuningConfig, {"task_type": "CAUSAL_LM", "num_virtual_tokens": 3, "target_modules": ["q_proj"]},
     "target_modules"),
    (PromptEncoderConfig, {"task_type": "CAUSAL_LM", "num_virtual_tokens": 3,
                           "encoder_reparameterization_type": "GRU"}, "encoder_reparameterization_type"),
    (PromptEncoderConfig, {"task_type": "CAUSAL_LM", "num_virtual_tokens": 3, "encoder_dropout": 1.5},
     "encoder_dropout"),
    (PrefixTuningConfig, {"task_type": "SEQ_2_SEQ_LM", "num_virtual_tokens": 3}, "task_type"),
    (AdaptionPromptConfig, {"adapter_len": 0, "adapter_layers": 1}, "adapter_len"),
    (AdaptionPromptConfig, {"adapter_len": 2}, "adapter_layers"),
    (AdaptionPromptConfig, {"adapter_len": 2, "adapter_layers": 1, "target_modules": ["q_proj"]},
     "target_modules"),
    (AdaptionPromptConfig, {"adapter_len": 2, "adapter_layers": 1, "task_type": "SEQ_CLS"}, "task_type"),
    (PrefixTuningConfig, {"task_type": "CAUSAL_LM", "num_virtual_tokens": 3, "init_weights": "ones"},
     "init_weights"),
    (PrefixTuningConfig, {"task_type": "CAUSAL_LM", "num_virtual_tokens": 3, "prefix_projection": "yes"},
     "prefix_projection"),
]


@pytest.mark.parametrize("config_cls, settings, field", BAD_CONFIGS)
def test_bad_config_names_the_field(config_cls, settings, field):
    with pytest.raises(DeltaConfigError, match=field):
        config_cls(**settings)


@pytest.mark.parametrize("build, settings, message", [
    (tiny_bert_cls, adaption(layers=1), "model types"),
    (tiny_llama, adaption(layers=3), "adapter_layers=3"),
])
def test_llama_adapter_refuses_models_it_cannot_adapt(build, settings, message):
    with pytest.raises(DeltaConfigError, match=message):
        deltatune.get_peft_model(build(), AdaptionPromptConfig(**settings))


def test_prefix_tuning_refuses_gradient_checkpointing():
    base = tiny_llama()
    base.gradient_checkpointing_enable()
    with pytest.raises(DeltaConfigError, match="gradient checkpointing"):
        deltatune.get_peft_model(base, PrefixTuningConfig(**prompt()))


@pytest.mark.parametrize("case_id", [k for k in CASE_IDS if CASES[k].method == "ADAPTION_PROMPT"])
def test_llama_adapter_zero_gate_keeps_the_base_output_exactly(case_id):
    case = CASES[case_id]
    batch = inputs(case)
    assert torch.equal(run(wrap("deltatune", case), batch).logits, run(case.build(), batch).logits)


# ---------------------------------------------------------------------- several adapters
@pytest.mark.parametrize("first, second", [("prompt_llama", "prefix_llama"),
                                           ("ptuning_mlp_llama", "llama_adapter")])
def test_two_adapters_switch_save_and_load(first, second, tmp_path):
    model = wrap("deltatune", CASES[first])
    model.add_adapter("other", OURS[CASES[second].method](**CASES[second].settings))
    randomize(model)  # only the active adapter trains, so randomize each in turn
    model.set_adapter("other")
    randomize(model, seed=1)
    batch = inputs(CASES[first])
    expected = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        expected[name] = run(model, batch).logits
    assert max_diff(expected["default"][:, -6:], expected["other"]) > 1e-3
    model.save_pretrained(str(tmp_path))
    loaded = load("deltatune", CASES[first], tmp_path)
    loaded.load_adapter(str(tmp_path / "other"), adapter_name="other")
    for name in ("default", "other"):
        loaded.set_adapter(name)
        assert torch.equal(run(loaded, batch).logits, expected[name]), name


def test_mixed_adapter_batch_is_refused_clearly():
    model = wrap("deltatune", CASES["prompt_llama"])
    with pytest.raises(ValueError, match="mixed"):
        model(**inputs(CASES["prompt_llama"]), adapter_names=["default", "__base__", "default"])
