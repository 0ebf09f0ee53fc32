"""The seed snippets PEFT users know, with only the import changed, on the real embedded SmolLM2."""

import copy

import pytest
import torch

from deltatune.models import load_default


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = load_default()
    return model.eval(), tokenizer


def run_snippet(lib, model, ids):
    LoraConfig, get_peft_model = lib.LoraConfig, lib.get_peft_model  # noqa: N806 (the snippet's names)
    cfg = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.05, bias="none")
    model = get_peft_model(model, cfg)
    model.print_trainable_parameters()
    with torch.no_grad():  # a trained-looking adapter, so merging has something to do
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02, generator=torch.Generator().manual_seed(hash(name) % 2**31))
    model.eval()
    with torch.no_grad():
        unmerged = model(ids).logits
        merged = model.merge_and_unload()
        return unmerged, merged(ids).logits


def test_seed_snippet_runs_unchanged_and_reports_like_peft(smollm2, capsys):
    import peft

    import deltatune

    model, tokenizer = smollm2
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    ours_unmerged, ours_merged = run_snippet(deltatune, copy.deepcopy(model), ids)
    ours_report = capsys.readouterr().out.strip()
    run_snippet(peft, copy.deepcopy(model), ids)
    peft_report = capsys.readouterr().out.strip()
    assert ours_report == peft_report and ours_report.startswith("trainable params: 921,600 ||")
    torch.testing.assert_close(ours_merged, ours_unmerged, atol=1e-4, rtol=1e-4)
    assert (ours_unmerged - model(ids).logits).abs().max() > 1e-3
