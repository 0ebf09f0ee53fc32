"""Inference with an unmerged LoRA against the same LoRA merged into the weights, deltatune vs peft.

Run: .venv/bin/python benchmarks/inference.py [--steps 5] [--batch 4] [--seq 256]

Set-up (DESIGN section 8): SmolLM2-135M, float32, LoRA r=16 (alpha 32) on all linear layers with
non-zero B, eval mode, no_grad forward of a batch x seq token batch, 2 threads. Each library runs in its
own process: forward time unmerged, then `merge_adapter()` and forward time merged, so the ratio comes
from one process and one model. The merged outputs must equal the unmerged ones (checked).
"""

from __future__ import annotations

import json

import torch

from common import load_smollm2, run_worker, shape_args, timed, token_batch

LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")


def worker(library: str, batch: int, seq: int, steps: int) -> dict:
    model = load_smollm2()
    if library == "peft":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(**LORA))
    else:
        import deltatune

        model = deltatune.get_peft_model(model, deltatune.LoraConfig(**LORA))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)  # a trained-looking adapter, so the merge changes the weights
    model.eval()
    ids = token_batch(batch, seq, 49152)

    def forward():
        with torch.no_grad():
            return model(input_ids=ids).logits

    unmerged_logits = forward()
    unmerged = timed(forward, steps)
    model.merge_adapter()
    merged_logits = forward()
    merged = timed(forward, steps)
    return {"library": library, "unmerged": unmerged, "merged": merged,
            "max_diff": float((merged_logits - unmerged_logits).abs().max())}


def main() -> None:
    args, shape = shape_args(__doc__)
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.batch, args.seq, args.steps)))
        return
    print(f"SmolLM2-135M float32, LoRA r=16 all-linear, forward of {args.batch} x {args.seq} tokens, "
          f"{args.steps} timed forwards each")
    print(f"{'library':<11}{'unmerged s':>11}{'merged s':>10}{'unmerged/merged':>17}{'max |diff|':>12}")
    results = {lib: run_worker(__file__, [lib, *shape]) for lib in ("peft", "deltatune")}
    for lib, res in results.items():
        print(f"{lib:<11}{res['unmerged']:>11.3f}{res['merged']:>10.3f}{res['unmerged'] / res['merged']:>17.3f}"
              f"{res['max_diff']:>12.2e}")
    ours, theirs = results["deltatune"], results["peft"]
    print(f"{'ours/peft':<11}{ours['unmerged'] / theirs['unmerged']:>11.3f}{ours['merged'] / theirs['merged']:>10.3f}")


if __name__ == "__main__":
    main()
