"""Data and models as users have them: Parquet/Arrow files, `save_to_disk` folders, several files or a
folder, column mapping, `data.val_split`, a chosen chat template (all read to the same samples as the
JSON-lines path); a hub id from the local Hugging Face cache, `model.trust_remote_code` as an opt-in;
and examples/README.md listing every config key."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import datasets
import pyarrow.feather as feather
import pytest
import yaml

from deltatune.core.config import DeltaConfigError
from deltatune.train import config_reference
from deltatune.train.build import (
    hold_out,
    load_adapted,
    read_eval_samples,
    read_samples,
    read_train_eval,
    tokenize_samples,
)
from deltatune.train.config import DataSection, ModelSection
from deltatune.train.config_file import load_config
from deltatune.train.data.files import DataError, read_rows
from deltatune.train.data.tokenize import prompt_text, resolve_chat_template
from deltatune.train.run.resume_check import file_fingerprint
from helpers_train import CHATML, ROOT, make_tiny_model_dir, make_tokenizer, upper_rows, write_jsonl

QA = [{"question": f"what is {i} + {i}?", "answer": str(2 * i), "source": "sums"} for i in range(12)]
PC = [{"prompt": r["question"], "completion": r["answer"]} for r in QA]


def messages(samples):
    return [s.messages for s in samples]


def jsonl_reference(tmp_path, rows, data=None):
    samples, fmt = read_samples(str(write_jsonl(tmp_path / "reference.jsonl", rows)), data or DataSection())
    return messages(samples), fmt


def write_source(tmp_path, kind: str, rows: list[dict]) -> str:
    """`rows` written the way a user of `datasets`/pandas/pyarrow would have them; returns data.train."""
    ds = datasets.Dataset.from_list(rows)
    if kind == "parquet":
        ds.to_parquet(str(tmp_path / "d.parquet"))
        return str(tmp_path / "d.parquet")
    if kind == "arrow_stream":  # the shard save_to_disk writes (Arrow IPC stream)
        ds.save_to_disk(str(tmp_path / "saved"))
        return str(next((tmp_path / "saved").glob("*.arrow")))
    if kind == "arrow_file":  # Feather v2 / Arrow IPC file, as pyarrow and pandas write it
        feather.write_feather(ds.data.table, str(tmp_path / "d.arrow"))
        return str(tmp_path / "d.arrow")
    if kind == "save_to_disk":
        ds.save_to_disk(str(tmp_path / "saved"))
        return str(tmp_path / "saved")
    if kind == "datasetdict":
        datasets.DatasetDict(train=ds, test=ds.select([0])).save_to_disk(str(tmp_path / "dd"))
        return str(tmp_path / "dd")
    if kind == "folder":  # shards of mixed types, read in name order
        (tmp_path / "shards").mkdir()
        datasets.Dataset.from_list(rows[:5]).to_parquet(str(tmp_path / "shards" / "a.parquet"))
        write_jsonl(tmp_path / "shards" / "b.jsonl", rows[5:])
        (tmp_path / "shards" / "README.md").write_text("not data")
        return str(tmp_path / "shards")
    raise AssertionError(kind)


SOURCES = ["parquet", "arrow_stream", "arrow_file", "save_to_disk", "datasetdict", "folder"]


@pytest.mark.parametrize("kind", SOURCES)
@pytest.mark.parametrize("rows", [PC, upper_rows(8)], ids=["prompt_completion", "messages"])
def test_each_source_gives_the_samples_of_the_jsonl_file(tmp_path, kind, rows):
    expected, fmt = jsonl_reference(tmp_path, rows)
    samples, found = read_samples(write_source(tmp_path, kind, rows), DataSection())
    assert found == fmt and messages(samples) == expected


def test_a_list_of_files_and_a_glob(tmp_path):
    expected, _ = jsonl_reference(tmp_path, PC)
    write_jsonl(tmp_path / "part1.jsonl", PC[:4])
    datasets.Dataset.from_list(PC[4:]).to_parquet(str(tmp_path / "part2.parquet"))
    listed, _ = read_samples([str(tmp_path / "part1.jsonl"), str(tmp_path / "part2.parquet")], DataSection())
    globbed, _ = read_samples(str(tmp_path / "part*"), DataSection())
    assert messages(listed) == messages(globbed) == expected
    with pytest.raises(DataError, match="no file matches"):
        read_rows(str(tmp_path / "nothing*.parquet"))


def test_yaml_lists_paths_relative_to_its_folder(tmp_path):
    (tmp_path / "cfg").mkdir()
    write_jsonl(tmp_path / "cfg" / "a.jsonl", PC[:3])
    datasets.Dataset.from_list(PC[3:]).to_parquet(str(tmp_path / "cfg" / "b.parquet"))
    (tmp_path / "cfg" / "t.jinja").write_text(CHATML)
    (tmp_path / "cfg" / "run.yaml").write_text(yaml.safe_dump(
        {"data": {"train": ["a.jsonl", "b.parquet"], "val_split": 2, "chat_template": "t.jinja"}}))
    config = load_config(tmp_path / "cfg" / "run.yaml")
    assert config.data.train == [str(tmp_path / "cfg" / "a.jsonl"), str(tmp_path / "cfg" / "b.parquet")]
    assert config.data.chat_template == str(tmp_path / "cfg" / "t.jinja")
    train, _, held, _ = read_train_eval(config.data)
    assert len(train) == len(PC) - 2 and len(held) == 2


def test_bad_rows_in_a_parquet_file_name_the_file_row_and_column(tmp_path):
    rows = [dict(r) for r in PC]
    rows[3]["completion"] = None
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    with pytest.raises(DataError, match=r"d\.parquet:row 3: missing field 'completion'"):
        read_samples(str(tmp_path / "d.parquet"), DataSection())


def test_column_mapping(tmp_path):
    expected, _ = jsonl_reference(tmp_path, PC)
    datasets.Dataset.from_list(QA).to_parquet(str(tmp_path / "qa.parquet"))
    data = DataSection(columns={"prompt": "question", "completion": "answer"})
    samples, fmt = read_samples(str(tmp_path / "qa.parquet"), data)
    assert fmt == "prompt_completion" and messages(samples) == expected
    # a chat column with its own key names inside each message
    chats = [{"conversation": [{"speaker": m["role"], "text": m["content"]} for m in r["messages"]]}
             for r in upper_rows(4)]
    datasets.Dataset.from_list(chats).to_parquet(str(tmp_path / "chat.parquet"))
    data = DataSection(columns={"messages": "conversation", "role": "speaker", "content": "text"})
    samples, fmt = read_samples(str(tmp_path / "chat.parquet"), data)
    assert fmt == "messages" and messages(samples) == jsonl_reference(tmp_path, upper_rows(4))[0]
    with pytest.raises(DataError, match=r"qa\.parquet:row 0: data\.columns\.completion='reply', but the row "
                                        r"has no column 'reply'"):
        read_samples(str(tmp_path / "qa.parquet"), DataSection(columns={"prompt": "question",
                                                                        "completion": "reply"}))
    with pytest.raises(DeltaConfigError, match="data.columns.answer"):
        DataSection(columns={"answer": "answer"})


def test_val_split_is_deterministic_and_independent_of_order_and_seed(tmp_path):
    rows = upper_rows(20)
    write_jsonl(tmp_path / "a.jsonl", rows)
    write_jsonl(tmp_path / "b.jsonl", rows[::-1])
    split = DataSection(train=str(tmp_path / "a.jsonl"), val_split=0.25)
    train, _, held, _ = read_train_eval(split)
    again = read_train_eval(DataSection(train=str(tmp_path / "a.jsonl"), val_split=0.25))
    reordered = read_train_eval(DataSection(train=str(tmp_path / "b.jsonl"), val_split=0.25))
    assert len(held) == 5 and len(train) == 15
    assert messages(again[2]) == messages(held) and messages(again[0]) == messages(train)
    assert sorted(map(json.dumps, messages(reordered[2]))) == sorted(map(json.dumps, messages(held)))
    everything = messages(read_samples(str(tmp_path / "a.jsonl"), DataSection())[0])
    assert sorted(map(json.dumps, messages(train) + messages(held))) == sorted(map(json.dumps, everything))
    assert messages(train) == [m for m in everything if m not in messages(held)]  # file order kept
    assert messages(read_eval_samples(split)[0]) == messages(held)  # `deltatune eval` scores the same rows
    assert len(hold_out(read_samples(str(tmp_path / "a.jsonl"), DataSection())[0], 3)[1]) == 3
    with pytest.raises(DataError, match="leaving none to train on"):
        read_train_eval(DataSection(train=str(tmp_path / "a.jsonl"), val_split=20))
    with pytest.raises(DeltaConfigError, match="data.val_split.*data.eval is set too"):
        DataSection(train="a", eval="b", val_split=0.1)
    with pytest.raises(DeltaConfigError, match="data.val_split=1.5"):
        DataSection(val_split=1.5)


def test_datasetdict_split_choice(tmp_path):
    ds = datasets.Dataset.from_list(PC)
    datasets.DatasetDict(train=ds.select(range(8)), validation=ds.select(range(8, 12))).save_to_disk(
        str(tmp_path / "dd"))
    data = DataSection(train=str(tmp_path / "dd"), eval=str(tmp_path / "dd"))
    train, _, held, _ = read_train_eval(data)
    assert messages(train) == jsonl_reference(tmp_path, PC[:8])[0]
    assert messages(held) == jsonl_reference(tmp_path, PC[8:])[0]  # eval takes the validation split
    chosen, _ = read_samples(str(tmp_path / "dd"), DataSection(split="validation"))
    assert messages(chosen) == messages(held)
    datasets.DatasetDict(a=ds, b=ds).save_to_disk(str(tmp_path / "ab"))
    with pytest.raises(DataError, match=r"splits \['a', 'b'\]; set data.split"):
        read_samples(str(tmp_path / "ab"), DataSection())
    with pytest.raises(DataError, match="data.split='c' is not a split"):
        read_samples(str(tmp_path / "ab"), DataSection(split="c"))


def test_a_folder_laid_out_in_splits_gives_one_split(tmp_path):
    """A dataset folder as the hub lays it out (data/train-*.parquet, data/test-*.parquet): training
    reads the train files only, eval the test files, never both mixed."""
    shards = tmp_path / "hub" / "data"
    shards.mkdir(parents=True)
    (tmp_path / "hub" / "README.md").write_text("---\nlicense: mit\n---\n")
    datasets.Dataset.from_list(PC[:8]).to_parquet(str(shards / "train-00000-of-00001.parquet"))
    datasets.Dataset.from_list(PC[8:]).to_parquet(str(shards / "test-00000-of-00001.parquet"))
    data = DataSection(train=str(tmp_path / "hub"), eval=str(tmp_path / "hub"))
    train, _, held, _ = read_train_eval(data)
    assert messages(train) == jsonl_reference(tmp_path, PC[:8])[0]
    assert messages(held) == jsonl_reference(tmp_path, PC[8:])[0]
    chosen, _ = read_samples(str(tmp_path / "hub"), DataSection(split="test"))
    assert messages(chosen) == messages(held)
    (tmp_path / "two").mkdir()
    write_jsonl(tmp_path / "two" / "dev.jsonl", PC[:2])
    write_jsonl(tmp_path / "two" / "test.jsonl", PC[2:4])
    with pytest.raises(DataError, match=r"holds the splits \['validation', 'test'\]; set data.split"):
        read_samples(str(tmp_path / "two"), DataSection())


def test_no_code_from_a_data_folder_runs_and_datasets_stays_offline(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    script = f"open({str(marker)!r}, 'w').write('script ran')\n"
    folder = tmp_path / "mydata"
    folder.mkdir()
    (folder / "mydata.py").write_text(script)  # the layout of an old `datasets` loading script
    datasets.Dataset.from_list(PC).to_parquet(str(folder / "train.parquet"))
    datasets.Dataset.from_list(PC).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "saved" / "saved.py").write_text(script)
    calls = []
    real = datasets.load_dataset

    def spy(path, *args, **kwargs):
        calls.append((path, kwargs.get("data_files"), datasets.config.HF_HUB_OFFLINE,
                      os.environ.get("HF_DATASETS_OFFLINE")))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    assert len(read_rows(str(folder))) == len(read_rows(str(tmp_path / "saved"))) == len(PC)
    assert not marker.exists()
    assert calls == [("parquet", [str(folder / "train.parquet")], True, "1")]  # a file builder, offline


def test_chat_template_choice(tmp_path):
    tokenizer = make_tokenizer()
    tokenizer.chat_template = None
    plain_jinja = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}" \
                  "{% if add_generation_prompt %}[assistant] {% endif %}"
    (tmp_path / "t.jinja").write_text(plain_jinja)
    make_tokenizer().save_pretrained(tmp_path / "other")  # another model's tokenizer folder
    borrowed = tmp_path / "other"
    assert resolve_chat_template("chatml") == CHATML
    assert resolve_chat_template(plain_jinja) == plain_jinja
    assert resolve_chat_template(str(tmp_path / "t.jinja")) == plain_jinja
    assert resolve_chat_template(str(borrowed)) == CHATML  # another model's template
    with pytest.raises(DataError, match="data.chat_template='nope'"):
        resolve_chat_template("nope")
    with pytest.raises(DeltaConfigError, match="data.chat_template.*data.template=chat"):
        DataSection(template="plain", chat_template="chatml")
    samples, fmt = read_samples(str(write_jsonl(tmp_path / "d.jsonl", PC[:2])), DataSection())
    data = DataSection(chat_template=str(tmp_path / "t.jinja"))
    dataset = tokenize_samples(samples, fmt, tokenizer, data)
    assert prompt_text(samples[0], tokenizer, chat=True) == "[user] what is 0 + 0?\n[assistant] "
    assert tokenizer.decode(dataset.examples[0].input_ids) == "[user] what is 0 + 0?\n[assistant] 0\n"


def test_fingerprint_of_one_file_is_unchanged_and_a_folder_tracks_its_files(tmp_path):
    import hashlib

    (tmp_path / "d").mkdir()
    path = write_jsonl(tmp_path / "d" / "a.jsonl", PC)
    assert file_fingerprint(str(path))["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    before = file_fingerprint(str(tmp_path / "d"))
    write_jsonl(tmp_path / "d" / "b.jsonl", PC[:1])
    assert file_fingerprint(str(tmp_path / "d")) != before


def hub_cache(root, model_dir, repo="org/tiny", revision="0123456789abcdef0123456789abcdef01234567"):
    """`model_dir` laid out as huggingface_hub's cache does: blobs, a snapshot of links, refs/main."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo_dir / "blobs").mkdir()
    for file in model_dir.iterdir():
        blob = repo_dir / "blobs" / f"blob-{file.name}"
        shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(revision)
    return snapshot


QA_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
              "{% if add_generation_prompt %}assistant: {% endif %}"


def test_hub_id_in_the_local_cache_trains_offline_from_parquet(tmp_path):
    """The user's steps: a model fetched earlier into the HF cache, a Parquet file with their own column
    names, no eval file: `deltatune train` with HF_HUB_CACHE set and the network off."""
    model_dir = make_tiny_model_dir(tmp_path / "model")
    hub_cache(tmp_path / "hub", model_dir)
    datasets.Dataset.from_list(QA).to_parquet(str(tmp_path / "qa.parquet"))
    config = {
        "model": {"name_or_path": "org/tiny"},
        "method": {"name": "lora", "r": 2, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": "qa.parquet", "columns": {"prompt": "question", "completion": "answer"},
                 "val_split": 3, "max_length": 64, "chat_template": QA_TEMPLATE},
        "training": {"max_steps": 2, "batch_size": 4},
        "eval": {"max_new_tokens": 2},
        "output_dir": str(tmp_path / "run"),
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_CACHE=str(tmp_path / "hub"),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               HF_HOME=str(tmp_path / "hf_home"))
    result = subprocess.run([sys.executable, "-m", "deltatune", "train", str(tmp_path / "run.yaml")],
                            capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "eval data: 3 rows" in result.stdout and "train data: 9 rows" in result.stdout
    adapter = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "org/tiny"  # loadable again from the same cache
    _, tokenizer = load_adapted(tmp_path / "run", str(model_dir))  # generate/eval render prompts as training
    assert tokenizer.chat_template == QA_TEMPLATE


def test_a_hub_id_not_in_the_cache_is_a_clear_error(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from deltatune.models import ModelNotFoundError, resolve_model

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match=r"'org/absent'.*nor a hub id in the local Hugging Face"):
        resolve_model("org/absent")
    hub_cache(tmp_path, make_tiny_model_dir(tmp_path / "model"), repo="org/here")
    assert (resolve_model("org/here") / "config.json").is_file()


CUSTOM_CONFIG = """from transformers import LlamaConfig
class CustomConfig(LlamaConfig):
    model_type = "deltatune_custom_test"
"""
CUSTOM_MODEL = """import os
open(os.environ["DELTATUNE_MARKER"], "w").write("model code ran")
from transformers import LlamaForCausalLM
from .configuration_custom import CustomConfig
class CustomForCausalLM(LlamaForCausalLM):
    config_class = CustomConfig
"""


def custom_code_model(tmp_path):
    folder = make_tiny_model_dir(tmp_path / "custom")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="deltatune_custom_test", architectures=["CustomForCausalLM"],
                  auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                            "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_custom.py").write_text(CUSTOM_CONFIG)
    (folder / "modeling_custom.py").write_text(CUSTOM_MODEL)
    return folder


def test_trust_remote_code_is_an_explicit_opt_in(tmp_path, monkeypatch):
    from deltatune.train.build import load_base

    folder, marker = custom_code_model(tmp_path), tmp_path / "marker"
    monkeypatch.setenv("DELTATUNE_MARKER", str(marker))
    assert ModelSection().trust_remote_code is False
    with pytest.raises(DeltaConfigError, match=r"model\.trust_remote_code=false: model .* needs Python code"):
        load_base(ModelSection(name_or_path=str(folder)))
    assert not marker.exists()
    # opted in: the model's own class loads (in a fresh process, its code cached under a temporary HF_HOME)
    script = ("from deltatune.train.build import load_base; from deltatune.train.config import ModelSection;"
              f"m, _ = load_base(ModelSection(name_or_path={str(folder)!r}, trust_remote_code=True));"
              "print(type(m).__name__)")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HOME=str(tmp_path / "hf_home"),
               HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1", DELTATUNE_MARKER=str(marker))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("CustomForCausalLM") and marker.read_text() == "model code ran"


def test_examples_readme_lists_every_config_key():
    readme = (ROOT / "examples" / "README.md").read_text(encoding="utf-8")
    described = config_reference.descriptions(readme)
    keys = [key for key, _, _ in config_reference.config_keys()]
    missing = [key for key in keys if not described.get(key)]
    assert not missing, f"examples/README.md does not describe {missing}: run python -m " \
                        "deltatune.train.config_reference --write examples/README.md and describe them"
    assert list(described) == keys  # no row for a key that does not exist
    assert config_reference.regenerate(readme) == readme  # types and defaults as the dataclasses say
    new_keys = ("data.columns", "data.val_split", "data.chat_template", "data.split",
                "model.trust_remote_code")
    assert all(key in described for key in new_keys)
    # the check is not vacuous: a README without one row fails it
    row = next(line for line in readme.splitlines() if line.startswith("| `data.val_split`"))
    assert not config_reference.descriptions(config_reference.regenerate(readme.replace(row + "\n", "")))[
        "data.val_split"]
