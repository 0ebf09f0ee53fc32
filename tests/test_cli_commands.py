"""The `deltatune` subcommands on a tiny model directory: train, eval, generate, merge, inspect, and one
clear error line (exit status 2) for bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltatune.cli import main
from helpers_train import make_tiny_model_dir, run_cli, upper_rows, write_config, write_jsonl


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny model, data, and an adapter trained through `deltatune train`."""
    root = tmp_path_factory.mktemp("cli")
    model = make_tiny_model_dir(root / "model")
    train_file = write_jsonl(root / "train.jsonl", upper_rows(16))
    eval_file = write_jsonl(root / "eval.jsonl", upper_rows(4, 40))
    config = write_config(root / "run.yaml", model, train_file, eval_file, root / "out", max_steps=3)
    assert main(["train", str(config), "training.log_every=2"]) == 0
    return {"root": root, "model": model, "config": config, "eval": eval_file, "adapter": root / "out"}


def test_train_output(run):
    out = run["adapter"]
    assert {"adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "loss.png"} <= {
        p.name for p in out.iterdir()
    }
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["base_model_name_or_path"] == str(run["model"])
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 2, 3, 3]  # data summary, log_every=2, the last step, then the final evaluation


def test_eval(run, capsys):
    assert main(["eval", str(run["config"])]) == 0
    assert "eval_loss" in capsys.readouterr().out
    assert (
        main(
            [
                "eval",
                "--adapter",
                str(run["adapter"]),
                "--data",
                str(run["eval"]),
                "--max-samples",
                "2",
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    line = capsys.readouterr().out
    assert "exact_match" in line and "eval_samples 2" in line


def test_generate(run, capsys):
    assert (
        main(
            [
                "generate",
                "--adapter",
                str(run["adapter"]),
                "shout apple",
                "shout river",
                "--max-new-tokens",
                "3",
                "--base",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.count("adapter:") == 2 and out.count("base:") == 2


def test_merge_gives_the_same_logits(run, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltatune.train.build import load_adapted

    merged_dir = run["root"] / "merged"
    assert main(["merge", "--adapter", str(run["adapter"]), "--out", str(merged_dir)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    adapted, _ = load_adapted(run["adapter"])
    ids = tokenizer(["shout apple 3", "hello"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(merged(**ids).logits, adapted(**ids).logits, rtol=1e-5, atol=1e-5)
    assert main(["merge", "--adapter", str(run["adapter"]), "--out", str(merged_dir)]) == 2  # not empty
    assert "exists and is not an empty directory" in capsys.readouterr().err


def test_inspect(run, capsys):
    assert main(["inspect", str(run["adapter"])]) == 0
    out = capsys.readouterr().out
    assert "method:       LORA" in out and "rank:         4" in out and "q_proj" in out
    assert "trainable:    4,096 parameters" in out
    assert "vLLM:      yes" in out and "SGLang:    yes" in out and "llama.cpp: yes" in out  # rank 4 <= 16


def test_inspect_explains_what_servers_refuse(run, tmp_path, capsys):
    adapter = tmp_path / "dora"
    adapter.mkdir()
    config = json.loads((run["adapter"] / "adapter_config.json").read_text())
    config.update(use_dora=True, modules_to_save=["lm_head"])
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(str(run["adapter"] / "adapter_model.safetensors"))
    tensors["base_model.model.lm_head.weight"] = torch.zeros(4, 4)
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(32)
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    assert main(["inspect", str(adapter)]) == 0
    out = capsys.readouterr().out
    assert "LORA (DoRA)" in out
    vllm, sglang, llama = (
        line for line in out.splitlines() if line.startswith(("  vLLM", "  SGLang", "  llama"))
    )
    assert "DoRA" in vllm and "modules_to_save" in vllm and "rank" not in vllm
    assert "DoRA" in sglang and "modules_to_save" in sglang
    assert "lm_head" in llama


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "missing.yaml"], "config file 'missing.yaml' not found"),
        (["inspect", "/nonexistent"], "no adapter_config.json"),
        (["eval", "--adapter", "/nonexistent", "--data", "x.jsonl"], "data file not found"),
    ],
)
def test_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_bad_config_stops_before_loading_a_model(run, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    fresh = f"output_dir={tmp_path / 'out'}"  # the fixture's output_dir holds a run, refused on its own
    argv = ["train", str(run["config"]), fresh, f"data.train={bad}", "model.name_or_path=/nonexistent"]
    assert main(argv) == 2
    assert "bad.jsonl:2: missing field 'completion'" in capsys.readouterr().err
    assert main(["train", str(run["config"]), "training.lrr=1"]) == 2
    assert "did you mean 'training.lr'" in capsys.readouterr().err
    assert main(["train", str(run["config"]), fresh, "model.name_or_path=/nonexistent"]) == 2
    assert "not a local directory and not a known alias" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    result = run_cli("--help", timeout=120)
    assert result.returncode == 0
    for command in ("demo", "train", "eval", "generate", "merge", "inspect"):
        assert command in result.stdout


def test_eval_and_generate_take_a_peft_adapter(run, capsys):
    import peft
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(run["model"]),
        peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    model.save_pretrained(run["root"] / "peft_adapter")
    adapter = str(run["root"] / "peft_adapter")
    assert main(["eval", "--adapter", adapter, "--data", str(run["eval"]), "--max-samples", "0"]) == 0
    assert "eval_loss" in capsys.readouterr().out
    assert main(["generate", "--adapter", adapter, "shout apple", "--max-new-tokens", "3"]) == 0
    assert main(["inspect", adapter]) == 0
    assert "vLLM:      yes" in capsys.readouterr().out


def test_train_resume_flag(run, capsys):
    out = str(run["root"] / "resumable")
    args = ["train", str(run["config"]), f"output_dir={out}", "training.save_every=2", "training.max_steps=4"]
    assert main(args + ["--resume"]) == 2
    assert "--resume: no checkpoint in" in capsys.readouterr().err
    assert main(args) == 0
    first = load_file(f"{out}/adapter_model.safetensors")
    assert main(args + ["--resume"]) == 0  # continues from step 2 and redoes 3-4
    assert "resuming from" in capsys.readouterr().out
    again = load_file(f"{out}/adapter_model.safetensors")
    for key in first:
        torch.testing.assert_close(first[key], again[key], rtol=0, atol=1e-6)
