"""QLoRA against LoRA on SmolLM2-135M: weight bytes, peak training memory and step time, deltatune vs peft.

Run: .venv/bin/python benchmarks/quant.py [--steps 3] [--batch 4] [--seq 256]

Set-up: LoRA r=16, alpha 32, dropout 0.05 on all linear layers, AdamW, float32 compute, 2 threads.
QLoRA: the linear layers in NF4 with double quantization (bitsandbytes), embeddings and head in float32.
deltatune quantizes the float model with `deltatune.quant.quantize(model, "nf4")`; peft gets the model the
way its users load it, Transformers' `BitsAndBytesConfig(load_in_4bit=True, nf4, double quant)`. Each
set-up runs in its own process (clean peak RSS); the table prints QLoRA / LoRA ratios per library and
weight bytes / the float32 model's. Peak RSS is measured over training only (reset after loading):
deltatune loads the float model and then quantizes it, so its load-time peak is the float model's.
"""

from __future__ import annotations

import json

import torch

from common import load_smollm2, peak_rss_gb, run_worker, shape_args, timed, token_batch

LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")


def build(setup: str):
    """(model ready to train, weight bytes of the base before adapters)."""
    from deltatune import quant

    library, kind = setup.split("-")
    if library == "peft" and kind == "qlora":
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        from deltatune.models import ensure_default_model

        torch.set_num_threads(2)
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.float32)
        base = AutoModelForCausalLM.from_pretrained(str(ensure_default_model()), quantization_config=config,
                                                    device_map="cpu", dtype=torch.float32)
    else:
        base = load_smollm2()
        if kind == "qlora":
            quant.quantize(base, "nf4", double_quant=True)
    weight_bytes = quant.weight_bytes(base)
    if library == "peft":
        import peft

        return peft.get_peft_model(base, peft.LoraConfig(**LORA)), weight_bytes
    import deltatune

    return deltatune.get_peft_model(base, deltatune.LoraConfig(**LORA)), weight_bytes


def bf16_float_parts_bytes() -> int:
    """Weight bytes of SmolLM2 loaded in bf16 with its linear layers in NF4 (double quantization)."""
    from deltatune import quant
    from deltatune.models import load_default

    model, _ = load_default(torch.bfloat16)
    return quant.weight_bytes(quant.quantize(model, "nf4", double_quant=True))


def reset_peak_rss() -> None:
    """Start peak-RSS accounting from here: loading a float model and quantizing it peaks higher than
    training the result, and that load-time peak is not what QLoRA saves. Linux only."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed float weights back to the OS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak RSS
    except OSError:
        pass


def peak_rss_since_reset_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024 ** 2
    return peak_rss_gb()


def worker(setup: str, batch: int, seq: int, steps: int) -> dict:
    model, weight_bytes = build(setup)
    load_peak = peak_rss_gb()
    reset_peak_rss()
    model.train()
    ids = token_batch(batch, seq, 49152)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = timed(step, steps)
    return {"setup": setup, "seconds": seconds, "rss_gb": peak_rss_since_reset_gb(), "load_rss_gb": load_peak,
            "weight_bytes": weight_bytes}


def main() -> None:
    args, shape = shape_args(__doc__)
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.batch, args.seq, args.steps)))
        return
    results = {s: run_worker(__file__, [s, *shape])
               for s in ("deltatune-lora", "deltatune-qlora", "peft-lora", "peft-qlora")}
    float_bytes = results["deltatune-lora"]["weight_bytes"]
    print(f"SmolLM2-135M, LoRA r=16 all-linear, batch {args.batch} x {args.seq}, {args.steps} steps; "
          f"float32 weights {float_bytes / 1e6:.1f} MB")
    print(f"{'set-up':<17}{'weights MB':>11}{'bytes/f32':>10}{'s/step':>9}{'train RSS GB':>14}{'load RSS GB':>13}")
    for setup, res in results.items():
        print(f"{setup:<17}{res['weight_bytes'] / 1e6:>11.1f}{res['weight_bytes'] / float_bytes:>10.3f}"
              f"{res['seconds']:>9.2f}{res['rss_gb']:>14.2f}{res['load_rss_gb']:>13.2f}")
    print(f"{'QLoRA / LoRA':<17}{'time':>11}{'train RSS':>10}")
    for library in ("deltatune", "peft"):
        q, f = results[f"{library}-qlora"], results[f"{library}-lora"]
        print(f"{library:<17}{q['seconds'] / f['seconds']:>11.2f}{q['rss_gb'] / f['rss_gb']:>10.2f}")
    bf16 = bf16_float_parts_bytes()
    print(f"NF4 with the float parts (embeddings, norms) in bf16, as QLoRA loads them: {bf16 / 1e6:.1f} MB, "
          f"{bf16 / float_bytes:.3f} of float32")
    ours, theirs = results["deltatune-qlora"], results["peft-qlora"]
    print(f"{'qlora ours/peft':<17}{ours['seconds'] / theirs['seconds']:>11.2f}"
          f"{ours['rss_gb'] / theirs['rss_gb']:>10.2f}")


if __name__ == "__main__":
    main()
