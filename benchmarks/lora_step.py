"""Training-step time and peak memory of LoRA against the frozen-model floor, deltatune vs peft.

Run: .venv/bin/python benchmarks/lora_step.py [--steps 3] [--batch 4] [--seq 256] [--rounds 1] [--only lora]
     [--compile]

Set-up (DESIGN section 8): SmolLM2-135M, float32, LoRA r=16 on all linear layers, 2 threads. The
floor is the same model with every weight frozen, back-propagating only to the input embeddings.
Each set-up runs in its own process; the table shows step time / floor, peak RSS / floor, and
deltatune / peft, for LoRA and DoRA with dropout 0.05 and 0, then DoRA / LoRA step time (median steps).
"lora p=0.05 indep" is deltatune with `model.share_dropout_masks = False`: an independent dropout mask per
layer, as peft draws them, instead of one mask shared by the layers that read one input (q/k/v, gate/up);
its peft row is the "lora p=0.05" peft run, and the shared/independent step-time ratio is printed last.
Every set-up takes the loss the way Hugging Face users do (`model(..., labels=ids).loss`); the
`deltatune+loss` rows take it the way `deltatune train` does (train/evaluate.token_loss_sum); both take
the loss straight from the hidden states (core/linear_loss.py, no full logits tensor; the `deltatune` rows
through core/labels_loss.py). `--compile` compiles the deltatune set-ups' decoder body
with Inductor as `training.compile: true` does (train/run/runtime.py; the floor and peft stay eager), with
two extra warm-up steps that absorb the compilation.
"""

from __future__ import annotations

import json

import torch

from common import load_smollm2, peak_rss_gb, run_worker, shape_args, timed, token_batch


def build(setup: str, dropout: float, dora: bool, share: bool = True, compile: bool = False):
    model = load_smollm2()
    if setup == "floor":
        model.requires_grad_(False)
        return model
    kwargs = dict(r=16, lora_alpha=32, lora_dropout=dropout, target_modules="all-linear", use_dora=dora)
    if setup == "peft":
        import peft

        return peft.get_peft_model(model, peft.LoraConfig(**kwargs))
    import deltatune

    model = deltatune.get_peft_model(model, deltatune.LoraConfig(**kwargs))
    model.share_dropout_masks = share
    if compile:
        from deltatune.train.run.runtime import compile_for_training

        compile_for_training(model)
    return model


def worker(setup: str, dropout: float, dora: bool, share: bool, batch: int, seq: int, steps: int,
           compile: bool = False) -> dict:
    from deltatune.train.evaluate import token_loss_sum

    own_loss = setup.endswith("+loss")
    model = build(setup.removesuffix("+loss"), dropout, dora, share, compile).train()
    ids = token_batch(batch, seq, 49152)
    embed = model.get_input_embeddings()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step() -> None:
        if own_loss:
            loss_sum, count = token_loss_sum(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                                     "labels": ids})
            loss = loss_sum / count
        else:
            embeds = embed(ids).detach().requires_grad_(setup == "floor")
            loss = model(inputs_embeds=embeds, labels=ids).loss
        loss.backward()
        if optimizer:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    seconds = timed(step, steps, warmup=3 if compile else 1)
    return {"setup": setup, "seconds": seconds, "rss_gb": peak_rss_gb()}


VARIANTS = {"lora p=0.05": (0.05, False, True), "lora p=0.05 indep": (0.05, False, False),
            "lora p=0": (0.0, False, True), "dora p=0.05": (0.05, True, True), "dora p=0": (0.0, True, True)}
LIBRARIES = ("peft", "deltatune", "deltatune+loss")


def job(lib: str, p: float, dora: bool, share: bool) -> tuple[str, ...]:
    """A worker's arguments; peft has no sharing switch, so its independent-mask job is its only p=0.05 job."""
    return (lib, str(p), "1" if dora else "0", "1" if share or lib == "peft" else "0")


def measure(jobs: list[tuple[str, ...]], shape: list[str], rounds: int) -> dict:
    """Run every job `rounds` times, each round in a rotated order, so a slow spell of a shared machine
    does not land on one set-up: the fastest round's step time and the largest round's peak RSS count."""
    best = {}
    for turn in range(rounds):
        for job in jobs[turn % len(jobs):] + jobs[:turn % len(jobs)]:
            res = run_worker(__file__, [*job, *shape])
            seen = best.setdefault(job, res)
            seen["seconds"], seen["rss_gb"] = min(seen["seconds"], res["seconds"]), max(seen["rss_gb"], res["rss_gb"])
    return best


def main() -> None:
    args, shape = shape_args(__doc__, rounds=True, extra=lambda parser: parser.add_argument(
        "--compile", action="store_true", help="Inductor-compile the deltatune set-ups (training.compile)"))
    if args.compile:
        shape.append("--compile")
    if args.worker:
        setup, dropout = args.worker[0], float(args.worker[1])
        dora, share = args.worker[2] == "1", args.worker[3] == "1"
        compile = args.compile and setup.startswith("deltatune")
        print(json.dumps(worker(setup, dropout, dora, share, args.batch, args.seq, args.steps, compile)))
        return
    variants = {k: v for k, v in VARIANTS.items() if k.startswith(tuple(args.only or ("lora", "dora")))}
    jobs = [("floor", "0", "0", "1")] + list(dict.fromkeys(
        job(lib, *variant) for variant in variants.values() for lib in LIBRARIES))
    runs = measure(jobs, shape, args.rounds)
    floor = runs[jobs[0]]
    print(f"floor: {floor['seconds']:.2f} s/step, peak RSS {floor['rss_gb']:.2f} GB "
          f"(batch {args.batch} x {args.seq}, {args.steps} steps, {args.rounds} round(s)"
          f"{', deltatune compiled' if args.compile else ''})")
    print(f"{'variant':<16}{'library':<16}{'time/floor':>11}{'RSS/floor':>11}{'s/step':>9}{'RSS GB':>8}")
    table = {}
    for label, (p, dora, share) in variants.items():
        results = table[label] = {lib: runs[job(lib, p, dora, share)] for lib in LIBRARIES}
        for lib, res in results.items():
            print(f"{label:<16}{lib:<16}{res['seconds'] / floor['seconds']:>11.2f}"
                  f"{res['rss_gb'] / floor['rss_gb']:>11.2f}{res['seconds']:>9.2f}{res['rss_gb']:>8.2f}")
        for lib in ("deltatune", "deltatune+loss"):
            ours, theirs = results[lib], results["peft"]
            print(f"{label:<16}{lib.replace('deltatune', 'ours') + '/peft':<16}"
                  f"{ours['seconds'] / theirs['seconds']:>11.2f}{ours['rss_gb'] / theirs['rss_gb']:>11.2f}")
    for p in ("0.05", "0"):
        if f"dora p={p}" in table and f"lora p={p}" in table:
            dora_row, lora_row = table[f"dora p={p}"], table[f"lora p={p}"]
            ratios = ", ".join(f"{lib} {dora_row[lib]['seconds'] / lora_row[lib]['seconds']:.2f}" for lib in LIBRARIES)
            print(f"DoRA / LoRA step time, dropout {p}: {ratios}")
    if "lora p=0.05" in table and "lora p=0.05 indep" in table:
        shared, independent = table["lora p=0.05"], table["lora p=0.05 indep"]
        ratios = ", ".join(f"{lib} {shared[lib]['seconds'] / independent[lib]['seconds']:.2f}"
                           for lib in LIBRARIES[1:])
        print(f"LoRA dropout 0.05 step time, shared / independent masks: {ratios}")


if __name__ == "__main__":
    main()
