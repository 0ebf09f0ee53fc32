"""Data-parallel training on CPU: `torchrun --nproc-per-node 2` (gloo) ends with the same adapter as
one process with the same global batch."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from deltatune.train.config_file import load_config
from deltatune.train.loop import train
from helpers_train import make_tiny_model_dir, run_cli, upper_rows, write_config, write_jsonl


@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)
def test_two_processes_match_one(tmp_path):
    model = make_tiny_model_dir(tmp_path / "model")
    data = write_jsonl(tmp_path / "train.jsonl", upper_rows(30))
    # dropout 0: a dropout mask is per process, so only the deterministic update can match exactly
    common = {"max_steps": 4, "grad_accum": 2, "lr": 5e-3, "save_every": 0}
    single = write_config(tmp_path / "one.yaml", model, data, None, tmp_path / "one", batch_size=4, **common)
    double = write_config(tmp_path / "two.yaml", model, data, None, tmp_path / "two", batch_size=2, **common)

    launched = run_cli(
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "deltatune",
        "train",
        str(double),
        "method.lora_dropout=0",
        module="torch.distributed.run",
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert launched.stdout.count("trainable params") == 1  # only rank 0 reports

    train(load_config(single, ["method.lora_dropout=0"]), show_progress=False, log=lambda *_: None)
    one = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    two = load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    assert one.keys() == two.keys()
    assert any(t.abs().sum() > 0 for k, t in one.items() if "lora_B" in k)
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=1e-4, atol=1e-6)
