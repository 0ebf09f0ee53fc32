"""`deltatune serve` without a server: the command line (engines, --adapter values, the missing extra, the API key
from the environment), `import deltatune` without the web stack, and serve/rows.py's per-row control fed
token by token (stop strings across tokens, held-back text, max_tokens, seeded draws)."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest
import torch

import deltatune.serve
from deltatune.cli import main
from deltatune.serve import command
from deltatune.serve.rows import RowControl, RowSpec
from helpers_train import ROOT, make_tokenizer


def test_engine_vllm_is_handed_to_the_vllm_module(monkeypatch):
    seen = []
    fake = types.ModuleType("deltatune.serve.vllm_handoff")
    fake.run = lambda args: seen.append(args) or 0
    monkeypatch.setitem(sys.modules, "deltatune.serve.vllm_handoff", fake)
    monkeypatch.setattr(deltatune.serve, "vllm_handoff", fake, raising=False)  # the real one, once merged, too
    assert main(["serve", "--engine", "vllm", "--adapter", "a=some/dir", "--port", "9000"]) == 0
    assert seen[0].engine == "vllm" and seen[0].adapter == ["a=some/dir"] and seen[0].port == 9000


def test_serve_defaults_bind_loopback_with_the_in_process_engine():
    from deltatune.cli import build_parser

    args = build_parser().parse_args(["serve"])
    assert (args.engine, args.host, args.adapter, args.model) == ("deltatune", "127.0.0.1", None, None)


@pytest.mark.parametrize("value, said", [("noequals", "expected NAME=DIR"), ("=dir", "expected NAME=DIR"),
                                         ("a=", "expected NAME=DIR")])
def test_a_bad_adapter_value_stops_before_any_model_loads(value, said, capsys, monkeypatch):
    monkeypatch.setattr(command, "load_model", lambda *a, **k: pytest.fail("the model must not load"))
    assert main(["serve", "--adapter", value]) == 2
    assert said in capsys.readouterr().err


def test_an_adapter_folder_that_is_no_adapter_stops_before_the_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(command, "load_model", lambda *a, **k: pytest.fail("the model must not load"))
    assert main(["serve", "--adapter", f"a={tmp_path}", "--adapter", f"b={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --adapter a:") and "adapter_config.json" in err


def test_the_same_name_twice_is_refused(capsys):
    assert main(["serve", "--adapter", "a=x", "--adapter", "a=y"]) == 2
    assert "given twice" in capsys.readouterr().err


def test_a_missing_web_stack_names_the_extra(monkeypatch, capsys):
    real = command.importlib.util.find_spec
    monkeypatch.setattr(command.importlib.util, "find_spec", lambda name: None if name == "fastapi" else real(name))
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'deltatune[serve]'" in err and "needs fastapi" in err


def test_import_deltatune_needs_no_web_stack():
    code = ("import sys, deltatune, deltatune.cli, deltatune.serve.engine; "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT / "src"), "PATH": ""}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_api_key_comes_from_the_option_else_the_environment(monkeypatch):
    monkeypatch.setenv("DELTATUNE_API_KEY", "from-env")
    assert command.api_key_of("given") == "given" and command.api_key_of(None) == "from-env"
    monkeypatch.setenv("DELTATUNE_API_KEY", "")
    assert command.api_key_of(None) is None


# ----------------------------------------------------------------------------------------- rows.py
def feed(control: RowControl, tokenizer, texts: list[str]) -> list[list[bool]]:
    """Step `control` with each row's text one token per step (rows padded with EOS once they run out)."""
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    done = []
    for step in range(max(map(len, ids))):
        column = [row[step] if step < len(row) else tokenizer.eos_token_id for row in ids]
        done.append(control.step(torch.tensor([[0] * 3 + [c] for c in column])).tolist())
    return done


def test_rows_stop_at_their_own_stop_string_and_never_send_part_of_it():
    tokenizer = make_tokenizer()
    events = {0: [], 1: [], 2: []}

    def spec(i, **options):
        return RowSpec(emit=lambda kind, value: events[i].append((kind, value)), **options)

    control = RowControl([spec(0, max_tokens=50, stop=("lo w",)), spec(1, max_tokens=4),
                          spec(2, max_tokens=50, stop=("zzz",))], tokenizer, tokenizer.eos_token_id)
    done = feed(control, tokenizer, ["hello world", "hello world", "hi"])
    deltas = {i: "".join(v for k, v in e if k == "delta") for i, e in events.items()}
    assert deltas == {0: "hel", 1: "hell", 2: "hi"}
    # the second "l", then "lo", "lo " were held back (they could grow into "lo w"); sent text is never taken back
    assert [v for k, v in events[0] if k == "delta"] == ["h", "e", "l"]
    results = {i: e[-1][1] for i, e in events.items()}
    assert [(r.text, r.finish_reason, r.completion_tokens) for r in results.values()] == [
        ("hel", "stop", 7), ("hell", "length", 4), ("hi", "stop", 2)]
    assert done[3] == [False, True, True] and done[6] == [True, True, True]
    assert sum(k == "done" for e in events.values() for k, _ in e) == 3  # each row answers exactly once


def test_a_seeded_row_draws_the_same_tokens_whatever_its_batch_mates():
    def draws(rows: int, seed_row: int) -> list[int]:
        specs = [RowSpec(max_tokens=9, temperature=1.0, top_p=0.8, seed=11 if i == seed_row else i + 100)
                 for i in range(rows)]
        control, picked = RowControl(specs, make_tokenizer(), None), []
        for step in range(8):
            scores = torch.randn(rows, 32, generator=torch.Generator().manual_seed(step))
            scores[seed_row] = torch.linspace(-1, 1, 32)  # the seeded row sees the same scores each time
            picked.append(int(control.sample(scores)[seed_row].argmax()))
        return picked

    alone = draws(1, 0)
    assert draws(3, 1) == alone == draws(5, 4)
    assert len(set(alone)) > 1  # really sampled, not argmax


def test_the_command_serves_until_stopped(tmp_path):
    """`python -m deltatune serve` itself: checks, loads, answers on the port it was given, with the key from
    the environment."""
    import os
    import socket
    import time

    import httpx

    from serve_fixtures import make_adapter_dir, make_model_dir

    model = make_model_dir(tmp_path / "model")
    adapter = make_adapter_dir(model, "lora", tmp_path / "lora")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1", DELTATUNE_API_KEY="k")
    server = subprocess.Popen([sys.executable, "-m", "deltatune", "serve", "--model", str(model), "--adapter",
                               f"support={adapter}", "--port", str(port)], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                assert server.poll() is None, server.communicate()[1]
                time.sleep(0.1)
        body = {"model": "support", "prompt": "hi", "max_tokens": 3, "temperature": 0}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 401
        answer = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": "Bearer k"}, timeout=60)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 3
    finally:
        server.terminate()
        _, err = server.communicate(timeout=60)
    assert "serving base, support on http://127.0.0.1" in err and "API key required" in err
