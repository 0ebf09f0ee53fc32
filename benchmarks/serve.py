"""Load test of `deltatune serve`: N concurrent clients with mixed adapters on the embedded SmolLM2.

Run: .venv/bin/python benchmarks/serve.py [--clients 8] [--requests 3] [--max-tokens 24] [--max-batch 8] [--threads 2]

Set-up: SmolLM2-135M-Instruct (float32, CPU), four served names: three random adapters of different methods
(LoRA r=8 on q/v, IA3, prompt tuning with 8 virtual tokens) and the base model. One server (on a loopback port,
in this process); each of --clients threads sends --requests chat requests one after another (greedy,
--max-tokens each), cycling through the names and the prompts. The same load runs twice on the same server:
  batched:    up to --max-batch rows decoded together (the mixed-adapter path; prompt tuning in its own group)
  sequential: --max-batch 1, one request at a time
and the script prints, for each: completion tokens/s over the wall time, p50/p99 latency per request, the
engine's rows per generate call; then whether every request was decoded exactly once with the adapter it
named (the engine's batch log against the response ids), and how many answers equal `deltatune generate`'s
for the same prompt and adapter (one prompt per call, as the command runs it). Bounded: --deadline seconds for
the whole run. Absolute numbers drift on a shared machine; the batched / sequential ratio is the figure.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
           "Translate 'good morning' into Spanish.", "Why is the sky blue? One sentence."]


def make_adapters(root: Path) -> dict[str, str]:
    """Three random adapters of different methods on SmolLM2, saved like any adapter folder."""
    import deltatune as dt
    from deltatune.io.models import DEFAULT_ALIAS
    from deltatune.models import load_default

    configs = {"lora": dt.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
               "ia3": dt.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
               "prompt": dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8)}
    folders = {}
    for seed, (name, config) in enumerate(configs.items()):
        base, _ = load_default()
        model = dt.get_peft_model(base, config)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:  # away from the init, so each adapter answers differently
                    param.add_(torch.randn(param.shape, generator=generator) * 0.05 * param.detach().std())
        model.peft_config["default"].base_model_name_or_path = DEFAULT_ALIAS
        folders[name] = str(root / name)
        model.save_pretrained(folders[name])
    return folders


def job(k: int, names: list[str]) -> tuple[str, str]:
    """The (name, prompt) of the k-th request of a run: names in turn, then the next prompt."""
    return names[k % len(names)], PROMPTS[(k // len(names)) % len(PROMPTS)]


def references(folders: dict[str, str], pairs: set[tuple[str, str]], max_tokens: int) -> dict[tuple[str, str], str]:
    """`deltatune generate`'s greedy answer for each (name, prompt) the load sends, one prompt per call."""
    from deltatune.train.commands.run_generate import Generator

    answers = {}
    for name, folder in folders.items():
        generator = Generator(folder, max_new_tokens=max_tokens)
        for pair in sorted(pairs):
            turns = [[{"role": "user", "content": pair[1]}]]
            if pair[0] == name:
                (answers[pair],) = generator.answer(turns)
            elif pair[0] == "base" and name == "lora":  # the base model: the adapter switched off
                (answers[pair],) = generator.base_answer(turns)
    return answers


def load(client, engine, names: list[str], clients: int, requests: int, max_tokens: int, deadline: float) -> dict:
    """Every client thread sends `requests` chat requests in turn; returns what was measured."""
    done, errors = [], []
    before = len(engine.batch_log)

    def client_loop(index: int) -> None:
        for turn in range(requests):
            if time.monotonic() > deadline:
                errors.append("deadline")
                return
            name, prompt = job(index * requests + turn, names)
            start = time.perf_counter()
            try:
                answer = client.chat.completions.create(
                    model=name, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                    temperature=0)
            except Exception as err:  # noqa: BLE001 - counted and printed
                errors.append(f"{type(err).__name__}: {err}")
                continue
            done.append({"name": name, "prompt": prompt, "id": answer.id, "latency": time.perf_counter() - start,
                         "tokens": answer.usage.completion_tokens, "text": answer.choices[0].message.content})

    start = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    log = list(engine.batch_log)[before:]
    return {"done": done, "errors": errors, "wall": wall, "log": log}


def summary(label: str, run: dict) -> dict:
    latencies = sorted(r["latency"] for r in run["done"])
    tokens = sum(r["tokens"] for r in run["done"])
    rows = [len(batch) for _, batch in run["log"]]
    p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))] if latencies else float("nan")
    figures = {"tokens_per_s": tokens / run["wall"], "p50": statistics.median(latencies) if latencies else float("nan"),
               "p99": p99, "requests": len(run["done"]), "errors": len(run["errors"]),
               "rows_per_call": statistics.mean(rows) if rows else 0.0, "max_rows": max(rows, default=0)}
    print(f"{label:11s} {figures['tokens_per_s']:7.1f} tokens/s   p50 {figures['p50']:6.2f} s   "
          f"p99 {figures['p99']:6.2f} s"
          f"   {figures['requests']} answered, {figures['errors']} errors   rows per generate call "
          f"{figures['rows_per_call']:.2f} (max {figures['max_rows']})   wall {run['wall']:.1f} s")
    return figures


def check(run: dict, expected: dict) -> tuple[bool, int]:
    """(every request decoded exactly once with its adapter, answers equal to generate's)."""
    logged = [(key, name) for _, batch in run["log"] for key, name in batch]
    wanted = sorted((r["id"], r["name"]) for r in run["done"])
    once = sorted(logged) == wanted and len({k for k, _ in logged}) == len(logged)
    same = sum(r["text"].strip() == expected[r["name"], r["prompt"]] for r in run["done"])
    return once, same


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=3, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--deadline", type=float, default=1200, help="seconds for the whole run")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    deadline = time.monotonic() + args.deadline

    import openai

    from deltatune.serve.app import create_app
    from deltatune.serve.command import BackgroundServer, build_engine

    with tempfile.TemporaryDirectory() as root:
        folders = make_adapters(Path(root))
        names = ["lora", "ia3", "prompt", "base"]
        pairs = {job(k, names) for k in range(args.clients * args.requests)}
        expected = references(folders, pairs, args.max_tokens)
        engine = build_engine(None, folders, max_batch=args.max_batch, max_queue=4 * args.clients, batch_wait=0.02)
        print(f"{args.clients} clients x {args.requests} requests, names {names}, max_tokens {args.max_tokens}, "
              f"torch threads {torch.get_num_threads()}")
        with BackgroundServer(create_app(engine)) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
            client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
            figures, runs = {}, {}
            for label, batch in (("batched", args.max_batch), ("sequential", 1)):
                engine.max_batch = batch
                runs[label] = load(client, engine, names, args.clients, args.requests, args.max_tokens, deadline)
                figures[label] = summary(label, runs[label])
    ratio = figures["batched"]["tokens_per_s"] / figures["sequential"]["tokens_per_s"]
    print(f"batched / sequential tokens/s: {ratio:.2f}")
    ok = True
    for label, run in runs.items():
        once, same = check(run, expected)
        ok &= once and not run["errors"]
        print(f"{label:11s} every request decoded exactly once with its adapter: {once}; answers equal to "
              f"deltatune generate's: {same}/{len(run['done'])}")
        for error in run["errors"][:3]:
            print(f"  error: {error}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
