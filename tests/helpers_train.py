"""Offline fixtures for the training and CLI tests: a tiny random Llama with a byte-level tokenizer
and a chat template, saved as a Transformers directory, plus small data files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tokenizer():
    """A byte-level tokenizer (one token per byte, no merges) with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHATML
    return tokenizer


def make_tiny_model_dir(path: Path, seed: int = 0) -> Path:
    """Save a 2-layer random Llama (hidden 32) and its tokenizer to `path`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def upper_rows(n: int, offset: int = 0) -> list[dict]:
    """A toy task in the messages format: repeat a word in capitals."""
    words = ["apple", "river", "stone", "cloud", "maple", "tiger", "piano", "lemon", "ocean", "candle"]
    return [
        {
            "messages": [
                {"role": "user", "content": f"shout {words[(i + offset) % len(words)]} {i}"},
                {"role": "assistant", "content": f"{words[(i + offset) % len(words)].upper()} {i}"},
            ]
        }
        for i in range(offset, offset + n)
    ]


def write_config(
    path: Path, model_dir: Path, train: Path, eval_file: Path | None, out: Path, **training
) -> Path:
    """A YAML run config for the tiny model; `training` overrides training-section keys."""
    import yaml

    settings = {
        "max_steps": 6,
        "batch_size": 4,
        "lr": 1e-2,
        "seed": 3,
        "schedule": "linear",
        "warmup_steps": 1,
    }
    settings.update(training)
    config = {
        "model": {"name_or_path": str(model_dir)},
        "method": {
            "name": "lora",
            "r": 4,
            "lora_alpha": 8,
            "target_modules": "all-linear",
            "lora_dropout": 0.1,
        },
        "data": {"train": str(train), "eval": str(eval_file) if eval_file else None, "max_length": 64},
        "training": settings,
        "eval": {"max_new_tokens": 8, "max_samples": 4, "batch_size": 4},
        "output_dir": str(out),
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def run_cli(*args: str, timeout: int = 240, module: str = "deltatune", launcher: list[str] | None = None):
    """Run `python -m deltatune ARGS` (or under `launcher`) with src/ importable; returns the result."""
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    command = [sys.executable, *(launcher or []), "-m", module, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def fresh_clone(tmp_path: Path, monkeypatch) -> Path:
    """A folder laid out like a fresh clone (a copy of examples/), made the current directory, for
    tests that follow the README's commands literally."""
    import shutil

    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    return tmp_path


QUIET = {"show_progress": False, "log": lambda *_: None}  # train(...) keyword arguments for a silent run


def run_files(root: Path) -> dict:
    """A tiny model folder and upper-casing train (24 rows) / eval (4 rows) files under `root`."""
    return {
        "root": root,
        "model": make_tiny_model_dir(root / "model"),
        "train": write_jsonl(root / "train.jsonl", upper_rows(24)),
        "eval": write_jsonl(root / "eval.jsonl", upper_rows(4, 50)),
    }


def run_config(files: dict, name: str, overrides=(), with_eval: bool = False, **training):
    """A RunConfig for `files` (run_files) writing to root/name, with training.* fields and overrides."""
    from deltatune.train.config_file import load_config

    path = write_config(files["root"] / f"{name}.yaml", files["model"], files["train"],
                        files["eval"] if with_eval else None, files["root"] / name, **training)
    return load_config(path, list(overrides))
