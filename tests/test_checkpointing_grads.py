"""Gradient checkpointing, in either torch variant, turned on before or after wrapping: every trainable
parameter gets a gradient on the first backward, and the same gradient as without checkpointing
(text, encoder, seq2seq and vision models; several methods). Issue 14 item 7."""

import functools

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import ViTConfig, ViTForImageClassification

import deltatune as dt
from grad_checks import assert_every_trainable_param_gets_grad, randomize_trainable
from tiny_models import tiny_bert_cls, tiny_gpt2, tiny_llama, tiny_t5, token_batch
from tiny_vision import image_batch, tiny_vit

IDS = token_batch()
MODELS = {  # name: (builder, LoRA targets and task settings, batch with labels)
    "llama": (tiny_llama, dict(target_modules=["q_proj", "v_proj"]), {"input_ids": IDS, "labels": IDS}),
    "gpt2": (tiny_gpt2, dict(target_modules=["c_attn"]), {"input_ids": IDS, "labels": IDS}),
    "bert": (tiny_bert_cls, dict(target_modules=["query"], task_type="SEQ_CLS"),
             {"input_ids": IDS, "labels": torch.tensor([0, 2])}),
    "t5": (tiny_t5, dict(target_modules=["q", "v"]), {"input_ids": IDS, "labels": IDS[:, :4].contiguous()}),
    "vit": (tiny_vit, dict(target_modules=["q_proj"], modules_to_save=["classifier"]),
            {"pixel_values": image_batch(), "labels": torch.tensor([0, 3])}),
    "vit_no_head": (tiny_vit, dict(target_modules=["q_proj", "fc2"]),
                    {"pixel_values": image_batch(), "labels": torch.tensor([0, 3])}),
}


def assert_same_gradients(grads: dict, expected: dict) -> None:
    assert grads.keys() == expected.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], atol=1e-6, rtol=1e-5, msg=name)


def enable(model, reentrant: bool) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})


def wrapped(builder, config, checkpointing: str | None, reentrant: bool = True):
    """A trainable, randomized adapter on a fresh base; checkpointing turned on "before" or "after" wrapping."""
    base = builder()
    if checkpointing == "before":
        enable(base, reentrant)
    model = dt.get_peft_model(base, config)
    if checkpointing == "after":
        enable(model, reentrant)
    model.train()
    randomize_trainable(model)
    return model


def checkpoint_modes(test):
    """Run `test` with checkpointing turned on before and after wrapping, reentrant and not."""
    test = pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])(test)
    test = pytest.mark.parametrize("when", ["before", "after"])(test)
    return pytest.mark.filterwarnings("ignore::FutureWarning")(test)


@checkpoint_modes
@pytest.mark.parametrize("model_name", list(MODELS))
def test_every_adapter_gets_the_uncheckpointed_gradient(model_name, reentrant, when):
    builder, settings, batch = MODELS[model_name]
    config = dt.LoraConfig(r=2, lora_alpha=4, **settings)
    checkpointed = wrapped(builder, config, when, reentrant)
    assert any(getattr(m, "gradient_checkpointing", False) for m in checkpointed.modules())
    grads = assert_every_trainable_param_gets_grad(checkpointed, batch)
    plain = assert_every_trainable_param_gets_grad(wrapped(builder, config, None), batch)
    assert_same_gradients(grads, plain)


METHODS = {  # adapters of other kinds inside the checkpointed blocks of a ViT (no input_ids: the hard case)
    "dora": dt.LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=["q_proj", "v_proj"]),
    "loha": dt.LoHaConfig(r=2, alpha=4, target_modules=["q_proj"]),
    "lokr": dt.LoKrConfig(r=2, alpha=4, target_modules=["q_proj"]),
    "ia3": dt.IA3Config(target_modules=["q_proj", "fc2"], feedforward_modules=["fc2"]),
    "vera": dt.VeraConfig(r=2, target_modules=["q_proj", "v_proj"]),
    "adalora": dt.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["q_proj"]),
    "ln_tuning": dt.LNTuningConfig(target_modules=["layernorm_before"]),
}


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("method", list(METHODS))
def test_other_methods_train_under_reentrant_checkpointing(method):
    batch = {"pixel_values": image_batch(), "labels": torch.tensor([1, 2])}
    grads = assert_every_trainable_param_gets_grad(wrapped(tiny_vit, METHODS[method], "before"), batch)
    plain = assert_every_trainable_param_gets_grad(wrapped(tiny_vit, METHODS[method], None), batch)
    assert_same_gradients(grads, plain)


def one_layer_vit() -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=32, num_labels=3)
    return ViTForImageClassification(config).float().eval()


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("head", [["classifier"], None], ids=["trained_head", "no_head"])
def test_issue_replay_one_layer_vit(head):
    # The issue's input: reentrant checkpointing before get_peft_model, LoRA on the attention query
    # (named q_proj in this Transformers), classifier in modules_to_save. Before: every LoRA gradient was
    # None; without the head, torch's bare "element 0 of tensors does not require grad".
    base = one_layer_vit()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model = dt.get_peft_model(base, dt.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=head)).train()
    randomize_trainable(model)
    grads = assert_every_trainable_param_gets_grad(model, {"pixel_values": image_batch(),
                                                           "labels": torch.tensor([0, 2])})
    assert sum(".lora_" in name for name in grads) == 2


class CheckpointedMLP(nn.Module):
    """No Transformers model: one block checkpointed reentrantly, and no input embeddings to hook."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
        self.block.gradient_checkpointing = True
        self.block._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.block(x)
        return self.block._gradient_checkpointing_func(self.block, x)


def test_reentrant_checkpointing_without_input_embeddings_is_a_clear_error():
    torch.manual_seed(0)
    model = dt.get_peft_model(CheckpointedMLP(), dt.LoraConfig(r=2, target_modules=["block.0"])).train()
    with pytest.raises(dt.DeltaConfigError, match=r"use_reentrant=True.*\['block'\].*use_reentrant': False"):
        model(torch.randn(2, 4))
    model.eval()  # no training forward, nothing to check
    with torch.no_grad():
        assert model(torch.randn(2, 4)).shape == (2, 4)


# ---------------------------------------------------------------------- per-call state in the recompute
# Both checkpoint variants run a block's forward again in backward, after the call that routed it has
# returned. Before: ULoRA lost its task ids ("needs task_ids="), LLaMA-Adapter its hooks and X-LoRA its
# gates (torch's CheckpointError: the recompute saved fewer tensors), and a mixed adapter_names batch was
# recomputed with the active adapters on every row.
ROWS3 = token_batch(batch=3, seed=4)


@functools.cache
def experts() -> dict[str, str]:
    from conformance_rows import xlora_experts

    return xlora_experts()


STATEFUL = {  # name: (builder, config, forward keywords that set per-call state)
    "ulora_task_ids_llama": (tiny_llama,
                             lambda: dt.ULoraConfig(r=4, num_tasks=3, target_modules=["q_proj", "v_proj"]),
                             {"task_ids": torch.tensor([2, 0, 2])}),
    "ulora_task_ids_gpt2": (tiny_gpt2, lambda: dt.ULoraConfig(r=4, num_tasks=3, target_modules=["c_attn"]),
                            {"task_ids": torch.tensor([1, 1, 0])}),
    "adaption_prompt": (tiny_llama, lambda: dt.AdaptionPromptConfig(adapter_len=3, adapter_layers=2), {}),
    "xlora": (tiny_llama, lambda: dt.XLoraConfig(adapters=experts(), hidden_size=16, xlora_depth=2,
                                                 xlora_size=8, xlora_dropout_p=0.0), {}),
}


def checkpointed_and_plain_grads(make_model, call, when: str):
    """{name: gradient} from one backward of `call(model)`, with checkpointing on ("before"/"after"
    wrapping) and off, on two identically built and randomized models."""
    grads = []
    for checkpointing in (when, None):
        torch.manual_seed(0)
        model = make_model(checkpointing)
        assert (checkpointing is not None) == any(getattr(m, "gradient_checkpointing", False)
                                                  for m in model.modules())
        grads.append(assert_every_trainable_param_gets_grad(model, None, lambda m, _: call(m)))
    return grads


@checkpoint_modes
@pytest.mark.parametrize("name", list(STATEFUL))
def test_recompute_sees_the_call_state(name, reentrant, when):
    builder, config, call_kwargs = STATEFUL[name]
    checkpointed, plain = checkpointed_and_plain_grads(
        lambda checkpointing: wrapped(builder, config(), checkpointing, reentrant),
        lambda model: model(input_ids=ROWS3, labels=ROWS3, **call_kwargs).loss, when)
    assert_same_gradients(checkpointed, plain)


def two_adapters(builder, settings: dict, checkpointing: str | None, reentrant: bool) -> dt.DeltaModel:
    model = wrapped(builder, dt.LoraConfig(r=2, lora_alpha=4, **settings), checkpointing, reentrant)
    model.add_adapter("other", dt.LoraConfig(r=3, lora_alpha=3, **settings))
    model.set_adapter(["default", "other"])  # both train
    randomize_trainable(model, seed=7)
    for module in model.modules():  # the per-row check below needs the same loss for a row alone
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "dropout", None), float):  # T5's attention keeps its rate as a float
            module.dropout = 0.0
    return model


@checkpoint_modes
@pytest.mark.parametrize("model_name", ["llama", "gpt2", "t5"])
def test_mixed_adapter_batch_recompute_keeps_each_rows_adapter(model_name, reentrant, when):
    builder, settings, batch = MODELS[model_name]
    batch = {key: value[[0, 1, 0]] if value.dim() > 1 else value for key, value in batch.items()}
    rows = {"adapter_names": ["other", "__base__", "default"]}
    checkpointed, plain = checkpointed_and_plain_grads(
        lambda checkpointing: two_adapters(builder, settings, checkpointing, reentrant),
        lambda model: model(**batch, **rows).loss, when)
    assert_same_gradients(checkpointed, plain)
    # Independent of checkpointing: the rows of each adapter alone give the same gradient (row 1 is the
    # base model, so only rows 0 and 2 train, each its own adapter).
    model = two_adapters(builder, settings, when, reentrant)
    for param in model.parameters():
        param.grad = None
    for row, name in ((0, "other"), (2, "default")):
        single = {key: value[row:row + 1] for key, value in batch.items()}
        (model(**single, adapter_names=[name]).loss / 3).backward()
    assert_same_gradients({n: p.grad for n, p in model.named_parameters() if p.requires_grad}, plain)
