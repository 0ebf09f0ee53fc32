"""Run-config validation: every error names the key, unknown keys suggest the nearest valid one, and
nothing here loads a model."""

from __future__ import annotations

import re

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
    (tmp_path / "t.jsonl").write_text('{"text": "a"}\n')
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
        ("training.offload_checkpoints=true",
         r"training.offload_checkpoints=True: offloads what gradient checkpointing"),
        ("training.lr=fast", r"training.lr='fast': must be a number$"),
        ("training.precision=fp8", r"training.precision='fp8'"),
        ("data.format=parquet", r"data.format='parquet'"),
        ("data.max_length=2", r"data.max_length=2"),
        ("model.dtype=float8", r"model.dtype='float8'"),
        ("training.gradient_checkpointing=maybe", r"training.gradient_checkpointing='maybe': must be true or false$"),
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
    from deltatune.train.run.runtime import make_accelerator

    with pytest.raises(DeltaConfigError, match="fp16 autocast needs a CUDA GPU"):
        make_accelerator("fp16")


@pytest.mark.parametrize(
    "name", ["demo.yaml", "own_data.yaml", "alpaca_plain_packed.yaml", "classification.yaml"]
)
def test_example_configs_are_valid(name, monkeypatch):
    from pathlib import Path

    from deltatune.train.build import check_data_files, read_samples

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # where the command in its first line runs
    path = Path(__file__).resolve().parents[1] / "examples" / name
    assert path.read_text().startswith(f"# deltatune train examples/{name}\n")  # the command that runs it
    config = load_config(path)
    check_data_files(config.data)
    for data_file in filter(None, (config.data.train, config.data.eval)):
        samples, _ = read_samples(data_file, config.data)
        assert samples


def test_demo_yaml_is_the_demo():
    from pathlib import Path

    from deltatune.train.commands.demo import demo_config

    example = load_config(Path(__file__).resolve().parents[1] / "examples" / "demo.yaml")
    demo = demo_config()
    assert example.method == demo.method and example.training == demo.training and example.eval == demo.eval
    assert (example.data.train, example.data.eval) == (demo.data.train, demo.data.eval)


def float_fields() -> list[str]:
    """Every field of every run-config section, and of the LoRA method, that takes a float."""
    import dataclasses
    import typing

    from deltatune.core.config import config_class
    from deltatune.train.config import SECTIONS

    classes = {**SECTIONS, "method": config_class("lora")}
    found = []
    for section, cls in classes.items():
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[f.name]
            if float in (typing.get_args(hint) or (hint,)):
                found.append(f"{section}.{f.name}")
    return found


def test_float_fields_are_found():
    fields = float_fields()  # the table below is not empty by accident
    assert {"training.lr", "training.weight_decay", "training.epochs", "training.max_grad_norm"} <= set(fields)
    assert {"method.lora_alpha", "method.lora_dropout"} <= set(fields)


@pytest.mark.parametrize("field", float_fields())
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "inf", "nan"])
def test_non_finite_floats_are_refused_by_field(tmp_path, field, value):
    """`training.lr: .inf` passed every `> 0` check and trained to an all-NaN adapter (issue 15, 6)."""
    path = write(tmp_path, "training:\n  max_steps: 3\n")  # the finiteness check comes first
    with pytest.raises(DeltaConfigError, match=rf"^{re.escape(field)}=-?(inf|nan): must be a finite number$"):
        load_config(path, [f"{field}={value}"])


def test_non_finite_values_inside_mappings_and_python_sections():
    from deltatune.train.config import TrainingSection

    with pytest.raises(DeltaConfigError, match=r"^method.alpha_pattern.q_proj=nan: must be a finite number$"):
        build_method_config({"name": "lora", "alpha_pattern": {"q_proj": float("nan")}})
    with pytest.raises(DeltaConfigError, match=r"^training.lr=inf: must be a finite number$"):
        TrainingSection(lr=float("inf"))
    with pytest.raises(DeltaConfigError, match=r"^training.weight_decay=inf: must be a finite number$"):
        TrainingSection(weight_decay=float("inf"))


@pytest.mark.parametrize(
    "override, message",
    [
        ("method.target_modules=5", "method.target_modules=5: must be a list of strings or a string or null"),
        ("method.target_modules=[q_proj, 3]",
         "method.target_modules=['q_proj', 3]: must be a list of strings or a string or null"),
        ("method.r=abc", "method.r='abc': must be an integer"),
        ("method.use_dora=maybe", "method.use_dora='maybe': must be true or false"),
        ("training.lr=abc", "training.lr='abc': must be a number"),
        ("training.max_steps=1.5", "training.max_steps=1.5: must be an integer or null"),
        ("data.packing=3", "data.packing=3: must be true or false"),
    ],
)
def test_wrong_types_name_the_field_and_the_expected_form(tmp_path, override, message):
    path = write(tmp_path, "training:\n  max_steps: 3\n")
    with pytest.raises(DeltaConfigError) as caught:
        load_config(path, [override])
    assert str(caught.value) == message


def test_method_values_take_the_field_types():
    """YAML 1.1 reads `1e-3` as a string; a method float takes it, an int stays an int (peft's files)."""
    config = load_config(None, ["method.lora_dropout=1e-3", "method.lora_alpha=16"])
    assert config.method["lora_dropout"] == pytest.approx(1e-3) and config.method["lora_alpha"] == 16
    assert isinstance(config.method["lora_alpha"], int)
    assert config.method_config().lora_dropout == pytest.approx(1e-3)


def test_invalid_yaml_is_one_line_naming_the_place(tmp_path):
    with pytest.raises(DeltaConfigError) as caught:
        parse_override("training.lr=[unclosed")
    assert str(caught.value) == (
        "override 'training.lr=[unclosed': the value is not valid YAML (expected ',' or ']', but got "
        "'<stream end>' at line 1, column 10); expected training.lr=VALUE with a YAML value, e.g. 1e-3, "
        "true, [q_proj, v_proj] or 'quoted text'"
    )
    path = write(tmp_path, "training:\n  lr: [1,\n")
    with pytest.raises(DeltaConfigError) as caught:
        load_config(path)
    assert str(caught.value) == (
        f"{path}:3: not valid YAML (expected the node content, but found '<stream end>' at line 3, "
        "column 1); expected sections of key: value lines"
    )


@pytest.mark.parametrize("name", ["demo.yaml", "own_data.yaml", "alpaca_plain_packed.yaml"])
def test_example_configs_score_on_held_out_rows(name):
    """An example's metric measures learning, not memorising: an eval file with no training row in it
    (classification.yaml's eval split is issue 17 item 10)."""
    from pathlib import Path

    from deltatune.train.build import read_samples

    config = load_config(Path(__file__).resolve().parents[1] / "examples" / name)
    assert config.data.eval, f"{name}: no data.eval, so its run reports no task metric"
    train = {repr(s.messages) for s in read_samples(config.data.train, config.data)[0]}
    held_out = [s for s in read_samples(config.data.eval, config.data)[0] if repr(s.messages) not in train]
    assert len(held_out) == len(read_samples(config.data.eval, config.data)[0])
