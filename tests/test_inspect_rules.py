"""`deltatune inspect`: one test per serving rule (issue 14 item 9), and the loader's own validation with
one line per problem, exit status 2 and no traceback (issue 15 item 12).

Adapters are written by hand (a config dict and a few tensors) so each test states exactly the file it
inspects; the loader cross-checks load the same files into a tiny Llama."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import deltatune as dt
import deltatune.io.adapter_files as adapter_files
from deltatune.adapter_report import SOURCES, check_adapter, serving_compatibility
from deltatune.cli import main
from deltatune.core.config import DeltaConfigError
from deltatune.io.adapter_files import AdapterFileError, read_config
from tiny_models import tiny_llama

PREFIX = "base_model.model.model.layers.0."
MODULES = ("self_attn.q_proj", "self_attn.v_proj")  # tiny_llama: hidden 16


def lora_tensors(rank: int = 4, modules=MODULES, hidden: int = 16) -> dict[str, torch.Tensor]:
    """LoRA pairs of `rank` on `modules` of both layers of tiny_llama, under peft's key names."""
    out = {}
    for layer in (0, 1):
        for module in modules:
            out[f"base_model.model.model.layers.{layer}.{module}.lora_A.weight"] = torch.randn(rank, hidden)
            out[f"base_model.model.model.layers.{layer}.{module}.lora_B.weight"] = torch.randn(hidden, rank)
    return out


def write_adapter(directory: Path, tensors: dict | None = None, **config) -> Path:
    rank = config.get("r", 4)
    settings = {"peft_type": "LORA", "r": rank, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
                "bias": "none", **config}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps(settings))
    tensors = lora_tensors(rank) if tensors is None else tensors
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    return directory


def verdicts(directory: Path) -> dict:
    info, problems, _ = check_adapter(directory)
    assert problems == []
    return serving_compatibility(info)


def inspect(directory, capsys) -> tuple[int, str, str]:
    status = main(["inspect", str(directory)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# ---------------------------------------------------------------- vLLM
def test_vllm_rank_4_loads_and_names_the_flag(tmp_path, capsys):
    """The issue's input: a rank-4 LoRA. vLLM loads any rank <= --max-lora-rank (default 16)."""
    vllm = verdicts(write_adapter(tmp_path / "a", r=4))["vLLM"]
    assert vllm.loads and vllm.flags == [] and "--max-lora-rank 8" in vllm.detail
    status, out, _ = inspect(tmp_path / "a", capsys)
    assert status == 0 and re.search(r"vLLM: +yes \(rank 4 <= the default --max-lora-rank 16", out)


@pytest.mark.parametrize("rank, flag", [(1, None), (16, None), (17, 32), (20, 32), (320, 320), (500, 512)])
def test_vllm_rank_above_the_default_needs_the_smallest_allowed_flag(tmp_path, rank, flag):
    vllm = verdicts(write_adapter(tmp_path / "a", r=rank))["vLLM"]
    assert vllm.loads
    assert vllm.flags == ([f"--max-lora-rank {flag}"] if flag else [])


def test_vllm_refuses_a_rank_above_its_largest_max_lora_rank(tmp_path):
    vllm = verdicts(write_adapter(tmp_path / "a", r=600))["vLLM"]
    assert not vllm.loads and "rank 600 > 512" in vllm.reasons[0]


def test_vllm_reads_the_largest_rank_of_rank_pattern(tmp_path):
    tensors = {**lora_tensors(8, MODULES[:1]), **lora_tensors(64, MODULES[1:])}
    vllm = verdicts(write_adapter(tmp_path / "a", tensors, r=8, rank_pattern={"v_proj": 64}))["vLLM"]
    assert vllm.loads and vllm.flags == ["--max-lora-rank 64"]


def test_vllm_refuses_dora(tmp_path):
    tensors = {**lora_tensors(), f"{PREFIX}self_attn.q_proj.lora_magnitude_vector": torch.ones(16)}
    vllm = verdicts(write_adapter(tmp_path / "a", tensors, use_dora=True))["vLLM"]
    assert not vllm.loads and any("DoRA" in r for r in vllm.reasons)


def test_vllm_refuses_modules_to_save(tmp_path):
    tensors = {**lora_tensors(), "base_model.model.lm_head.weight": torch.zeros(64, 16)}
    vllm = verdicts(write_adapter(tmp_path / "a", tensors, modules_to_save=["lm_head"]))["vLLM"]
    assert vllm.reasons == ["modules_to_save=['lm_head'] (vLLM needs it empty)"]


def test_vllm_refuses_tensors_that_are_not_lora_pairs(tmp_path):
    tensors = {**lora_tensors(), "base_model.model.model.norm.weight": torch.ones(16)}
    vllm = verdicts(write_adapter(tmp_path / "a", tensors))["vLLM"]
    assert not vllm.loads and "model.norm.weight" in vllm.reasons[0]


def test_vllm_refuses_adapter_bias(tmp_path):
    vllm = verdicts(write_adapter(tmp_path / "a", bias="lora_only"))["vLLM"]
    assert vllm.reasons == ["bias='lora_only': adapter bias is not supported"]


def test_every_server_refuses_what_is_not_lora(tmp_path):
    tensors = {f"{PREFIX}self_attn.q_proj.hada_w1_a": torch.randn(16, 4)}
    (tmp_path / "a").mkdir()
    save_file(tensors, str(tmp_path / "a" / "adapter_model.safetensors"))
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({"peft_type": "LOHA", "r": 4,
                                                                    "target_modules": ["q_proj"]}))
    for verdict in verdicts(tmp_path / "a").values():
        reason = verdict.reasons[0]  # refused, and the reason names the SVD route to a LoRA
        assert reason.startswith("LOHA adapters are not supported (LoRA only") and "convert --to lora" in reason


# ---------------------------------------------------------------- SGLang
def test_sglang_refuses_dora(tmp_path):
    sglang = verdicts(write_adapter(tmp_path / "a", use_dora=True))["SGLang"]
    assert not sglang.loads and any("DoRA" in r for r in sglang.reasons)


def test_sglang_serves_only_its_target_modules(tmp_path):
    assert verdicts(write_adapter(tmp_path / "ok"))["SGLang"].loads
    tensors = lora_tensors(modules=("self_attn.q_proj", "mlp.fc1"))
    sglang = verdicts(write_adapter(tmp_path / "fc1", tensors))["SGLang"]
    assert sglang.reasons == ["targets ['fc1']; SGLang serves LoRA on q/k/v/o and gate/up/down projections"]


def test_sglang_names_the_rank_and_targets_to_load_after_startup(tmp_path):
    sglang = verdicts(write_adapter(tmp_path / "a", r=48))["SGLang"]
    assert sglang.loads and "--max-lora-rank 48 or more" in sglang.detail
    assert "--lora-target-modules q_proj v_proj" in sglang.detail


def test_sglang_refuses_full_tensors(tmp_path):
    tensors = {**lora_tensors(), "base_model.model.lm_head.weight": torch.zeros(64, 16)}
    sglang = verdicts(write_adapter(tmp_path / "a", tensors, modules_to_save=["lm_head"]))["SGLang"]
    assert not sglang.loads and "lm_head" in sglang.reasons[0]


# ---------------------------------------------------------------- llama.cpp
def test_llama_cpp_converts_any_rank_and_norm_weights(tmp_path):
    tensors = {**lora_tensors(600), "base_model.model.model.norm.weight": torch.ones(16)}
    assert verdicts(write_adapter(tmp_path / "a", tensors, r=600))["llama.cpp"].loads


def test_llama_cpp_stops_at_a_tensor_that_is_not_a_lora_half(tmp_path):
    tensors = {**lora_tensors(), "base_model.model.lm_head.weight": torch.zeros(64, 16)}
    llama = verdicts(write_adapter(tmp_path / "a", tensors, modules_to_save=["lm_head"]))["llama.cpp"]
    assert not llama.loads and "lm_head.weight" in llama.reasons[0]


def test_llama_cpp_refuses_dora(tmp_path):
    tensors = {**lora_tensors(), f"{PREFIX}self_attn.q_proj.lora_magnitude_vector": torch.ones(16)}
    llama = verdicts(write_adapter(tmp_path / "a", tensors, use_dora=True))["llama.cpp"]
    assert not llama.loads and any("DoRA" in r for r in llama.reasons)


def test_every_verdict_names_the_server_version_it_was_read_from(tmp_path, capsys):
    status, out, _ = inspect(write_adapter(tmp_path / "a"), capsys)
    assert status == 0
    for server, source in SOURCES.items():
        assert re.search(r"\d", source), server  # a version number
        assert f"rule: {source}" in out, server


# ---------------------------------------------------------------- the loader's validation (issue 15)
def corrupt_files(good: bytes) -> dict[str, bytes]:
    """A valid safetensors file made truncated, or with a header that lies about what follows."""
    n = struct.unpack("<Q", good[:8])[0]
    header = json.loads(good[8:8 + n])
    key = next(k for k in header if k != "__metadata__")

    def with_header(**change) -> bytes:
        body = json.dumps({**header, key: {**header[key], **change}}).encode()
        return struct.pack("<Q", len(body)) + body + good[8 + n:]

    return {"truncated": good[:-10], "header only": good[:8 + n], "empty": b"", "eight bytes": good[:8],
            "lying shape": with_header(shape=[64, 16]), "lying offsets": with_header(data_offsets=[0, 10**9]),
            "lying length": struct.pack("<Q", 2**40) + good[8:], "trailing bytes": good + b"\0" * 32,
            "unknown dtype": with_header(dtype="Q7")}


def test_truncated_or_lying_safetensors_is_one_line(tmp_path, capsys):
    good = (write_adapter(tmp_path / "good") / "adapter_model.safetensors").read_bytes()
    for name, data in corrupt_files(good).items():
        bad = write_adapter(tmp_path / name.replace(" ", "_"))
        (bad / "adapter_model.safetensors").write_bytes(data)
        status, out, err = inspect(bad, capsys)
        lines = err.splitlines()
        assert status == 2 and out == "" and len(lines) == 1, (name, err)
        expected = f"error: {bad / 'adapter_model.safetensors'}: unreadable or corrupted"
        assert lines[0].startswith(expected), name
        with pytest.raises(AdapterFileError):  # the loader refuses the same file
            dt.DeltaModel.from_pretrained(tiny_llama(), str(bad))


def test_inspect_process_exits_2_without_traceback(tmp_path):
    bad = write_adapter(tmp_path / "bad", lora_tensors(4), r="16", target_modules=5)
    result = subprocess.run([sys.executable, "-m", "deltatune", "inspect", str(bad)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr and result.stdout == ""
    assert len(result.stderr.splitlines()) == 2


def test_invalid_config_fields_one_line_each_as_the_loader_refuses(tmp_path, capsys):
    """The issue's inputs: `r: "16"` and `target_modules: 5`, which inspect used to call fine."""
    both = write_adapter(tmp_path / "both", r="16", target_modules=5, tensors=lora_tensors(4))
    status, out, err = inspect(both, capsys)
    lines = err.splitlines()
    assert status == 2 and out == "" and len(lines) == 2 and all(x.startswith("error: ") for x in lines)
    assert "r='16'" in err and "target_modules=5" in err
    for field, value in {"r": "16", "target_modules": 5, "lora_dropout": 2, "bias": "some"}.items():
        one = write_adapter(tmp_path / field, tensors=lora_tensors(4), **{field: value})
        status, _, err = inspect(one, capsys)
        assert status == 2 and len(err.splitlines()) == 1 and f"{field}={value!r}" in err, field
        with pytest.raises(DeltaConfigError):  # inspect applies the loader's own rule
            read_config(one)


@pytest.mark.parametrize("text, words", [
    ("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object"),
    ('{"r": 4}', "missing required key 'peft_type'"), ('{"peft_type": "LORRA"}', "did you mean 'LORA'")])
def test_unreadable_configs_are_one_line(tmp_path, capsys, text, words):
    adapter = write_adapter(tmp_path / "a")
    (adapter / "adapter_config.json").write_text(text)
    status, _, err = inspect(adapter, capsys)
    assert status == 2 and len(err.splitlines()) == 1 and words in err


def test_config_linked_outside_the_directory_is_refused(tmp_path, capsys):
    outside = write_adapter(tmp_path / "elsewhere")
    adapter = write_adapter(tmp_path / "a")
    (tmp_path / "notes.txt").write_text("not a config")
    for target in (outside / "adapter_config.json", tmp_path / "notes.txt", tmp_path / "missing.json"):
        (adapter / "adapter_config.json").unlink()
        (adapter / "adapter_config.json").symlink_to(target)
        status, out, err = inspect(adapter, capsys)
        assert status == 2 and out == "" and len(err.splitlines()) == 1 and "Traceback" not in err, target
        assert "outside the adapter directory" in err or "no adapter_config.json" in err
    # a link inside the directory, and a Hugging Face cache snapshot (links into ../../blobs), are fine
    (adapter / "adapter_config.json").unlink()
    (adapter / "real.json").write_text((outside / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").symlink_to("real.json")
    assert inspect(adapter, capsys)[0] == 0
    blobs, snapshot = tmp_path / "models--x" / "blobs", tmp_path / "models--x" / "snapshots" / "abc"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (blobs / name).write_bytes((outside / name).read_bytes())
        (snapshot / name).symlink_to(Path("../../blobs") / name)
    assert inspect(snapshot, capsys)[0] == 0
    # ... but a directory that is no cache snapshot may not link into someone's blobs
    (adapter / "adapter_config.json").unlink()
    (adapter / "adapter_config.json").symlink_to(blobs / "adapter_config.json")
    status, _, err = inspect(adapter, capsys)
    assert status == 2 and "outside the adapter directory" in err


def test_ranks_the_config_does_not_say_and_half_pairs_are_problems(tmp_path, capsys):
    """A header that lies about the config: the loader refuses it once it meets the model."""
    lying = write_adapter(tmp_path / "lying", tensors=lora_tensors(4), r=8)
    status, _, err = inspect(lying, capsys)
    assert status == 2 and len(err.splitlines()) == 4  # 2 layers x q_proj, v_proj
    assert all(line.endswith("has rank 4, but adapter_config.json gives it r=8") for line in err.splitlines())
    with pytest.raises(AdapterFileError, match="shape mismatch"):
        dt.DeltaModel.from_pretrained(tiny_llama(), str(lying))
    tensors = lora_tensors(4)
    del tensors[f"{PREFIX}self_attn.v_proj.lora_B.weight"]
    half = write_adapter(tmp_path / "half", tensors)
    status, _, err = inspect(half, capsys)
    assert status == 2 and err.splitlines() == [
        f"error: {half / 'adapter_model.safetensors'}: model.layers.0.self_attn.v_proj has no lora_B "
        "(a LoRA needs both halves)"]


def test_keys_the_loader_ignores_are_notes_not_errors(tmp_path, capsys):
    status, out, err = inspect(write_adapter(tmp_path / "a", some_future_key=3), capsys)
    assert status == 0 and err == "" and re.search(r"note: .*some_future_key=3", out)


def test_a_saved_adapter_loads_and_inspects_clean(tmp_path, capsys):
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(str(tmp_path / "a"))
    status, out, err = inspect(tmp_path / "a", capsys)
    assert status == 0 and err == "" and "rank:         4" in out
    assert dt.DeltaModel.from_pretrained(tiny_llama(), str(tmp_path / "a")) is not None


def test_loader_and_inspect_agree_on_links_outside_and_torn_saves(tmp_path, capsys, monkeypatch):
    """The loader refuses what inspect refuses (a config linked outside the folder), and inspect reports
    what the loader refuses (a save interrupted between the weights and the config)."""
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "outside")
    adapter = tmp_path / "linked"
    model.save_pretrained(adapter)
    (adapter / "adapter_config.json").unlink()
    (adapter / "adapter_config.json").symlink_to(tmp_path / "outside" / "adapter_config.json")
    with pytest.raises(AdapterFileError, match="outside the adapter directory"):
        dt.DeltaModel.from_pretrained(tiny_llama(), adapter)

    torn = tmp_path / "torn"
    model.save_pretrained(torn)
    model.peft_config["default"].lora_alpha = 64  # a second save, killed after its weights were renamed in
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(1.0)

    def killed(path, text):
        raise KeyboardInterrupt

    monkeypatch.setattr(adapter_files, "write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(torn)
    monkeypatch.undo()
    with pytest.raises(AdapterFileError, match="interrupted"):
        dt.DeltaModel.from_pretrained(tiny_llama(), torn)
    status, out, err = inspect(torn, capsys)
    assert status == 2 and "interrupted" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("field", ["target_modules", "exclude_modules", "modules_to_save"])
def test_a_list_field_of_the_wrong_type_names_the_field_and_form_in_the_python_api(field):
    for config_class in (dt.LoraConfig, dt.LoHaConfig, dt.IA3Config):
        with pytest.raises(DeltaConfigError, match=rf"^{field}=5: must be a list of strings or a string or null"):
            config_class(**{field: 5})
