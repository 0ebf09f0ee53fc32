"""Fixtures for the `deltatune serve` tests: a tiny Llama with a byte-level tokenizer saved as a model folder,
and adapters of different methods on it (randomized, so each answers differently), saved as `peft` folders.

The model's weights are initialized wide (initializer_range 0.2) so its next-token scores are far apart:
greedy answers then do not hinge on float rounding, and comparing them across batch mates tests routing.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import deltatune as dt
from adapted_models import randomize
from helpers_train import make_tokenizer

CONFIGS = {
    "lora": lambda: dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    "ia3": lambda: dt.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "prompt": lambda: dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "loha": lambda: dt.LoHaConfig(r=2, alpha=4, target_modules=["q_proj", "o_proj"]),
}
# each adapter's recorded prompt format (train/commands/run_generate.py), as a training run writes it
PROMPT_RECORDS = {"lora": {"template": "chat", "system": "Be brief.", "distinct_system_prompts": 1},
                  "ia3": {"template": "plain", "system": None, "distinct_system_prompts": 1}}


def make_model_dir(path: Path, hidden: int = 32, seed: int = 0) -> Path:
    tokenizer = make_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False, initializer_range=0.2)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_adapter_dir(model_dir: Path, method: str, out: Path, seed: int = 0) -> Path:
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = dt.get_peft_model(base, CONFIGS[method]())
    randomize(model, seed=seed, scale=1.0)
    model.save_pretrained(out)
    if method in PROMPT_RECORDS:
        (out / "deltatune_prompt.json").write_text(json.dumps(PROMPT_RECORDS[method]))
    return out


def make_workspace(root: Path) -> dict[str, Path]:
    """{"model": folder, "lora" / "ia3" / "prompt" / "loha": adapter folders, "other_model_lora": a LoRA for
    a model of another width (its shapes do not fit)}."""
    model = make_model_dir(root / "model")
    found = {"model": model}
    for seed, method in enumerate(CONFIGS):
        found[method] = make_adapter_dir(model, method, root / method, seed)
    other = make_model_dir(root / "other_model", hidden=16)
    found["other_model_lora"] = make_adapter_dir(other, "lora", root / "other_model_lora")
    return found
