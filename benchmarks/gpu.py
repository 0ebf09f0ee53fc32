"""The GPU check: the CUDA tests, then LoRA training throughput and peak memory against peft, in bf16.

Run: .venv/bin/python benchmarks/gpu.py [--out gpu.json] [--steps 5] [--batch 4] [--seq 2048] [--no-tests]
     (`make bench-gpu`; about 6-8 minutes on one H200).  CPU smoke run: benchmarks/gpu.py --tiny --no-tests

1. Tests: `pytest tests/test_cuda.py tests/test_compile.py tests/test_fast_paths.py tests/test_kernels.py`
   (bitsandbytes 4-bit and 8-bit bases, bf16 adapters, merges, mixed batches, torch.compile, the Triton
   fast path); on a GPU they run on CUDA. Their pass/fail counts go into the JSON; a failure does not stop
   the measurements.
2. Measurements, each set-up in its own process (a clean peak-memory counter): SmolLM2-135M (the embedded
   model) and a randomly initialised 1B-class Llama (Llama-3.2-1B's shape), bf16 weights, batch x seq
   tokens packed (several documents a row, positions restarting at each), the loss the way Hugging Face
   users take it (`model(input_ids=..., position_ids=..., labels=...).loss`), AdamW. Set-ups: the frozen
   model (floor: backward to the input embeddings only), then deltatune and peft for LoRA r=16 on all
   linear layers with dropout 0.05 and 0, DoRA (dropout 0.05) and QLoRA (NF4 base via deltatune.quantize,
   the same quantized layers for both libraries, dropout 0.05).
   tokens/s = batch * seq / median step time; memory = torch.cuda.max_memory_allocated (peak RSS on CPU).

Writes one JSON ({"device", "date", "tests", "shape", "runs": [...], "ratios": [...]}) and prints the ratio
table: ours/peft (tokens/s and memory), DoRA/LoRA and QLoRA/LoRA (step time), each vs floor.
`--tiny` swaps both models for a tiny Llama config and sequence 64 (float32 on CPU) and runs the set-ups
in this process, so the whole script runs end to end anywhere in seconds (tests/test_bench_gpu.py); its
numbers mean nothing.
Needs at run time: torch, transformers, peft, accelerate (and bitsandbytes for the QLoRA rows, triton for
the Triton fast path); a QLoRA set-up that cannot run is recorded with its error, not silently dropped.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import peak_rss_gb, run_worker, shape_args, timed, token_batch

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_cuda.py", "tests/test_compile.py", "tests/test_fast_paths.py", "tests/test_kernels.py"]
MODELS = ("smollm2-135m", "llama-1b")
LIBRARIES = ("peft", "deltatune")
VARIANTS = {"lora p=0.05": (0.05, False, False), "lora p=0": (0.0, False, False),
            "dora p=0.05": (0.05, True, False), "qlora p=0.05": (0.05, False, True)}
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                tie_word_embeddings=True)  # meta-llama/Llama-3.2-1B's shape
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)


def device_and_dtype() -> tuple[torch.device, torch.dtype]:
    """bf16 on CUDA; float32 on CPU (the tiny smoke run), where bf16 matmuls are slow and beside the point."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def base_model(name: str, tiny: bool, device: torch.device, dtype: torch.dtype):
    """The frozen base: the embedded SmolLM2-135M or a random Llama of `LLAMA_1B`'s shape (TINY with --tiny)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if name == "smollm2-135m" and not tiny:
        from deltatune.models import load_default

        return load_default(dtype)[0].to(device)
    torch.manual_seed(0)
    config = LlamaConfig(**(TINY if tiny else LLAMA_1B), attn_implementation="sdpa")
    with device:  # initialise on the device: a 1B model's init on the CPU alone takes most of a minute
        return LlamaForCausalLM(config).to(dtype)


def packed_batch(batch: int, seq: int, vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
    """`batch` rows of `seq` random tokens, each row several documents (lengths seq/8..seq/2) whose positions
    restart at 0, as padding-free packing hands them to the model (Transformers keeps them apart by position)."""
    ids = token_batch(batch, seq, vocab)
    generator = torch.Generator().manual_seed(1)
    positions = torch.empty_like(ids)
    for row in range(batch):
        start = 0
        while start < seq:
            length = min(seq - start, int(torch.randint(seq // 8, seq // 2 + 1, (), generator=generator)))
            positions[row, start:start + length] = torch.arange(length)
            start += length
    return {"input_ids": ids.to(device), "position_ids": positions.to(device), "labels": ids.to(device)}


def build(setup: str, model_name: str, variant: str, tiny: bool):
    device, dtype = device_and_dtype()
    model = base_model(model_name, tiny, device, dtype)
    if setup == "floor":
        return model.requires_grad_(False)
    dropout, dora, nf4 = VARIANTS[variant]
    if nf4:
        import deltatune

        deltatune.quantize(model, "nf4", compute_dtype=dtype)
    kwargs = dict(r=16, lora_alpha=32, lora_dropout=dropout, target_modules="all-linear", use_dora=dora)
    if setup == "peft":
        import peft

        return peft.get_peft_model(model, peft.LoraConfig(**kwargs))
    import deltatune

    return deltatune.get_peft_model(model, deltatune.LoraConfig(**kwargs))


def worker(setup: str, model_name: str, variant: str, tiny: bool, batch: int, seq: int, steps: int) -> dict:
    device, _ = device_and_dtype()
    model = build(setup, model_name, variant, tiny).train()
    inputs = packed_batch(batch, seq, model.config.vocab_size, device)
    embed = model.get_input_embeddings()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step() -> None:
        embeds = embed(inputs["input_ids"]).detach().requires_grad_(setup == "floor")
        model(inputs_embeds=embeds, position_ids=inputs["position_ids"], labels=inputs["labels"]).loss.backward()
        if optimizer:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()  # the step's kernels, not only their launches

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = timed(step, steps, warmup=2)
    memory = torch.cuda.max_memory_allocated() / 1024 ** 3 if device.type == "cuda" else peak_rss_gb()
    return {"model": model_name, "setup": setup, "variant": variant, "seconds": seconds,
            "tokens_per_s": batch * seq / seconds, "memory_gb": memory}


def run_tests(timeout: int) -> dict:
    """The CUDA test files in a subprocess: return code, pytest's summary line and the wall time."""
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS], cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)
        summary, code = (done.stdout.strip().splitlines() or [""])[-1], done.returncode
    except subprocess.TimeoutExpired:
        summary, code = f"timed out after {timeout} s", -1
    return {"files": TESTS, "returncode": code, "summary": summary, "seconds": time.perf_counter() - start}


def ratios(runs: list[dict]) -> list[dict]:
    """One row per (model, variant): ours/peft tokens/s and memory, each library's step time / floor, and
    DoRA / LoRA and QLoRA / LoRA step time (against LoRA p=0.05, the same dropout)."""
    found = {(r["model"], r["setup"], r["variant"]): r for r in runs if "seconds" in r}
    rows = []
    for model in MODELS:
        floor = found.get((model, "floor", ""))
        for variant in VARIANTS:
            ours, theirs = found.get((model, "deltatune", variant)), found.get((model, "peft", variant))
            row = {"model": model, "variant": variant}
            if ours and theirs:
                row["ours/peft tokens/s"] = ours["tokens_per_s"] / theirs["tokens_per_s"]
                row["ours/peft memory"] = ours["memory_gb"] / theirs["memory_gb"]
            for lib, res in (("ours", ours), ("peft", theirs)):
                if res and floor:
                    row[f"{lib} time/floor"] = res["seconds"] / floor["seconds"]
                    row[f"{lib} memory/floor"] = res["memory_gb"] / floor["memory_gb"]
                lora = found.get((model, "deltatune" if lib == "ours" else "peft", "lora p=0.05"))
                if res and lora and variant.startswith(("dora", "qlora")):
                    row[f"{lib} {variant.split()[0]}/lora time"] = res["seconds"] / lora["seconds"]
            rows.append(row)
    return rows


def print_table(runs: list[dict], rows: list[dict]) -> None:
    for res in runs:
        shown = (f"{res['tokens_per_s']:>10.0f} tok/s {res['memory_gb']:>7.2f} GB" if "seconds" in res
                 else f"failed: {res['error'].splitlines()[-1][:80]}")
        print(f"{res['model']:<14}{res['setup']:<11}{res['variant'] or 'frozen':<14}{shown}")
    columns = list(dict.fromkeys(key for row in rows for key in row if key not in ("model", "variant")))
    print(f"{'model':<14}{'variant':<14}" + "".join(f"{c:>22}" for c in columns))
    for row in rows:
        cells = "".join(f"{row[c]:>22.2f}" if c in row else f"{'-':>22}" for c in columns)
        print(f"{row['model']:<14}{row['variant']:<14}{cells}")


def add_flags(parser) -> None:
    parser.add_argument("--tiny", action="store_true", help="tiny Llama configs, CPU-sized: a smoke run")
    parser.add_argument("--no-tests", action="store_true", help="measure only")
    parser.add_argument("--test-timeout", type=int, default=120, help="seconds for the test phase")
    parser.add_argument("--out", default="gpu.json")
    parser.set_defaults(steps=5, batch=4, seq=2048)


def main() -> None:
    args, shape = shape_args(__doc__, extra=add_flags)
    if args.tiny and args.seq == 2048:
        shape[shape.index("--seq") + 1] = "64"
        args.seq = 64
    if args.worker:
        setup, model_name, variant = args.worker
        print(json.dumps(worker(setup, model_name, variant, args.tiny, args.batch, args.seq, args.steps)))
        return
    device, dtype = device_and_dtype()
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "dtype": str(dtype),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "tiny": args.tiny, "shape": {"batch": args.batch, "seq": args.seq, "steps": args.steps},
              "tests": None if args.no_tests else run_tests(args.test_timeout), "runs": []}
    if report["tests"]:
        print(f"tests: {report['tests']['summary']}")
    jobs = [(model, "floor", "") for model in MODELS]
    jobs += [(model, lib, variant) for model in MODELS for variant in VARIANTS for lib in LIBRARIES]
    for model, setup, variant in jobs:
        try:
            if args.tiny:  # in this process: a tiny run's memory means nothing, and 18 imports take minutes
                report["runs"].append(worker(setup, model, variant, True, args.batch, args.seq, args.steps))
            else:
                report["runs"].append(run_worker(__file__, [setup, model, variant, *shape]))
        except Exception as error:  # recorded (QLoRA without bitsandbytes, out of memory), not fatal
            report["runs"].append({"model": model, "setup": setup, "variant": variant, "error": str(error)})
    report["ratios"] = ratios(report["runs"])
    Path(args.out).write_text(json.dumps(report, indent=1))
    print_table(report["runs"], report["ratios"])
    print(f"wrote {args.out} ({report['device']}, {report['date']})")


if __name__ == "__main__":
    main()
