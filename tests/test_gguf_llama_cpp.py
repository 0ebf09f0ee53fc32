"""A GGUF adapter written by `deltatune export --to gguf`, checked by a real client: llama-cpp-python loads the
embedded SmolLM2 GGUF (Q4_1) with it, and its greedy answers on the demo task follow deltatune's answers with
the adapter, not the base's. The merged GGUF model (f16) is checked the same way.

The adapter is trained here for a few steps at a high learning rate on the demo rows (enough to move the
answers to the task's JSON), and both sides decode the same token ids, so only the models differ: exact
equality is not expected from the adapter file, because llama.cpp runs the base in Q4_1 and deltatune the
base Transformers de-quantized to float32 (the same numbers up to float rounding, computed differently)."""

from __future__ import annotations

import json
from importlib.resources import files

import pytest
import torch
from llama_cpp import Llama

import deltatune as dt
from deltatune.cli import main
from deltatune.io import models

PROMPTS, NEW_TOKENS, STEPS = 12, 24, 5


def demo_rows(name: str) -> list[list[dict]]:
    text = (files("deltatune") / "data" / name).read_text(encoding="utf-8")
    return [json.loads(line)["messages"] for line in text.splitlines()]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(deltatune's greedy answers as token lists, the prompts' token ids, the GGUF files)."""
    root = tmp_path_factory.mktemp("gguf")
    base, tokenizer = models.load_default()
    torch.manual_seed(0)
    model = dt.get_peft_model(base, dt.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj",
                                                                                      "v_proj", "o_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    rows = demo_rows("demo_train.jsonl")
    model.train()
    for step in range(STEPS):
        texts = [tokenizer.apply_chat_template(m, tokenize=False) for m in rows[step * 4:(step + 1) * 4]]
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.save_pretrained(root / "adapter")
    assert main(["export", "--to", "gguf", "--adapter", str(root / "adapter"), "--out", str(root / "a.gguf"),
                 "--merged", str(root / "merged.gguf"), "--outtype", "f16"]) == 0
    prompts = [tokenizer.apply_chat_template(m[:-1], tokenize=False, add_generation_prompt=True)
               for m in demo_rows("demo_eval.jsonl")[:PROMPTS]]
    ids = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    ours = []
    with torch.no_grad():
        for row in ids:
            out = model.generate(input_ids=torch.tensor([row]), max_new_tokens=NEW_TOKENS, do_sample=False)
            ours.append(out[0, len(row):].tolist())
    eos = tokenizer.eos_token_id
    return [a[:a.index(eos)] if eos in a else a for a in ours], ids, root


def llama_answers(ids: list[list[int]], model_path, lora_path=None) -> list[list[int]]:
    # one thread: ggml's OpenMP workers spin at barriers, and on a shared, busy CPU two of them crawl
    llm = Llama(model_path=str(model_path), lora_path=lora_path and str(lora_path), n_ctx=512, n_threads=1,
                n_threads_batch=1, seed=0, verbose=False)
    answers = []
    for row in ids:
        answer = []
        for token in llm.generate(row, top_k=1, temp=0.0, reset=True):
            if token == llm.token_eos() or len(answer) == NEW_TOKENS:
                break
            answer.append(token)
        answers.append(answer)
    return answers


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(a)


def test_llama_cpp_with_our_adapter_answers_like_deltatune(exported):
    ours, ids, root = exported
    base_gguf = models.default_gguf_file()
    with_adapter = llama_answers(ids, base_gguf, root / "a.gguf")
    without = llama_answers(ids, base_gguf)
    merged = llama_answers(ids, root / "merged.gguf")
    adapter_agrees, base_agrees = agreement(ours, with_adapter), agreement(ours, without)
    merged_agrees = agreement(ours, merged)
    print(f"greedy agreement with deltatune on {PROMPTS} demo prompts: llama.cpp + GGUF adapter "
          f"{adapter_agrees:.2f}, llama.cpp merged f16 {merged_agrees:.2f}, llama.cpp base {base_agrees:.2f}")
    assert agreement(with_adapter, without) <= 0.25  # the adapter changes llama.cpp's answers
    # measured: 1.00 with the adapter, 1.00 merged, 0.00 for the base (12 prompts, 24 tokens)
    assert adapter_agrees >= 0.75 and adapter_agrees >= base_agrees + 0.5
    assert merged_agrees >= 0.75 and merged_agrees >= base_agrees + 0.5
