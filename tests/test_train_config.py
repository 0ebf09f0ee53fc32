"""Run-config validation: every error names the key, unknown keys suggest the nearest valid one, and
nothing here loads a model."""

from __future__ import annotations

import pytest
import torch

from deltatune.core.config import DeltaConfigError
from deltatune.train.config import build_method_config
from deltatune.train.config_file import from_dict, load_config, parse_override


def write(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_and_yaml_types(tmp_path):
    path = write(tmp_path, "data:\n  train: t.jsonl\ntraining:\n  lr: 1e-3\n  max_steps: 5\n")
    config = load_config(path)
    assert config.training.lr == pytest.approx(1e-3)  # YAML reads 1e-3 as a string; we coerce it
    assert config.training.max_steps == 5 and config.training.epochs is None
    assert config.data.train == str(tmp_path / "t.jsonl")  # relative to the YAML file
    assert config.model.name_or_path == "smollm2-135m"
    assert config.method_config().peft_type == "LORA"
    assert load_config(None).training.epochs == 1.0  # neither max_steps nor epochs: one epoch


def test_overrides(tmp_path):
    path = write(tmp_path, "method:\n  name: lora\n  r: 8\n")
    config = load_config(
        path,
        [
            "method.r=16",
            "training.lr=5e-4",
            "data.packing=true",
            "method.target_modules=[q_proj, v_proj]",
            "output_dir=out/x",
        ],
    )
    assert config.method["r"] == 16 and config.training.lr == pytest.approx(5e-4)
    assert config.data.packing is True and config.output_dir == "out/x"
    assert config.method_config().target_modules == ["q_proj", "v_proj"]
    assert parse_override("model.dtype=bf16") == (["model", "dtype"], "bf16")
    with pytest.raises(DeltaConfigError, match="expected key=value"):
        parse_override("training.lr")


@pytest.mark.parametrize(
    "override, message",
    [
        ("training.lrr=1", r"unknown key training.lrr \(did you mean 'training.lr'\?\)"),
        ("trainin.lr=1", r"unknown key 'trainin' \(did you mean 'training'\?\)"),
        ("max_length=64", r"unknown key 'max_length' \(did you mean 'data.max_length'\?\)"),
        ("data.fromat=text", r"did you mean 'data.format'"),
        ("method.rr=4", r"unknown key method.rr for LORA \(did you mean 'method.r'\?\)"),
        ("method.name=lorra", r"method.name: unknown peft_type 'lorra' \(did you mean 'LORA'\?\)"),
        ("method.r=0", r"method.r=0: must be a positive integer"),
        ("method.lora_dropout=1.5", r"lora_dropout=1.5"),
        ("training.schedule=cosin", r"training.schedule='cosin': must be one of"),
        ("training.batch_size=0", r"training.batch_size=0: must be >= 1"),
        ("training.offload_checkpoints=true", r"training.offload_checkpoints=True: offloads what gradient checkpointing"),
        ("training.lr=fast", r"training.lr='fast': must be float"),
        ("training.precision=fp8", r"training.precision='fp8'"),
        ("data.format=parquet", r"data.format='parquet'"),
        ("data.max_length=2", r"data.max_length=2"),
        ("model.dtype=float8", r"model.dtype='float8'"),
        ("training.epochs=2", r"set either training.max_steps or training.epochs"),
        ("training.gradient_checkpointing=maybe", r"training.gradient_checkpointing='maybe': must be bool"),
    ],
)
def test_bad_values_name_the_key(tmp_path, override, message):
    path = write(tmp_path, "training:\n  max_steps: 3\n")
    with pytest.raises(DeltaConfigError, match=message):
        load_config(path, [override])


def test_bad_files(tmp_path):
    with pytest.raises(DeltaConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(DeltaConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "training: [unclosed\n"))
    with pytest.raises(DeltaConfigError, match="expected a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(DeltaConfigError, match="training=.*must be a mapping"):
        from_dict({"training": 3})


def test_method_section_uses_the_registry():
    config = build_method_config({"name": "LoRA", "r": 4, "use_dora": True, "target_modules": "all-linear"})
    assert config.use_dora and config.r == 4 and config.task_type.value == "CAUSAL_LM"
    assert build_method_config({"r": 4}).peft_type == "LORA"  # name defaults to lora
    with pytest.raises(DeltaConfigError, match="method.name=3: must be a method name"):
        build_method_config({"name": 3})


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 autocast is allowed on CUDA")
def test_fp16_on_cpu_is_refused_before_loading(tmp_path):
    from deltatune.train.runtime import make_accelerator

    with pytest.raises(DeltaConfigError, match="fp16 autocast needs a CUDA GPU"):
        make_accelerator("fp16")


@pytest.mark.parametrize(
    "name", ["demo.yaml", "own_data.yaml", "alpaca_plain_packed.yaml", "classification.yaml"]
)
def test_example_configs_are_valid(name):
    from pathlib import Path

    from deltatune.train.build import check_data_files, read_samples

    path = Path(__file__).resolve().parents[1] / "examples" / name
    assert path.read_text().startswith(f"# deltatune train examples/{name}\n")  # the command that runs it
    config = load_config(path)
    check_data_files(config.data)
    for data_file in filter(None, (config.data.train, config.data.eval)):
        samples, _ = read_samples(data_file, config.data)
        assert samples


def test_demo_yaml_is_the_demo():
    from pathlib import Path

    from deltatune.train.demo import demo_config

    example = load_config(Path(__file__).resolve().parents[1] / "examples" / "demo.yaml")
    demo = demo_config()
    assert example.method == demo.method and example.training == demo.training and example.eval == demo.eval
    assert (example.data.train, example.data.eval) == (demo.data.train, demo.data.eval)
