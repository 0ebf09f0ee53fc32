"""Every name or pattern a config gives must select a module (issue 14 item 5), and regexes from files
cannot hang a load (issue 15 item 2).

A key peft matches selects the same modules here (checked against peft's own wrapping); a key that
selects nothing is an error naming the key and the nearest module names, before the model is touched.
Files (which peft writes with such keys after only a warning) load with a warning instead.
"""

import json
import time
import warnings

import peft
import pytest
import torch

import deltatune as dt
from deltatune.core.layer import DeltaLayer
from tiny_models import tiny_bert_cls, tiny_gpt2, tiny_llama, tiny_t5, token_batch

TARGETS = ["q_proj", "v_proj"]


def ranks_here(key: str) -> dict[str, int]:
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules=TARGETS, rank_pattern={key: 2}))
    return {name: layer.adapters["default"].r for name, layer in model.delta_layers()}


def ranks_in_peft(key: str) -> dict[str, int]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=TARGETS, rank_pattern={key: 2}))
    return {name.removeprefix("base_model.model."): module.r["default"] for name, module in model.named_modules()
            if isinstance(module, peft.tuners.lora.LoraLayer)}


@pytest.mark.parametrize("key", ["q_proj", "self_attn.q_proj", "model.layers.0.self_attn.q_proj",
                                 r"layers\.1\..*_proj", "q_proj|v_proj", r".*\.0\.self_attn\.v_proj"])
def test_keys_peft_matches_select_the_same_modules(key):
    expected = ranks_in_peft(key)
    assert 2 in expected.values()  # peft really matched something with this key
    assert ranks_here(key) == expected


@pytest.mark.parametrize("key,nearest", [
    ("q_prj", "q_proj"),  # the issue's typo
    ("^q_proj", "q_proj"),  # anchored: peft matches it only against a whole top-level name
    ("base_model.model.model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.q_proj"),  # file-key path
])
def test_issue_replay_rank_pattern_keys_that_match_nothing(key, nearest):
    assert set(ranks_in_peft(key).values()) == {4}  # peft silently keeps the default rank
    base = tiny_llama()
    with pytest.raises(dt.DeltaConfigError) as err:
        dt.get_peft_model(base, dt.LoraConfig(r=4, target_modules=TARGETS, rank_pattern={key: 2}))
    assert f"rank_pattern entry {key!r}" in str(err.value) and repr(nearest) in str(err.value)
    assert not any(isinstance(m, DeltaLayer) for m in base.modules())  # refused before touching the model


def test_issue_replay_target_list_entry_that_matches_nothing():
    base = tiny_llama()
    with pytest.raises(dt.DeltaConfigError, match=r"target_modules entry 'nope' matches no module"):
        dt.get_peft_model(base, dt.LoraConfig(target_modules=["q_proj", "nope"]))
    assert not any(isinstance(m, DeltaLayer) for m in base.modules())


# Every per-module field of every config, one key that selects nothing each: (builder, config, field, key, nearest)
UNMATCHED = {
    "lora_alpha_pattern": (tiny_llama, dt.LoraConfig(target_modules=TARGETS, alpha_pattern={"v_prj": 4}),
                           "alpha_pattern", "v_prj", "v_proj"),
    "lora_key_of_untargeted_module": (tiny_llama, dt.LoraConfig(target_modules=TARGETS, rank_pattern={"k_proj": 2}),
                                      "rank_pattern", "k_proj", "q_proj"),
    "loha_rank_pattern": (tiny_llama, dt.LoHaConfig(target_modules=TARGETS, rank_pattern={"q_prj": 2}),
                          "rank_pattern", "q_prj", "q_proj"),
    "lokr_alpha_pattern": (tiny_llama, dt.LoKrConfig(target_modules=TARGETS, alpha_pattern={"^v_proj": 2}),
                           "alpha_pattern", "^v_proj", "v_proj"),
    "adalora_rank_pattern": (tiny_llama,
                             dt.AdaLoraConfig(init_r=4, total_step=10, target_modules=TARGETS,
                                              rank_pattern={"model.layers.0.self_attn.q_prj.lora_E": [True] * 4}),
                             "rank_pattern", "model.layers.0.self_attn.q_prj.lora_E",
                             "model.layers.0.self_attn.q_proj"),
    "ia3_feedforward": (tiny_llama,
                        dt.IA3Config(target_modules=".*(down_proj|v_proj)", feedforward_modules=["down_prj"]),
                        "feedforward_modules", "down_prj", "down_proj"),
    "child_entries": (tiny_gpt2, dt.ChildTuningConfig(target_modules=["c_attn"], child_entries={"h.0.attn.c_atn": 3}),
                      "child_entries", "h.0.attn.c_atn", "h.0.attn.c_attn"),
    "exclude_list": (tiny_llama,
                     dt.LoraConfig(target_modules=TARGETS, exclude_modules=["model.layers.1.self_attn.q_prj"]),
                     "exclude_modules", "model.layers.1.self_attn.q_prj", "model.layers.1.self_attn.q_proj"),
    "exclude_regex": (tiny_llama, dt.LoraConfig(target_modules=TARGETS, exclude_modules=r".*\.2\..*"),
                      "exclude_modules", r".*\.2\..*", "q_proj"),
    "modules_to_save": (tiny_llama, dt.LoraConfig(target_modules=TARGETS, modules_to_save=["lm_haed"]),
                        "modules_to_save", "lm_haed", "lm_head"),
    "t5_target_entry": (tiny_t5, dt.LoraConfig(target_modules=["q", "v", "wii"]), "target_modules", "wii", "wi"),
    "bert_bottleneck": (tiny_bert_cls, dt.BottleneckConfig(target_modules=["query", "vlaue"], task_type="SEQ_CLS"),
                        "target_modules", "vlaue", "value"),
}


@pytest.mark.parametrize("case", list(UNMATCHED))
def test_every_per_module_key_that_matches_nothing_is_an_error(case):
    builder, config, field, key, nearest = UNMATCHED[case]
    base = builder()
    before = {name: param.detach().clone() for name, param in base.named_parameters()}
    with pytest.raises(dt.DeltaConfigError) as err:
        dt.get_peft_model(base, config)
    message = str(err.value)
    assert f"{field} entry {key!r}" in message and repr(nearest) in message, message
    assert not any(isinstance(m, DeltaLayer) for m in base.modules())
    assert all(torch.equal(param, before[name]) for name, param in base.named_parameters())


def test_layers_to_transform_index_that_is_no_layer():
    with pytest.raises(dt.DeltaConfigError, match=r"layers_to_transform entry 5 is no layer.*\[0, 1\]"):
        dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules=TARGETS, layers_to_transform=[0, 5]))
    # a layers_pattern that names no layer list: nothing is selected, and the error says where it looked
    with pytest.raises(dt.DeltaConfigError, match=r"layers_pattern="):
        dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules=TARGETS, layers_to_transform=[0],
                                                      layers_pattern="blocks"))


def test_defaults_that_name_other_architectures_are_not_errors():
    # IA3's and LN-tuning's defaults list modules of several architectures; a task type's heads name both
    # "classifier" and "score" (peft writes both into its files).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for builder in (tiny_llama, tiny_gpt2, tiny_t5):
            dt.get_peft_model(builder(), dt.IA3Config())
            dt.get_peft_model(builder(), dt.LNTuningConfig())
        dt.get_peft_model(tiny_bert_cls(), dt.LoraConfig(target_modules=["query"], task_type="SEQ_CLS",
                                                         modules_to_save=["classifier", "score"]))
        dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules="all-linear"))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_peft_file_with_keys_that_match_nothing_loads_with_a_warning(tmp_path):
    # peft writes these with only a warning; they must keep loading, to the same outputs.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(
            r=4, init_lora_weights=False, target_modules=["q_proj", "nope"], rank_pattern={"q_prj": 2}))
        theirs.save_pretrained(str(tmp_path))
    ids = token_batch()
    with pytest.warns(UserWarning, match=r"target_modules entry 'nope'.*rank_pattern entry 'q_prj'"):
        ours = dt.DeltaModel.from_pretrained(tiny_llama(), str(tmp_path))
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), atol=1e-5, rtol=1e-5)


def saved_config(tmp_path, **changes) -> str:
    """An adapter directory (ours) whose adapter_config.json carries `changes`."""
    dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=TARGETS)).save_pretrained(str(tmp_path))
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return str(tmp_path)


@pytest.mark.parametrize("changes,expected", [
    # the issue's pattern: peft (and Python's re) backtrack for minutes; here it is refused at once
    (dict(target_modules=r"(.*.*)*\.q_proj_X"), r"matches no module"),
    # one the `regex` engine cannot shortcut either: stopped by the time bound
    (dict(target_modules=r"(.|.)*[^\w.]"), r"target_modules='\(\.\|\.\)\*\[\^\\\\w\.\]' took over 0.5 s"),
    (dict(exclude_modules=r"(.|.)*[^\w.]"), r"exclude_modules=.* took over"),
    (dict(rank_pattern={r"(.|.)*[^\w.]": 2}), r"rank_pattern key .* took over"),
    (dict(target_modules="(q_proj"), r"target_modules='\(q_proj' is not a valid regular expression"),
])
def test_catastrophic_or_invalid_regex_in_a_file_is_refused_quickly(tmp_path, changes, expected):
    directory = saved_config(tmp_path, **changes)
    base = tiny_llama()
    start = time.perf_counter()
    with pytest.raises(dt.DeltaConfigError, match=expected):
        dt.DeltaModel.from_pretrained(base, directory)
    assert time.perf_counter() - start < 10
    assert not any(isinstance(m, DeltaLayer) for m in base.modules())


def test_catastrophic_feedforward_regex_is_refused():
    config = dt.IA3Config(target_modules=["down_proj"], feedforward_modules=r"(.|.)*[^\w.]")
    with pytest.raises(dt.DeltaConfigError, match=r"feedforward_modules=.* took over"):
        dt.get_peft_model(tiny_llama(), config)
