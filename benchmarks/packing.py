"""Padding-free packing against padded batches: one forward + backward pass over the same chats.

Run: .venv/bin/python benchmarks/packing.py [--examples 32]

Set-up: SmolLM2-135M, float32, LoRA r=16 (alpha 32, dropout 0.05) on all linear layers, 2 threads. The
data are multi-turn chats of 1 to 6 turns built from the demo's rows (so lengths vary, as in real chat
data), loss on the assistant turns. `padded`: batches of 8 chats, right-padded to the longest; `packed`:
the same chats packed best-fit decreasing into rows of 1024 tokens, 2 rows a batch, each chat keeping its
own positions and attention. Each mode runs in its own process; the loss summed over all chats must agree.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from common import load_smollm2_and_tokenizer, peak_rss_gb, run_worker
from deltatune import LoraConfig, get_peft_model
from deltatune.train.evaluate import token_loss_sum
from deltatune.train.files import Row, read_rows, resolve_data_path
from deltatune.train.formats import to_samples
from deltatune.train.packing import pack
from deltatune.train.tokenize import collate, encode

ROW_TOKENS = 1024
BATCHES = {"padded": 8, "packed": 2}


def chats(count: int) -> list[Row]:
    rows = [row.data for row in read_rows(resolve_data_path("deltatune:demo_train.jsonl"))]
    pick = random.Random(0)
    out = []
    for index in range(count):
        turns = [pick.choice(rows)["messages"] for _ in range(pick.randint(1, 6))]
        messages = turns[0][:1] + [m for turn in turns for m in turn[1:]]  # one system message, then the turns
        out.append(Row({"messages": messages}, "chats", index))
    return out


def worker(mode: str, count: int) -> dict:
    model, tokenizer = load_smollm2_and_tokenizer()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear"))
    model.train()
    examples, _ = encode(to_samples(chats(count))[0], tokenizer, ROW_TOKENS)
    rows = pack(examples, ROW_TOKENS) if mode == "packed" else examples
    size = BATCHES[mode]
    batches = [collate(rows[i:i + size], tokenizer.pad_token_id) for i in range(0, len(rows), size)]
    torch.manual_seed(0)
    token_loss_sum(model, batches[0])[0].backward()  # warm-up
    total, start = 0.0, time.perf_counter()
    for batch in batches:
        loss, _ = token_loss_sum(model, batch)
        loss.backward()
        total += float(loss)
    return {"mode": mode, "seconds": time.perf_counter() - start, "loss_sum": total, "batches": len(batches),
            "tokens": sum(b["input_ids"].numel() for b in batches), "real": sum(len(e.input_ids) for e in examples),
            "rss_gb": peak_rss_gb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker", nargs="*")
    parser.add_argument("--examples", type=int, default=32)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.examples)))
        return
    results = {mode: run_worker(__file__, [mode, "--examples", str(args.examples)]) for mode in BATCHES}
    real = results["padded"]["real"]
    print(f"{args.examples} chats of 1-6 turns, {real} tokens; SmolLM2-135M float32, LoRA r=16 all-linear, "
          "one forward + backward pass")
    print(f"{'mode':<8}{'batches':>8}{'tokens run':>11}{'padding':>9}{'seconds':>9}{'peak GB':>9}{'loss sum':>11}")
    for mode, res in results.items():
        print(f"{mode:<8}{res['batches']:>8}{res['tokens']:>11}{1 - real / res['tokens']:>9.1%}"
              f"{res['seconds']:>9.1f}{res['rss_gb']:>9.2f}{res['loss_sum']:>11.1f}")
    print(f"packed / padded time: {results['packed']['seconds'] / results['padded']['seconds']:.3f}")


if __name__ == "__main__":
    main()
