"""`deltatune serve --engine vllm` on a tiny Llama: the set-up it writes (adapters vLLM's loader rule accepts,
non-LoRA ones converted with their error, the rank choice, the command line), its refusals before any work,
and the hand-off itself, which a fake `vllm` package on PYTHONPATH records."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import deltatune as dt
from deltatune.core.config import DeltaConfigError
from deltatune.io.adapter_files import AdapterFileError
from deltatune.io.inspect import check_adapter
from deltatune.io.serving import vllm_verdict
from deltatune.serve import vllm_handoff
from helpers_train import make_tiny_model_dir

SRC = Path(vllm_handoff.__file__).parents[2]


def save(model_dir: Path, out: Path, config) -> Path:
    torch.manual_seed(0)
    model = dt.get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()  # a LoRA's B starts at zero: give its update something
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A rank-20 LoRA (over vLLM's default max rank 16), a LoHa of rank 2 (its update has rank <= 4) and a DoRA,
    all on the same tiny base."""
    root = tmp_path_factory.mktemp("vllm")
    model_dir = make_tiny_model_dir(root / "model")
    common = {"target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": str(model_dir)}
    return model_dir, {
        "wide": save(model_dir, root / "wide", dt.LoraConfig(r=20, lora_alpha=20, **common)),
        "loha": save(model_dir, root / "loha", dt.LoHaConfig(r=2, alpha=4, init_weights=False, **common)),
        "dora": save(model_dir, root / "dora", dt.LoraConfig(r=4, lora_alpha=8, use_dora=True, **common)),
    }


def namespace(model_dir, adapters, setup, **extra) -> argparse.Namespace:
    values = dict(model=str(model_dir), adapter=[f"{k}={v}" for k, v in adapters.items()], host="127.0.0.1",
                  port=8123, api_key=None, setup_dir=str(setup), setup_only=False, lora_rank=4)
    return argparse.Namespace(**{**values, **extra})


def test_setup_converts_what_vllm_refuses_and_picks_the_rank(adapters, tmp_path, capsys):
    model_dir, dirs = adapters
    setup = tmp_path / "setup"
    assert vllm_handoff.run(namespace(model_dir, dirs, setup, setup_only=True)) == 0
    printed = capsys.readouterr().out
    record = json.loads((setup / "vllm_setup.json").read_text())
    handed = {a["name"]: a for a in record["adapters"]}
    assert not handed["wide"]["converted"] and handed["wide"]["path"] == str(dirs["wide"].resolve())
    assert handed["loha"]["converted"] and handed["dora"]["converted"]
    # the LoHa's update has rank <= r*r = 4, so the rank-4 LoRA carries it up to float noise; DoRA's
    # magnitude rescaling is not low-rank, its error is reported whatever it is
    assert handed["loha"]["relative_error"] < 1e-3 and 0 <= handed["dora"]["relative_error"] < 1
    assert f"relative Frobenius error {handed['loha']['relative_error']:.4f}" in printed
    for entry in handed.values():  # every adapter handed over passes vLLM's loader rule as it is
        info, problems, _ = check_adapter(entry["path"])
        assert problems == [] and vllm_verdict(info).loads
    command = record["command"]
    assert command[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    assert command[command.index("--model") + 1] == str(model_dir.resolve())
    modules = command[command.index("--lora-modules") + 1: command.index("--max-lora-rank")]
    assert modules == [f"{n}={handed[n]['path']}" for n in ("wide", "loha", "dora")]
    # rank 20 is the largest: the smallest value vLLM allows that fits it is 32
    assert command[command.index("--max-lora-rank") + 1] == "32"
    assert command[command.index("--max-loras") + 1] == "3" and "--enable-lora" in command
    assert command[-4:] == ["--host", "127.0.0.1", "--port", "8123"]
    assert (setup / "launch.sh").read_text().splitlines()[-1].startswith("exec " + sys.executable)


def test_refusals_come_before_any_work(adapters, tmp_path):
    model_dir, dirs = adapters
    setup = tmp_path / "setup"
    wide = save(model_dir, tmp_path / "saved", dt.LoraConfig(r=2, target_modules=["q_proj"], bias="all",
                                                             base_model_name_or_path=str(model_dir)))
    with pytest.raises(AdapterFileError, match="bad .*vLLM cannot load it: bias='all'"):
        vllm_handoff.run(namespace(model_dir, {"ok": dirs["wide"], "bad": wide}, setup))
    for values, message in ((["noequals"], "expected NAME=DIR"), ([f"base={dirs['wide']}"], "reserved"),
                            ([f"a={dirs['wide']}", f"a={dirs['loha']}"], "given twice"), ([], "at least one")):
        with pytest.raises(DeltaConfigError, match=message):
            vllm_handoff.run(namespace(model_dir, {}, setup, adapter=values))
    with pytest.raises(DeltaConfigError, match="--lora-rank 1000"):
        vllm_handoff.run(namespace(model_dir, dirs, setup, lora_rank=1000))
    assert not setup.exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="other than a vLLM set-up"):
        vllm_handoff.run(namespace(model_dir, {"wide": dirs["wide"]}, tmp_path / "taken"))


def test_without_vllm_the_setup_stays_and_the_error_names_the_extra(adapters, tmp_path, monkeypatch):
    model_dir, dirs = adapters
    monkeypatch.setattr(vllm_handoff.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"deltatune\[vllm\].*--lora-modules wide="):
        vllm_handoff.run(namespace(model_dir, {"wide": dirs["wide"]}, tmp_path / "setup"))
    assert (tmp_path / "setup" / "launch.sh").is_file()


FAKE_SERVER = """import json, os, sys
json.dump({"argv": sys.argv[1:], "key": os.environ.get("VLLM_API_KEY")}, open(os.environ["FAKE_VLLM_OUT"], "w"))
"""


def test_handoff_execs_vllm_server_with_the_setup_command(adapters, tmp_path):
    model_dir, dirs = adapters
    fake = tmp_path / "fake"
    package = fake / "vllm" / "entrypoints" / "openai"
    package.mkdir(parents=True)
    for folder in (fake / "vllm", fake / "vllm" / "entrypoints", package):
        (folder / "__init__.py").write_text("")
    (package / "api_server.py").write_text(FAKE_SERVER)
    setup, record = tmp_path / "setup", tmp_path / "argv.json"
    call = (f"import argparse; from deltatune.serve import vllm_handoff; "
            f"vllm_handoff.run(argparse.Namespace(**{vars(namespace(model_dir, dirs, setup, api_key='s3cret'))!r}))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), str(SRC)]), "FAKE_VLLM_OUT": str(record)}
    done = subprocess.run([sys.executable, "-c", call], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "starting vLLM" in done.stdout
    seen = json.loads(record.read_text())
    command = json.loads((setup / "vllm_setup.json").read_text())["command"]
    assert seen["argv"] == command[3:]  # the set-up's command, after `python -m MODULE`
    assert seen["key"] == "s3cret" and "s3cret" not in " ".join(command)
    assert "s3cret" not in (setup / "launch.sh").read_text() + (setup / "vllm_setup.json").read_text()
