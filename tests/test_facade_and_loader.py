"""Issue 16's layering, seen from a user: the peft-style facade (deltatune/api) is what every DeltaModel is,
wherever it is built; inject's file fill stays all-or-nothing; one model loader (io/models.py) with the same
checks for every caller; folders written whole (io/atomic.py atomic_folder)."""

from __future__ import annotations

import os
import stat

import pytest
import torch

import deltatune as dt
from deltatune.api import class_to_build
from deltatune.compose.extract import convert_to_lora
from deltatune.core import model as core
from deltatune.core.config import DeltaConfigError
from deltatune.io import models
from deltatune.io.adapter_files import AdapterFileError, read_adapter, weights_fill
from deltatune.io.atomic import atomic_folder
from tiny_models import tiny_bert_cls, tiny_llama, token_batch

LORA = {"r": 2, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}


def test_a_delta_model_built_anywhere_is_the_public_facade(tmp_path):
    public = class_to_build(core.DeltaModel)  # the facade, or its peft face once peft is imported
    assert issubclass(public, dt.DeltaModel) and issubclass(dt.DeltaModel, core.DeltaModel)
    built_in_core = core.DeltaModel(tiny_llama(), dt.LoraConfig(**LORA))
    assert type(built_in_core) is public
    built_in_core.save_pretrained(tmp_path / "a")  # a facade method, on a model core built
    loaded = dt.DeltaModel.from_pretrained(tiny_llama(), str(tmp_path / "a"))
    assert type(loaded) is public and dt.PeftModel is dt.DeltaModel
    ids = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, built_in_core.eval()(ids).logits, rtol=0, atol=0)

    class Mine(dt.DeltaModel):  # a user's own subclass is built as it is
        pass

    assert type(Mine(tiny_llama(), dt.LoraConfig(**LORA))) is Mine


def test_a_fill_that_fails_leaves_the_model_as_it_was(tmp_path):
    """inject runs the file's fill inside its all-or-nothing step: a refused file adds no adapter, wraps no
    module and changes no base weight (LoftQ rewrites base weights before the fill runs)."""
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(**LORA), "first")
    model.save_pretrained(tmp_path / "first")
    config, weights = read_adapter(tmp_path / "first" / "first")  # a non-default adapter: its subfolder
    weights = {k: v[:1] for k, v in weights.items()}  # every tensor the wrong shape
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wrappers = [name for name, _ in model.delta_layers()]
    with pytest.raises(AdapterFileError, match="shape mismatch"):
        model.inject("second", config, fill=weights_fill(weights, "broken"))
    assert list(model.peft_config) == ["first"] and [name for name, _ in model.delta_layers()] == wrappers
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_one_loader_refuses_an_encoder_as_a_causal_lm_for_every_caller(tmp_path):
    """Before, `deltatune convert` loaded a BERT classifier as a causal LM with a random LM head (base and
    fine-tune each a different random one) and extracted noise; training refused it. Now both refuse."""
    bert = tmp_path / "bert"
    tiny_bert_cls().save_pretrained(bert)
    with pytest.raises(DeltaConfigError, match="not a causal language model"):
        models.load_weights(bert, torch.float32, None)
    with pytest.raises(DeltaConfigError, match="not a causal language model"):
        convert_to_lora(tmp_path / "out", 2, finetuned=bert, base_model=bert)
    assert not (tmp_path / "out").exists()
    classifier = models.load_weights(bert, torch.float32, "SEQ_CLS")  # peft's task type, the same loader
    assert type(classifier).__name__ == "BertForSequenceClassification" and not classifier.training
    with pytest.raises(DeltaConfigError, match="model.task='segmentation'"):
        models.load_base(bert, task="segmentation")


def test_deltatune_models_is_io_models(monkeypatch):
    import deltatune.models as old_name

    assert old_name is models  # one module: patching either changes what the loader calls
    monkeypatch.setattr(old_name, "ensure_default_model", lambda: "converted")
    assert models.resolve_model("smollm2-135m") == "converted"


def test_atomic_folder_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "half-written").write_text("old")
    with pytest.raises(RuntimeError, match="killed"), atomic_folder(target) as tmp:
        (tmp / "new").write_text("new")
        raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left
    assert [p.name for p in target.iterdir()] == ["half-written"]
    with atomic_folder(target) as tmp:
        (tmp / "config.json").write_text("{}")
    assert [p.name for p in target.iterdir()] == ["config.json"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~umask  # not mkdtemp's private 0700
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
