"""The merged-model export (io/export.py, what `deltatune merge` writes): a full Transformers folder that
loads back with the merged model's outputs; a failed write leaves nothing at the target and says why."""

from __future__ import annotations

import errno

import pytest
import torch
from transformers import AutoModelForCausalLM

from deltatune import LoraConfig, get_peft_model
from deltatune.errors import WriteError
from deltatune.io.export import write_merged_model
from helpers_train import make_tokenizer
from tiny_models import tiny_llama, token_batch


def merged_model():
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                    init_lora_weights="gaussian"))
    return model.merge_and_unload(safe_merge=True)


def test_export_loads_back_with_the_same_logits(tmp_path):
    merged, ids = merged_model(), token_batch(2, 5)
    (tmp_path / "out").mkdir()  # an empty folder may be the target
    out = write_merged_model(merged, make_tokenizer(), tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, merged(ids).logits)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary left beside it


def test_a_full_disk_is_a_write_error_naming_the_folder_and_leaves_nothing(tmp_path, monkeypatch):
    """Before: merge.py renamed its own temporary folder and let the raw OSError through (a traceback)."""
    tokenizer = make_tokenizer()

    def full(*_, **__):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tokenizer, "save_pretrained", full)
    with pytest.raises(WriteError, match="out: could not write it: the disk is full"):
        write_merged_model(merged_model(), tokenizer, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
