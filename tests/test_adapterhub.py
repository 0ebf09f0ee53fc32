"""AdapterHub interop (issue 17, item 13): bottleneck adapters, stacks and AdapterFusion give the `adapters`
package's outputs for the same weights, on BERT and Llama, in float32 and float64; its files load here and
ours load there; a pickled .bin only with allow_pickle=True; what cannot match is refused by name.

`adapters` 1.3.0 needs transformers 4.57, so it runs in its own environment, .venv-adapters (built by `make
test` from tests/adapters_constraints.txt), through tests/adapterhub_reference.py: one subprocess for the
whole module. Both sides build the tiny base model from the same config and the same weights file.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

from deltatune import (
    AdapterFileError,
    BottleneckConfig,
    DeltaConfigError,
    get_peft_model,
    load_adapterhub,
    save_adapterhub,
)
from deltatune.compose.fusion import add_fusion, stack_adapters

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_PYTHON = ROOT / ".venv-adapters" / "bin" / "python"
MODELS = {
    "bert": (BertModel, BertConfig, {"vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 2,
                                     "num_attention_heads": 2, "intermediate_size": 32}),
    "llama": (LlamaModel, LlamaConfig, {"vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 2,
                                        "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 32}),
}
INPUT_IDS = [[5, 9, 2, 33, 17, 8], [1, 60, 4, 4, 21, 3]]
HOULSBY = "double_seq_bn[reduction_factor=4]"
# Pfeiffer's single adapter after the feed-forward block: on Llama their seq_bn as it is (the adapter reads the
# layer's output h + t); on post-LayerNorm BERT their seq_bn reads LN(h + t), which we refuse, so BERT takes it
# with the residual around the sub-block (original_ln_before=False)
PFEIFFER = {"llama": "seq_bn[reduction_factor=4,scaling=0.5]",
            "bert": "seq_bn[reduction_factor=4,scaling=0.5,original_ln_before=False]"}
# (case, model, their adapter configs, active kind) for adapters written by `adapters`
THEIRS = [(f"{kind}-{model}", model, configs, active)
          for model in MODELS
          for kind, configs, active in [("houlsby", [HOULSBY], "single"), ("pfeiffer", [PFEIFFER[model]], "single"),
                                        ("stack", [HOULSBY, PFEIFFER[model]], "stack"),
                                        ("fuse", [HOULSBY, HOULSBY], "fuse")]]
THEIRS += [("fuse-pfeiffer-llama", "llama", [PFEIFFER["llama"]] * 2, "fuse")]
# ours: (case, model, our config kwargs per adapter, active kind)
OUR_TARGETS = {"bert": r".*(attention\.output|layer\.\d+\.output)\.dense", "llama": None}
OURS = [(f"ours-{kind}-{model}", model, kind) for model in MODELS for kind in ("houlsby", "stack", "fuse")]
OURS += [("ours-pfeiffer-llama", "llama", "pfeiffer")]
DTYPES = ("float32", "float64")
TOLERANCE = {"float32": 1e-5, "float64": 1e-12}  # measured: 4.8e-7 and 0 (bitwise equal)


def base_model(model: str, dtype: str):
    cls, config_cls, config = MODELS[model]
    torch.manual_seed(0)
    return cls(config_cls(**config)).to(getattr(torch, dtype)).eval()


def our_adapters(model: str, kind: str, dtype: str):
    """A DeltaModel with bottleneck adapters "a" (and "b", and a fusion "ab") of random weights."""
    houlsby = BottleneckConfig(bottleneck_type="houlsby", bottleneck_size=4, non_linearity="swish",
                               target_modules=OUR_TARGETS[model], init_weights=False)
    pfeiffer = BottleneckConfig(bottleneck_size=4, scaling=0.5, target_modules=r"layers\.\d+", init_weights=False)
    delta = get_peft_model(base_model(model, dtype), pfeiffer if kind == "pfeiffer" else houlsby, "a")
    if kind in ("stack", "fuse"):
        delta.add_adapter("b", houlsby)
    if kind == "fuse":
        add_fusion(delta, ["a", "b"], "ab")
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in delta.named_parameters():
            if ".adapters." in name:
                param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float64) * 0.2)
    names = {"houlsby": ["a"], "pfeiffer": ["a"], "stack": ["a", "b"], "fuse": ["a", "b"]}[kind]
    return delta.eval(), names


def forward(delta) -> torch.Tensor:
    with torch.no_grad():
        return delta(input_ids=torch.tensor(INPUT_IDS)).last_hidden_state


def activate(delta, kind: str, names: list[str], fusion: str) -> None:
    if kind == "fuse":
        delta.set_adapter(fusion)
    else:
        stack_adapters(delta, names)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Runs every job of the module through `adapters` once; returns (folder, our models and outputs)."""
    if not REFERENCE_PYTHON.is_file():
        pytest.fail(f"{REFERENCE_PYTHON} is missing: `make test` builds it (the `adapters` package needs "
                    "transformers 4.57, pinned in tests/adapters_constraints.txt)")
    root = tmp_path_factory.mktemp("adapterhub")
    jobs, ours = [], {}
    for dtype in DTYPES:
        for model in MODELS:
            weights = root / f"base-{model}-{dtype}.safetensors"
            save_file({k: v.contiguous() for k, v in base_model(model, dtype).state_dict().items()}, str(weights))
        common = lambda model, dtype=dtype: {"model": model, "config": MODELS[model][2], "input_ids": INPUT_IDS,  # noqa: E731
                                "dtype": dtype, "base_weights": str(root / f"base-{model}-{dtype}.safetensors")}
        for case, model, configs, active in THEIRS:
            folder = root / dtype / case
            folder.mkdir(parents=True)
            names = ["a", "b"][:len(configs)]
            job = {**common(model), "add": [{"name": n, "config": c} for n, c in zip(names, configs)],
                   "active": {"kind": active, "names": names}, "save": str(folder), "save_bin": True,
                   "out": str(folder / "out.safetensors")}
            if active == "fuse":
                job["fusions"] = [{"names": names}]
            jobs.append(job)
        for case, model, kind in OURS:
            folder = root / dtype / case
            delta, names = our_adapters(model, kind, dtype)
            for name in delta.peft_config:
                save_adapterhub(delta, folder / name, name)
            activate(delta, kind, names, "ab")
            ours[(case, dtype)] = forward(delta)
            job = {**common(model), "load": [str(folder / n) for n in names],
                   "active": {"kind": "fuse" if kind == "fuse" else "stack", "names": names},
                   "out": str(folder / "out.safetensors")}
            if kind == "fuse":
                job["fusions"] = [{"names": names, "load": str(folder / "ab")}]
            jobs.append(job)
        for model, config in [("llama", "par_bn[reduction_factor=4]"), ("bert", "par_bn[reduction_factor=4]"),
                              ("bert", "seq_bn[reduction_factor=4]")]:
            folder = root / dtype / f"refused-{config.split('[')[0]}-{model}"
            folder.mkdir(parents=True)
            jobs.append({**common(model), "add": [{"name": "a", "config": config}], "save": str(folder)})
    (root / "jobs.json").write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of ours or the main venv there
    run = subprocess.run([str(REFERENCE_PYTHON), str(ROOT / "tests" / "adapterhub_reference.py"),
                          str(root / "jobs.json")], capture_output=True, text=True, timeout=300,
                         env={**env, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    return root, ours


def their_output(folder: Path) -> torch.Tensor:
    return load_file(str(folder / "out.safetensors"))["last_hidden_state"]


def assert_equal_outputs(ours: torch.Tensor, theirs: torch.Tensor, base: torch.Tensor, dtype: str) -> None:
    assert ours.dtype == theirs.dtype == getattr(torch, dtype)
    assert (theirs - base).abs().max() > 1e-2  # the adapters change the output: the comparison can fail
    torch.testing.assert_close(ours, theirs, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case,model,configs,active", THEIRS, ids=[c[0] for c in THEIRS])
def test_adapters_written_by_adapters_load_with_their_outputs(reference, case, model, configs, active, dtype):
    root, _ = reference
    folder = root / dtype / case
    names = ["a", "b"][:len(configs)]
    base = forward(base_model(model, dtype))
    delta = load_adapterhub(base_model(model, dtype), folder / "a")
    for name in names[1:]:
        load_adapterhub(delta, folder / name)
    if active == "fuse":
        load_adapterhub(delta, folder / "fusion")
        assert "a,b" in delta.peft_config
    activate(delta, active, names, "a,b")
    assert_equal_outputs(forward(delta), their_output(folder), base, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case,model,kind", OURS, ids=[c[0] for c in OURS])
def test_our_adapters_load_in_adapters_with_our_outputs(reference, case, model, kind, dtype):
    root, ours = reference
    folder = root / dtype / case
    assert_equal_outputs(ours[(case, dtype)], their_output(folder), forward(base_model(model, dtype)), dtype)
    config = json.loads((folder / "a" / "adapter_config.json").read_text())
    assert config["config"]["mh_adapter"] == (kind != "pfeiffer") and config["version"] == "adapters.1.3.0"


def test_a_pickled_bin_loads_only_with_allow_pickle(reference):
    root, _ = reference
    folder = root / "float32" / "houlsby-llama"
    with pytest.raises(AdapterFileError, match=r"pytorch_adapter\.bin.*allow_pickle=True"):
        load_adapterhub(base_model("llama", "float32"), folder / "a.bin")
    delta = load_adapterhub(base_model("llama", "float32"), folder / "a.bin", allow_pickle=True)
    assert_equal_outputs(forward(delta), their_output(folder), forward(base_model("llama", "float32")), "float32")


@pytest.mark.parametrize("folder,model,field", [
    ("refused-par_bn-llama", "llama", "is_parallel"), ("refused-par_bn-bert", "bert", "is_parallel"),
    ("refused-seq_bn-bert", "bert", "original_ln_before")])
def test_configs_we_cannot_reproduce_are_refused_by_name(reference, folder, model, field):
    root, _ = reference
    plain = base_model(model, "float32")
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    with pytest.raises(DeltaConfigError, match=f"`{field}: true` cannot be loaded"):
        load_adapterhub(plain, root / "float32" / folder / "a")
    assert all(torch.equal(v, before[k]) for k, v in plain.state_dict().items())  # the model is untouched


def test_adapters_without_an_adapterhub_form_are_refused_before_writing(tmp_path):
    parallel = get_peft_model(base_model("llama", "float32"), BottleneckConfig(bottleneck_type="parallel"))
    with pytest.raises(DeltaConfigError, match="bottleneck_type 'parallel'"):
        save_adapterhub(parallel, tmp_path / "p")
    block = get_peft_model(base_model("bert", "float32"), BottleneckConfig(bottleneck_type="houlsby"))
    with pytest.raises(DeltaConfigError, match=r"'encoder\.layer\.0\.attention\.output'.*no AdapterHub place"):
        save_adapterhub(block, tmp_path / "b")
    assert not (tmp_path / "p").exists() and not (tmp_path / "b").exists()


def test_cli_converts_adapterhub_folders_both_ways(reference, tmp_path):
    """`deltatune convert --from adapterhub` onto a causal LM saved on disk (their keys are LlamaModel's, ours
    sit under `model.`), then `--to adapterhub` back: the same tensors under the same keys."""
    from transformers import LlamaForCausalLM

    from deltatune import DeltaModel
    from deltatune.cli import main

    root, _ = reference
    folder = root / "float32" / "houlsby-llama"
    causal = LlamaForCausalLM(LlamaConfig(**MODELS["llama"][2])).eval()
    causal.model.load_state_dict(base_model("llama", "float32").state_dict())
    causal.save_pretrained(tmp_path / "base")
    assert main(["convert", "--from", "adapterhub", "--adapter", str(folder / "a"), "--base",
                 str(tmp_path / "base"), "--out", str(tmp_path / "ours")]) == 0
    delta = DeltaModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp_path / "base"), str(tmp_path / "ours"))
    with torch.no_grad():
        hidden = delta.model.model(input_ids=torch.tensor(INPUT_IDS)).last_hidden_state
    assert_equal_outputs(hidden, their_output(folder), forward(base_model("llama", "float32")), "float32")
    assert main(["convert", "--to", "adapterhub", "--adapter", str(tmp_path / "ours"), "--out",
                 str(tmp_path / "back")]) == 0
    original, back = (load_file(str(d / "adapter.safetensors")) for d in (folder / "a", tmp_path / "back"))
    renamed = {k.replace(".adapters.a.", ".adapters.default."): v for k, v in original.items()}
    assert renamed.keys() == back.keys() and all(torch.equal(renamed[k], back[k]) for k in back)
    assert main(["convert", "--from", "adapterhub", "--adapter", str(folder / "a.bin"), "--base",
                 str(tmp_path / "base"), "--out", str(tmp_path / "refused")]) == 2  # pickled: needs --allow-pickle


@pytest.mark.parametrize("field,value", [("ln_before", True), ("use_gating", True), ("phm_layer", True),
                                         ("original_ln_after", False), ("scaling", "learned"),
                                         ("reduction_factor", {"0": 2, "default": 4}), ("non_linearity", "gelu_new")])
def test_every_field_we_cannot_reproduce_is_named(tmp_path, field, value):
    """A config as `adapters` writes it (double_seq_bn) with one field changed: refused by that field's name
    before any file is read or the model is touched."""
    conf = {"mh_adapter": True, "output_adapter": True, "reduction_factor": 4, "non_linearity": "swish",
            "original_ln_before": False, field: value}
    (tmp_path / "adapter_config.json").write_text(json.dumps({"config": conf, "name": "a"}))
    with pytest.raises(DeltaConfigError, match=f"`{field}: {json.dumps(value)}` cannot be loaded"):
        load_adapterhub(base_model("llama", "float32"), tmp_path)
