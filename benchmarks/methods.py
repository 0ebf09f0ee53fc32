"""Every method on the bundled demo task with the same step budget: held-out exact match, trainable
parameters, step time and peak memory.

Run: .venv/bin/python benchmarks/methods.py [--steps 20] [--only lora,ia3,...] [--out runs/bench-methods]

Set-up: the `deltatune demo` run (SmolLM2-135M-Instruct, sentence -> one line of JSON, 20 steps of 8
examples, cosine schedule with 2 warm-up steps, AdamW, seed 0, bf16 autocast where the CPU runs it, 2
threads), scored on the first 100 held-out examples by exact match of greedy answers. Only the method
section and the learning rate change per row (ROWS below: each method's usual rate for a short run, not
tuned per method; AdaLoRA's singular values start at zero, so it gets 1e-2; prefix tuning starts from
zero prefixes, since peft's N(0, 1) prefixes take the loss from 0.5 to 9.3 at step 1); the QLoRA row
also sets `model.quantize: nf4` (issue: within 5 points of LoRA). Each row trains in its own process
through `deltatune.train.loop.train`, so peak RSS is that run's. Step time is the median of `step_s` over
steps 2..N in metrics.jsonl (step 1 also warms up).

X-LoRA gates two frozen experts: the adapter the LoRA row trained and a distractor of the same shapes
and per-module norm with random directions; its row shows whether the classifier learns to pick the
task expert within the budget (run the LoRA row first, or together).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ALL_LINEAR = "all-linear"
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": ALL_LINEAR}
ROWS = {  # key: (table label, method section, learning rate[, model section overrides])
    "base": ("base model (no training)", None, 0.0),
    "lora": ("LoRA r=16", {"name": "lora", **LORA}, 2e-3),
    "qlora": ("QLoRA r=16 (NF4 base)", {"name": "lora", **LORA}, 2e-3, {"quantize": "nf4"}),
    "hqq": ("LoRA r=16 on an HQQ 4-bit base", {"name": "lora", **LORA}, 2e-3, {"quantize": "hqq4"}),
    "dora": ("DoRA r=16", {"name": "lora", **LORA, "use_dora": True}, 2e-3),
    "loha": ("LoHa r=8", {"name": "loha", "r": 8, "alpha": 16, "target_modules": ALL_LINEAR}, 2e-3),
    "lokr": ("LoKr r=8", {"name": "lokr", "r": 8, "alpha": 16, "target_modules": ALL_LINEAR}, 2e-3),
    "oft": ("OFT block 32", {"name": "oft", "oft_block_size": 32, "target_modules": ALL_LINEAR}, 2e-3),
    "boft": ("BOFT 8x2 butterfly", {"name": "boft", "boft_block_size": 8, "boft_n_butterfly_factor": 2,
                                    "target_modules": ALL_LINEAR}, 2e-3),
    "adalora": ("AdaLoRA 12->8", {"name": "adalora", "init_r": 12, "target_r": 8, "lora_alpha": 32, "tinit": 4,
                                  "tfinal": 4, "deltaT": 2, "total_step": 20, "target_modules": ALL_LINEAR}, 1e-2),
    "vera": ("VeRA r=256", {"name": "vera", "r": 256, "target_modules": ALL_LINEAR}, 1e-2),
    "xlora": ("X-LoRA (2 experts)", {"name": "xlora", "xlora_size": 256}, 2e-3),
    "relora": ("ReLoRA r=16, reset every 10", {"name": "relora", **LORA, "relora_steps": 10,
                                               "relora_warmup_steps": 2}, 2e-3),
    "ulora": ("task-modulated LoRA r=16", {"name": "ulora", **LORA, "num_tasks": 1, "default_task": 0}, 2e-3),
    "ia3": ("IA3", {"name": "ia3", "target_modules": ["k_proj", "v_proj", "down_proj"],
                    "feedforward_modules": ["down_proj"]}, 3e-2),
    "ln_tuning": ("LN tuning", {"name": "ln_tuning"}, 1e-2),
    "bitfit": ("BitFit (+ zero biases)", {"name": "bitfit", "add_missing_bias": True,
                                          "target_modules": ALL_LINEAR}, 1e-2),
    "houlsby": ("bottleneck houlsby /16", {"name": "bottleneck", "bottleneck_type": "houlsby"}, 2e-3),
    "pfeiffer": ("bottleneck pfeiffer /16", {"name": "bottleneck", "bottleneck_type": "pfeiffer"}, 2e-3),
    "parallel": ("bottleneck parallel /16", {"name": "bottleneck", "bottleneck_type": "parallel"}, 2e-3),
    "child_f": ("Child-Tuning F p=0.3", {"name": "child_tuning", "child_tuning_mode": "F",
                                         "target_modules": ALL_LINEAR}, 1e-4),
    "child_d": ("Child-Tuning D p=0.3", {"name": "child_tuning", "child_tuning_mode": "D",
                                         "target_modules": ALL_LINEAR}, 1e-4),
    "prompt": ("prompt tuning 20 tokens", {"name": "prompt_tuning", "num_virtual_tokens": 20,
                                           "task_type": "CAUSAL_LM", "prompt_tuning_init": "TEXT",
                                           "prompt_tuning_init_text": "Extract name, age, city and job as JSON:"},
               3e-2),
    "ptuning": ("P-tuning 20 tokens (MLP)", {"name": "p_tuning", "num_virtual_tokens": 20, "task_type": "CAUSAL_LM",
                                             "encoder_hidden_size": 128}, 1e-2),
    "prefix": ("prefix tuning 20 tokens, zero init", {"name": "prefix_tuning", "num_virtual_tokens": 20,
                                                      "task_type": "CAUSAL_LM", "init_weights": "zero"}, 1e-2),
    "llama_adapter": ("LLaMA-Adapter 10 x 30 layers", {"name": "adaption_prompt", "adapter_len": 10,
                                                       "adapter_layers": 30, "task_type": "CAUSAL_LM"}, 9e-3),
}


def distractor_expert(expert: Path, target: Path, seed: int = 0) -> Path:
    """An adapter like `expert` (same keys, shapes, per-module ||B A||) pointing in random directions."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(expert / "adapter_model.safetensors"))
    generator, out = torch.Generator().manual_seed(seed), {}
    for key in sorted(k for k in tensors if k.endswith("lora_A.weight")):
        b_key = key.replace("lora_A", "lora_B")
        a, b = tensors[key], tensors[b_key]
        new_a = torch.randn(a.shape, generator=generator) / a.shape[1] ** 0.5
        new_b = torch.randn(b.shape, generator=generator)
        new_b *= (b.float() @ a.float()).norm() / (new_b @ new_a).norm()
        out[key], out[b_key] = new_a.to(a.dtype), new_b.to(b.dtype)
    target.mkdir(parents=True, exist_ok=True)
    save_file(out, str(target / "adapter_model.safetensors"))
    (target / "adapter_config.json").write_text((expert / "adapter_config.json").read_text())
    return target


def row_config(key: str, out: Path, steps: int):
    from deltatune.models import ensure_default_model
    from deltatune.train.config_file import from_dict
    from deltatune.train.demo import DEMO_SETTINGS

    _, method, lr, *model = ROWS[key]
    method = dict(method or ROWS["lora"][1])
    if method["name"] == "xlora":
        expert = out / "lora"
        if not (expert / "adapter_model.safetensors").is_file():
            raise SystemExit("the xlora row gates the LoRA row's adapter: run --only lora,xlora")
        method["adapters"] = {"0": str(expert), "1": str(distractor_expert(expert, out / "xlora-distractor"))}
    if method.get("prompt_tuning_init") == "TEXT":
        method["tokenizer_name_or_path"] = str(ensure_default_model(verbose=False))
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in DEMO_SETTINGS.items()}
    raw["method"], raw["output_dir"] = method, str(out / key)
    raw["training"].update(max_steps=max(steps, 1), lr=lr or 2e-3)
    raw["model"].update(*model)
    return from_dict(raw, source=f"benchmarks/methods.py row {key}")


def worker(key: str, out: Path, steps: int) -> dict:
    from deltatune.train.build import load_base, read_samples
    from deltatune.train.evaluate import score_generation
    from deltatune.train.loop import train
    from deltatune.train.runtime import autocast, resolve_precision

    torch.set_num_threads(2)
    config = row_config(key, out, steps)
    model, tokenizer = load_base(config.model)  # the embedded SmolLM2, quantized where the row says
    if ROWS[key][1] is None:  # the untrained model, scored the same way
        samples = read_samples(config.data.eval, config.data)[0][: config.eval.max_samples]
        with autocast(resolve_precision(config.training.precision)):
            scores, _ = score_generation(model, tokenizer, samples, True, config.eval.max_new_tokens,
                                         config.eval.batch_size)
        return {"exact_match": scores["exact_match"], "trainable": 0}
    result = train(config, base=(model, tokenizer), show_progress=False, log=lambda *_: None)
    records = [json.loads(line) for line in (out / key / "metrics.jsonl").read_text().splitlines()]
    steps_seen = [r for r in records if "step_s" in r]
    seconds = [r["step_s"] for r in steps_seen[1:]]  # the first step also warms up
    return {
        "exact_match": result.metrics.get("exact_match", 0.0),
        "trainable": result.model.get_nb_trainable_parameters()[0],
        "step_s": statistics.median(seconds) if seconds else float("nan"),
        "peak_gb": max(r["peak_mem_mb"] for r in steps_seen) / 1024,
        "final_loss": steps_seen[-1]["loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--only", default=",".join(ROWS), help="comma-separated row keys: " + ",".join(ROWS))
    parser.add_argument("--out", default="runs/bench-methods")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    if args.worker:
        print(json.dumps(worker(args.worker, out, args.steps)))
        return
    keys = args.only.split(",")
    unknown = [k for k in keys if k not in ROWS]
    if unknown:
        raise SystemExit(f"--only: unknown rows {unknown}; choose from {', '.join(ROWS)}")
    print(f"demo task, {args.steps} steps of 8 examples, exact match on 100 held-out examples; 2 threads")
    print("| method | lr | held-out EM % | trainable params | s/step | step / LoRA | peak RSS GB | final loss |")
    print("|---|---|---|---|---|---|---|---|")
    results = {}
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.jsonl", "a") as log:  # one line per finished row, for the README table
        for key in keys:
            done = subprocess.run([sys.executable, __file__, "--worker", key, "--steps", str(args.steps),
                                   "--out", str(out)], capture_output=True, text=True)
            if done.returncode:
                print(f"| {ROWS[key][0]} | failed: {done.stderr.strip().splitlines()[-1][:200]} |", flush=True)
                continue
            res = results[key] = json.loads(done.stdout.strip().splitlines()[-1])
            log.write(json.dumps({"row": key, "steps": args.steps, **res}) + "\n")
            label, method, lr, *_ = ROWS[key]
            if method is None:
                print(f"| {label} | - | {res['exact_match']:.0f} | 0 | - | - | - | - |", flush=True)
                continue
            ratio = res["step_s"] / results["lora"]["step_s"] if "lora" in results else float("nan")
            print(f"| {label} | {lr:g} | {res['exact_match']:.0f} | {res['trainable']:,} | {res['step_s']:.2f} "
                  f"| {ratio:.2f} | {res['peak_gb']:.2f} | {res['final_loss']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
