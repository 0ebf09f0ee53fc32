"""Reliability: property tests over random configs, byte-identical files from the same seed, saves that
fail part way keep the previous adapter, threads never see two adapters mixed in one forward; bad input
to a run (a crafted checkpoint, an output_dir that holds a run, is a file or is read-only, a tokenizer
folder with custom code) stops with one clear error before the model loads and never runs code."""

import ast
import copy
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

import deltatune as dt
import deltatune.io.atomic as atomic
import deltatune.train.loop as loop
import deltatune.train.run.checkpoint as checkpoint
from deltatune.core.config import DeltaConfigError
from deltatune.core.layer import DeltaLayer
from deltatune.train.config_file import load_config
from deltatune.train.loop import train
from helpers_train import ROOT, make_tiny_model_dir, make_tokenizer, run_cli, upper_rows, write_config, write_jsonl
from tiny_models import tiny_llama, token_batch

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

lora_configs = st.fixed_dictionaries({
    "r": st.integers(1, 6),
    "lora_alpha": st.floats(0.5, 16),
    "target_modules": st.lists(st.sampled_from(PROJECTIONS), min_size=1, max_size=4, unique=True),
    "layers_to_transform": st.one_of(st.none(), st.lists(st.sampled_from([0, 1]), min_size=1, unique=True)),
    "use_dora": st.booleans(),
    "use_rslora": st.booleans(),
    "init_lora_weights": st.sampled_from([True, "gaussian", "pissa", "olora"]),
})
SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def expected_targets(model, config) -> set[str]:
    """The targeting rule written out independently: suffix match on a projection, layer index filter."""
    names = set()
    for name, module in model.named_modules():
        parts = name.split(".")
        if parts[-1] in config["target_modules"] and isinstance(module, torch.nn.Linear):
            layer = int(parts[2])
            if config["layers_to_transform"] is None or layer in config["layers_to_transform"]:
                names.add(name)
    return names


@SETTINGS
@given(config=lora_configs, seed=st.integers(0, 1000))
def test_random_configs_keep_every_promise(config, seed, tmp_path_factory):
    base = tiny_llama(seed % 3)
    reference = copy.deepcopy(base).requires_grad_(False)
    expected = expected_targets(base, config)
    torch.manual_seed(seed)
    model = dt.get_peft_model(base, dt.LoraConfig(**config))
    adapted = {n for n, m in model.model.named_modules() if isinstance(m, DeltaLayer)}
    assert adapted == expected
    ids = token_batch(2, 5, seed=seed)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.2)
        before = {n: p.clone() for n, p in model.named_parameters() if ".base_layer." in n}
        unmerged = model(ids).logits
        model.merge_adapter()
        torch.testing.assert_close(model(ids).logits, unmerged, atol=1e-4, rtol=1e-4)
        model.unmerge_adapter()
        for name, param in model.named_parameters():
            if name in before:
                torch.testing.assert_close(param, before[name], atol=1e-5, rtol=1e-5)
        folder = tmp_path_factory.mktemp("adapter")
        model.save_pretrained(folder)
        fresh = copy.deepcopy(reference)
        loaded = dt.DeltaModel.from_pretrained(fresh, folder)
        torch.testing.assert_close(loaded(ids).logits, unmerged, atol=0, rtol=0)


SAVE_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
import deltatune as dt
from tiny_models import tiny_llama
torch.manual_seed(3)
model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules="all-linear", use_dora=True,
                                                       init_lora_weights="gaussian"))
model.save_pretrained(sys.argv[1])
"""


def test_same_seed_and_config_give_byte_identical_files_across_processes(tmp_path):
    script = SAVE_SCRIPT.format(tests=str(Path(__file__).parent))
    for run in ("one", "two"):
        subprocess.run([sys.executable, "-c", script, str(tmp_path / run)], check=True)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_a_save_that_fails_part_way_keeps_the_previous_adapter(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    good = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def disk_full(fd):  # the temporary file holds part of the data when the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", disk_full)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(1.0)
    with pytest.raises(OSError, match="No space"):
        model.save_pretrained(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == good  # no temp files, nothing changed
    dt.DeltaModel.from_pretrained(tiny_llama(), tmp_path)  # still loads


def test_switching_adapters_in_one_thread_never_mixes_them_in_another(tmp_path):
    torch.manual_seed(0)
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules="all-linear"), adapter_name="a")
    model.add_adapter("b", dt.LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".adapters." in name:
                param.normal_(0, 0.5)
    ids = token_batch(2, 6)
    with torch.no_grad():
        expected = {}
        for name in ("a", "b"):
            model.set_adapter(name)
            expected[name] = model(ids).logits
    stop, seen, errors = threading.Event(), [], []

    def reader() -> None:
        with torch.no_grad():
            while not stop.is_set():
                out = model(ids).logits
                match = [n for n, ref in expected.items() if torch.equal(out, ref)]
                seen.append(match[0] if match else "MIXED")

    def switcher() -> None:
        try:
            for i in range(60):
                model.set_adapter("ab"[i % 2])
                if i % 20 == 0:
                    model.save_pretrained(tmp_path / str(i), selected_adapters=["b"])
                    model.load_adapter(tmp_path / str(i) / "b", adapter_name="c")
                    model.delete_adapter("c")
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=reader), threading.Thread(target=switcher)]
    threads[0].start()
    threads[1].start()
    threads[1].join()
    stop.set()
    threads[0].join()
    assert not errors and seen and "MIXED" not in seen


# ------------------------------------------------------------------ no file a run reads runs code
UNPICKLERS = {"pickle", "dill", "marshal", "shelve", "joblib", "cloudpickle"}
RISKY_KEYWORDS = {("weights_only", False), ("trust_remote_code", True), ("allow_pickle", True)}


def risky_uses(source: str) -> list[str]:
    """Calls and imports that can run code read from a file: torch.load, pickle and kin, eval/exec,
    weights_only=False, trust_remote_code=True, allow_pickle=True (as an argument or a default)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            found += [f"import {n}" for n in names if n and n.split(".")[0] in UNPICKLERS]
        elif isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            if name in ("eval", "exec", "torch.load", "np.load", "numpy.load") or \
                    name.split(".")[0] in UNPICKLERS:
                found.append(ast.unparse(node))
            found += [ast.unparse(node) for k in node.keywords
                      if isinstance(k.value, ast.Constant) and (k.arg, k.value.value) in RISKY_KEYWORDS]
        elif isinstance(node, ast.arguments):
            pairs = zip((node.posonlyargs + node.args)[::-1], node.defaults[::-1])
            found += [f"default {a.arg}={d.value}"
                      for a, d in [*pairs, *zip(node.kwonlyargs, node.kw_defaults)]
                      if isinstance(d, ast.Constant) and (a.arg, d.value) in RISKY_KEYWORDS]
    return found


# every use that may run code from a file, with the reason it is safe; a new use fails the test below
ALLOWED = {
    ("io/adapter_files.py", "torch.load(str(pickled), map_location='cpu', weights_only=True)"):
        "adapter_model.bin is read only when the caller opts in with allow_pickle=True, and then only "
        "through torch's weights-only unpickler",
}


def test_no_file_a_run_reads_is_unpickled_and_every_risky_call_has_a_reason():
    src = Path(dt.__file__).parent
    found = {(str(path.relative_to(src)), use) for path in src.rglob("*.py")
             for use in risky_uses(path.read_text(encoding="utf-8"))}
    assert found == set(ALLOWED), f"unreviewed: {found - set(ALLOWED)}; gone: {set(ALLOWED) - found}"
    old = ("import pickle\nstate = torch.load(path, map_location='cpu', weights_only=False)\n"
           "x = eval(text)\ndef load(d, allow_pickle=True):\n"
           "    AutoTokenizer.from_pretrained(d, trust_remote_code=True)\nmodel.eval()")
    assert len(risky_uses(old)) == 6  # the scan finds each kind (and not model.eval())


PAYLOAD = """
import os, pickle, sys
class Payload:
    def __reduce__(self):
        return (os.system, ("touch " + sys.argv[2],))
with open(sys.argv[1], "wb") as handle:
    pickle.dump({"step": 99, "optimizer": Payload()}, handle)
"""


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    return {"root": root, "model": make_tiny_model_dir(root / "model"),
            "train": write_jsonl(root / "train.jsonl", upper_rows(12))}


def run_config(tiny_run, name: str, **training) -> Path:
    return write_config(tiny_run["root"] / f"{name}.yaml", tiny_run["model"], tiny_run["train"], None,
                        tiny_run["root"] / name, **{"max_steps": 4, "save_every": 1, **training})


def test_a_crafted_pickle_in_a_checkpoint_never_runs_on_resume(tiny_run, tmp_path):
    config = run_config(tiny_run, "crafted")
    out = tiny_run["root"] / "crafted"
    train(load_config(config, []), stop_after=2, show_progress=False, log=lambda *_: None)
    marker = tmp_path / "payload-ran"
    newest = checkpoint.list_checkpoints(out)[-1]
    subprocess.run([sys.executable, "-c", PAYLOAD, str(newest / "state.pt"), str(marker)], check=True)
    result = run_cli("train", str(config), "--resume")  # the state.pt of older versions is never read
    assert result.returncode == 0, result.stderr[-2000:]
    assert not marker.exists()
    for folder in checkpoint.checkpoint_folders(out):  # an old-layout checkpoint: only state.pt
        for name in ("state.json", "state.safetensors"):
            (folder / name).unlink()
        subprocess.run([sys.executable, "-c", PAYLOAD, str(folder / "state.pt"), str(marker)], check=True)
    result = run_cli("train", str(config), "--resume")
    assert result.returncode == 2 and not marker.exists()
    assert result.stderr.strip().splitlines() == [
        f"error: --resume: no checkpoint in {out / 'checkpoints'} "
        "(incomplete, not used: step-000002, step-000003)"]


def test_a_run_loads_the_tokenizer_once(tiny_run, monkeypatch):
    """The run loads the tokenizer before the model (to check its data) and hands it to the model loader,
    which used to load a second one and drop it."""
    import deltatune.io.models as models

    loads = []
    real = models.load_tokenizer

    def counted(*args, **kwargs):
        loads.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(models, "load_tokenizer", counted)
    monkeypatch.setattr(loop, "load_tokenizer", counted)
    train(load_config(run_config(tiny_run, "once", max_steps=1), []), show_progress=False, log=lambda *_: None)
    assert len(loads) == 1


def refuse_to_load_a_model(monkeypatch):
    def loaded(*_, **__):
        raise AssertionError("the model was loaded before the output_dir was checked")

    monkeypatch.setattr(loop, "load_tokenizer", loaded)
    monkeypatch.setattr(loop, "load_base", loaded)


def test_a_new_run_refuses_an_output_dir_holding_an_earlier_run_before_the_model_loads(tiny_run, monkeypatch):
    config = load_config(run_config(tiny_run, "earlier"), [])
    out = tiny_run["root"] / "earlier"
    train(config, show_progress=False, log=lambda *_: None)  # finished, with checkpoints
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".deltatune.lock"}
    with monkeypatch.context() as patch:
        refuse_to_load_a_model(patch)
        with pytest.raises(DeltaConfigError) as refused:
            train(config, show_progress=False, log=lambda *_: None)
        with pytest.raises(DeltaConfigError, match="--resume continues .* --overwrite replaces it; pass one"):
            train(config, resume=True, overwrite=True, show_progress=False, log=lambda *_: None)
    assert str(refused.value) == (
        f"output_dir={out} is not empty: it holds a trained adapter (adapter_model.safetensors), "
        "2 checkpoint(s) in checkpoints/ (newest step-000003), adapter_config.json, deltatune_prompt.json, "
        "loss.png, metrics.jsonl, run_config.yaml; pass --resume to continue that run, --overwrite to replace it, "
        "or choose another output_dir")
    assert {p: p.read_bytes() for p in before} == before  # nothing touched
    (out / "notes.txt").write_text("mine")
    train(load_config(run_config(tiny_run, "earlier", max_steps=2), []), overwrite=True, show_progress=False,
          log=lambda *_: None)
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["step-000001"]  # the earlier ones are gone
    records = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [1, 2] and (out / "notes.txt").read_text() == "mine"  # a file of the user's stays


def test_a_crashed_run_in_output_dir_is_refused_and_the_cli_says_so_in_one_line(tiny_run):
    config = run_config(tiny_run, "crashed")
    out = tiny_run["root"] / "crashed"
    train(load_config(config, []), stop_after=2, show_progress=False, log=lambda *_: None)
    result = run_cli("train", str(config))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: output_dir={out} is not empty: it holds 2 checkpoint(s) in checkpoints/ "
        "(newest step-000002), metrics.jsonl, run_config.yaml; pass --resume to continue that run, "
        "--overwrite to replace it, or choose another output_dir"]
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["step-000001", "step-000002"]
    assert run_cli("train", str(config), "--overwrite").returncode == 0


def test_an_output_dir_that_is_a_file_or_read_only_is_refused_before_the_model_loads(tiny_run, tmp_path,
                                                                                    monkeypatch):
    refuse_to_load_a_model(monkeypatch)
    a_file = tmp_path / "out.txt"
    a_file.write_text("not a folder")
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    if os.geteuid() == 0:  # root writes through file modes; a sysfs folder refuses root too
        read_only = Path("/sys/kernel")
    for out, message in ((a_file, "is a file, not a folder"), (read_only, "not writable"),
                         (read_only / "run", "not writable")):
        config = load_config(run_config(tiny_run, "bad_out"), [f"output_dir={out}"])
        with pytest.raises(DeltaConfigError, match=f"output_dir={re.escape(str(out))}: {message}"):
            train(config, show_progress=False, log=lambda *_: None)
    assert a_file.read_text() == "not a folder"


def test_make_demo_runs_again_into_its_own_folder_but_another_folder_needs_overwrite(tiny_run, tmp_path,
                                                                                    monkeypatch):
    from deltatune.train.commands import demo

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("deltatune.models.load_default",
                        lambda: (AutoModelForCausalLM.from_pretrained(tiny_run["model"]), make_tokenizer()))
    fast = ["training.max_steps=1", "eval.max_samples=2", "eval.max_new_tokens=2", "training.precision=fp32",
            "data.max_length=500", "training.batch_size=2"]
    for _ in range(2):
        assert demo.run_demo(overrides=fast, show=0)["steps"] == 1
    assert (tmp_path / "runs" / "demo" / "adapter_model.safetensors").is_file()
    mine = tmp_path / "mine"
    assert demo.run_demo(str(mine), overrides=fast, show=0)["steps"] == 1
    refuse_to_load_a_model(monkeypatch)
    monkeypatch.setattr("deltatune.models.load_default", lambda: pytest.fail("loaded before the check"))
    with pytest.raises(DeltaConfigError, match=f"output_dir={mine} is not empty"):
        demo.run_demo(str(mine), overrides=fast, show=0)


def test_a_prompt_tuning_adapter_loaded_trainable_never_offers_to_run_its_tokenizer_folders_code(tmp_path):
    script = TOKENIZER_CODE.format(tests=str(Path(__file__).parent), root=str(tmp_path),
                                   marker=str(tmp_path / "custom-code-ran"))
    result = subprocess.run([sys.executable, "-c", script], input="y\ny\n", capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    assert not (tmp_path / "custom-code-ran").exists(), result.stdout + result.stderr
    assert "Do you wish to run the custom code" not in result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1] == (
        f"DeltaConfigError tokenizer_name_or_path='{tmp_path / 'tokenizer'}': could not load the tokenizer "
        "for prompt_tuning_init='TEXT' without running custom code (The repository "
        f"{tmp_path / 'tokenizer'} contains custom code which must be executed to correctly load the model. "
        f"You can inspect the repository content at {tmp_path / 'tokenizer'} .)"), result.stderr[-2000:]


TOKENIZER_CODE = """
import json, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import deltatune as dt
from helpers_train import make_tokenizer
from tiny_models import tiny_llama
root = Path({root!r})
folder = root / "tokenizer"
make_tokenizer().save_pretrained(folder)
settings = json.loads((folder / "tokenizer_config.json").read_text())
settings.update(auto_map={{"AutoTokenizer": [None, "custom.CustomTokenizer"]}},
                tokenizer_class="CustomTokenizer")
(folder / "tokenizer_config.json").write_text(json.dumps(settings))
(folder / "custom.py").write_text("open({marker!r}, 'w').close()\\n"
                                  "from transformers import PreTrainedTokenizerFast as CustomTokenizer\\n")
model = dt.get_peft_model(tiny_llama(), dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
model.save_pretrained(root / "adapter")
config = json.loads((root / "adapter" / "adapter_config.json").read_text())
config.update(prompt_tuning_init="TEXT", prompt_tuning_init_text="hello", tokenizer_name_or_path=str(folder))
(root / "adapter" / "adapter_config.json").write_text(json.dumps(config))
try:
    dt.DeltaModel.from_pretrained(tiny_llama(), root / "adapter", is_trainable=True)
    print("loaded")
except Exception as err:
    print(type(err).__name__, err)
"""


def test_the_refusal_counts_checkpoints_as_resume_does(tmp_path):
    """An incomplete `step-*` folder (a crafted or torn one) is not reported as the newest checkpoint."""
    from deltatune.train.run.output_dir import describe

    (tmp_path / "checkpoints" / "step-000005").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-000005" / "state.pt").write_bytes(b"not a checkpoint")
    assert describe(tmp_path, ["checkpoints"]) == "0 checkpoint(s) in checkpoints/ and 1 incomplete one(s)"
