"""Parameter counts on quantized bases (issue 14 item 10): `get_nb_trainable_parameters` and the printed
line are the same on a float base and on every quantized backend and type, because a quantized weight
counts as the (out, in) float weight it stands for, not as its packed storage."""

import importlib.util
import warnings

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune import quant
from test_quant import llama64

HQQ_KINDS = ["hqq1", "hqq2", "hqq3", "hqq4", "hqq8"]
KINDS = ["nf4", "fp4", "int8"] + (HQQ_KINDS if importlib.util.find_spec("hqq") else [])
# 4-bit variants whose storage packs a different number of values per element
NF4_VARIANTS = [{"double_quant": False}, {"double_quant": True}, {"quant_storage": torch.bfloat16}]


def counts(base: nn.Module, spec, config: dt.LoraConfig) -> tuple[int, int]:
    if spec is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # layers left in float are named in a warning
            quant.quantize(base, spec)
    return dt.get_peft_model(base, config).get_nb_trainable_parameters()


def linear64() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64, bias=False))


def test_issue_replay_nf4_linear_64_lora_r4():
    """NF4 Linear(64, 64), LoRA r=4: 4,096 base + 2 x 4 x 64 adapter = 4,608 (it said 2,560)."""
    config = dt.LoraConfig(r=4, target_modules=["0"])
    assert counts(linear64(), "nf4", config) == (512, 4608) == counts(linear64(), None, config)


@pytest.mark.parametrize("kind", KINDS)
def test_counts_equal_float_on_every_quantized_type(kind, capsys):
    config = dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], bias="lora_only")
    expected = counts(llama64(), None, config)
    assert counts(llama64(), kind, config) == expected
    # the printed line too (its percentage is computed from the same two numbers)
    for spec in (None, kind):
        base = llama64()
        if spec:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quant.quantize(base, spec)
        dt.get_peft_model(base, config).print_trainable_parameters()
    float_line, quant_line = capsys.readouterr().out.splitlines()
    assert float_line == quant_line


@pytest.mark.parametrize("variant", NF4_VARIANTS, ids=lambda v: ",".join(f"{k}={v[k]}" for k in v))
def test_counts_do_not_depend_on_4bit_storage(variant):
    config = dt.LoraConfig(r=8, target_modules=["q_proj", "o_proj", "up_proj"])
    spec = quant.QuantSpec("nf4", **variant)
    assert counts(llama64(), spec, config) == counts(llama64(), None, config)


def test_quantized_module_counts_out_times_in_plus_bias():
    """The counting rule, per module: weight -> out x in, aliases of its storage -> 0, bias -> numel."""
    for kind in KINDS:
        torch.manual_seed(0)
        layer = quant.quantize(nn.Sequential(nn.Linear(128, 64)), kind)[0]
        assert quant.is_quantized(layer)
        assert sum(quant.parameter_counts(layer).values()) == 128 * 64 + 64, kind
    with pytest.raises(ValueError, match="not a quantized module"):
        quant.parameter_counts(nn.Linear(4, 4))


def test_peft_counts_nf4_the_same():
    """An independent reference for the bitsandbytes types: peft's own count on the same quantized base."""
    import peft  # part of the test extra
    config = dict(r=4, target_modules=["0"])
    for kind in ("nf4", "int8"):
        theirs = peft.get_peft_model(quant.quantize(linear64(), kind), peft.LoraConfig(**config))
        assert theirs.get_nb_trainable_parameters() == counts(linear64(), kind, dt.LoraConfig(**config)), kind
