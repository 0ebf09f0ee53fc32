"""Bad input to a text-to-image run stops with one line naming the file or field at fault, before training
starts (nothing is written to output_dir); image settings are refused on text runs, unknown image keys get
the nearest valid key."""

from __future__ import annotations

import json

import pytest

from deltatune.cli import main
from image_runs import COLOURS, square, write_config, write_image_folder
from tiny_diffusion import save_tiny_pipeline


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i-inputs")
    items = {name: square(rgb) for name, rgb in COLOURS.items()}
    data = write_image_folder(root / "images", items, {name: f"a {name} square" for name in items})
    return {"root": root, "pipeline": save_tiny_pipeline(root / "pipeline"), "data": data}


def run_fails(files, name: str, capsys, *extra: str, **config) -> str:
    """Run `deltatune train` on a config and return its one error line; checks that it failed with status 2
    and that no adapter, checkpoint or metrics were written."""
    path = write_config(files, name, **config)
    assert main(["train", str(path), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    out = files["root"] / name
    assert not (out / "adapter").exists() and not (out / "metrics.jsonl").exists()
    return err[0]


def data_variant(files, name: str, rows: list, images: dict | None = None) -> str:
    folder = write_image_folder(files["root"] / name, images or {"red": square(COLOURS["red"])})
    (folder / "metadata.jsonl").write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                                                   for r in rows))
    return str(folder)


def test_missing_image_folder(files, capsys):
    line = run_fails(files, "no-folder", capsys, "data.train=" + str(files["root"] / "nowhere"))
    assert "data.train=" in line and "nowhere" in line and "not found" in line


def test_missing_metadata(files, capsys):
    folder = write_image_folder(files["root"] / "no-meta", {"red": square(COLOURS["red"])})
    line = run_fails(files, "no-meta-run", capsys, f"data.train={folder}")
    assert "metadata.jsonl: missing" in line


def test_missing_caption_column(files, capsys):
    folder = data_variant(files, "no-caption", [{"file_name": "red.png", "prompt": "a red square"}])
    line = run_fails(files, "no-caption-run", capsys, f"data.train={folder}")
    assert "metadata.jsonl:1" in line and "'text'" in line and "image.caption_column" in line and "prompt" in line
    # naming that column makes the same folder train
    assert main(["train", str(write_config(files, "caption-ok", {"caption_column": "prompt"}, max_steps=1)),
                 f"data.train={folder}"]) == 0


def test_missing_image_file_and_bad_rows(files, capsys):
    folder = data_variant(files, "no-file", [{"file_name": "red.png", "text": "a"},
                                             {"file_name": "gone.png", "text": "b"}])
    line = run_fails(files, "no-file-run", capsys, f"data.train={folder}")
    assert "metadata.jsonl:2" in line and "gone.png" in line and "not found" in line
    folder = data_variant(files, "bad-json", ['{"file_name": "red.png", "text": '])
    assert "metadata.jsonl:1: not valid JSON" in run_fails(files, "bad-json-run", capsys, f"data.train={folder}")


def test_unreadable_image(files, capsys):
    folder = data_variant(files, "broken", [{"file_name": "red.png", "text": "a"},
                                            {"file_name": "broken.png", "text": "b"}])
    (files["root"] / "broken" / "broken.png").write_bytes(b"not a png at all")
    line = run_fails(files, "broken-run", capsys, f"data.train={folder}")
    assert "broken.png: not a readable image" in line


def test_model_that_is_not_a_pipeline_folder(files, capsys):
    line = run_fails(files, "no-pipeline", capsys, f"model.name_or_path={files['root']}")
    assert "model_index.json is missing" in line


def test_image_settings_are_checked(files, capsys):
    line = run_fails(files, "half-prior", capsys, image={"class_prompt": "a square"})
    assert "image.class_prompt" in line and "image.class_data" in line
    line = run_fails(files, "typo", capsys, image={"resolutoin": 32})
    assert "unknown key image.resolutoin" in line and "image.resolution" in line
    line = run_fails(files, "odd-size", capsys, image={"resolution": 30})
    assert "image.resolution=30" in line and "multiple of 4" in line
    line = run_fails(files, "no-classes", capsys, image={"class_data": str(files["root"] / "none"),
                                                         "class_prompt": "x"})
    assert "image.class_data" in line
    line = run_fails(files, "packed", capsys, "data.packing=true")
    assert "data.packing" in line and "text-to-image" in line


def test_image_settings_on_a_text_run_are_refused(files, capsys):
    path = write_config(files, "text-run")
    assert main(["train", str(path), "model.task=causal_lm", "image.resolution=null", "image.snr_gamma=5"]) == 2
    assert "image.snr_gamma=5.0: is a text-to-image setting; set model.task: text-to-image" in capsys.readouterr().err


def _pipeline_with_target(files, target: str):
    import shutil

    folder = files["root"] / f"pipeline-{target}"
    if not folder.exists():
        shutil.copytree(files["pipeline"], folder)
        path = folder / "scheduler" / "scheduler_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "prediction_type": target}))
    return folder


def test_scheduler_targets(files, capsys):
    """A v-prediction pipeline trains (its target is v); a "sample" target is refused by name."""
    folder = _pipeline_with_target(files, "v_prediction")
    assert main(["train", str(write_config(files, "v-run", max_steps=2)), f"model.name_or_path={folder}"]) == 0
    capsys.readouterr()
    line = run_fails(files, "sample-run", capsys, f"model.name_or_path={_pipeline_with_target(files, 'sample')}")
    assert "prediction_type='sample'" in line and "v_prediction" in line


def test_relative_folders_are_found_next_to_the_config(files, tmp_path, monkeypatch):
    """data.train and image.class_data written relative in the YAML resolve next to the YAML file, as text
    runs' data files do."""
    import yaml

    from deltatune.train import load_config

    path = write_config(files, "relative", {"class_data": "classes-rel", "class_prompt": "a square"})
    raw = yaml.safe_load(path.read_text())
    raw["data"]["train"] = "images"
    path.write_text(yaml.safe_dump(raw))
    write_image_folder(files["root"] / "classes-rel", {"c": square((9, 9, 9))})
    monkeypatch.chdir(tmp_path)  # somewhere else
    config = load_config(path)
    assert config.data.train == str(files["root"] / "images")
    assert config.image.class_data == str(files["root"] / "classes-rel")
