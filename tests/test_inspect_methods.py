"""`deltatune inspect` on a saved adapter of every registered method shows that method's own size settings
(LoHa/LoKr r and alpha, OFT/BOFT block sizes, VeRA r, soft-prompt lengths ...) and the modules it adapts,
counted independently from the live model's adapted layers (issue 17, item 11). Plus `deltatune --version`
and `deltatune train --help`'s list of config keys."""

from __future__ import annotations

import dataclasses
import re
import typing
from importlib.metadata import version
from pathlib import Path

import pytest

import deltatune as dt
from conformance_rows import ROWS, build
from deltatune.adapter_report import adapter_report
from deltatune.core.layer import DeltaLayer
from deltatune.train.config import RunConfig
from helpers_train import run_cli


def first_row(peft_type: str) -> str:
    return next(row_id for row_id, row in ROWS.items() if row.peft_type == peft_type)


def expected_rank(peft_type: str) -> str:
    """What `rank:` must show for the method's first conformance row, from that row's settings."""
    settings = ROWS[first_row(peft_type)].settings
    pick = lambda *names: ", ".join(f"{n} {settings[n]}" for n in names if n in settings)  # noqa: E731
    return {
        "LORA": f"{settings.get('r')} (lora_alpha {settings.get('lora_alpha')})",
        "RELORA": f"{settings.get('r')} (lora_alpha {settings.get('lora_alpha')})",
        "ADALORA": f"{settings.get('init_r')} (lora_alpha {settings.get('lora_alpha')}, init_r "
                   f"{settings.get('init_r')}, target_r {settings.get('target_r')})",
        "ULORA": f"{settings.get('r')} (lora_alpha 8, num_tasks {settings.get('num_tasks')})",
        "LOHA": pick("r", "alpha"), "LOKR": pick("r", "alpha"), "VERA": pick("r"),
        "OFT": pick("oft_block_size"),
        "BOFT": pick("boft_block_size") + ", boft_n_butterfly_factor 1",  # the default
        "BOTTLENECK": pick("bottleneck_type", "bottleneck_size"),
        "CHILD_TUNING": "child_tuning_mode F, reserve_p 0.3",
        "PROMPT_TUNING": pick("num_virtual_tokens"),
        "P_TUNING": pick("num_virtual_tokens", "encoder_hidden_size"),
        "PREFIX_TUNING": pick("num_virtual_tokens"), "ADAPTION_PROMPT": pick("adapter_len", "adapter_layers"),
        "XLORA": "adapters 2 (0, 1)", "BOTTLENECK_FUSION": "adapter_names a, b",
        "IA3": "-", "LN_TUNING": "-", "BITFIT": "-",  # one vector or bias per module: no size setting
    }[peft_type]


# files with no per-layer tensor: soft prompts (one prompt_embeddings tensor), X-LoRA's gate (its experts'
# layers are in the experts' own adapters)
MODEL_LEVEL = {"PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "XLORA"}


def report_lines(directory: Path) -> dict[str, str]:
    return {key: value.strip() for key, _, value in
            (line.partition(":") for line in adapter_report(directory).splitlines()) if value}


@pytest.mark.parametrize("peft_type", sorted(dt.registered_methods()))
def test_inspect_shows_every_methods_own_rank_and_targets(peft_type, tmp_path):
    row_id = first_row(peft_type)
    row = ROWS[row_id]
    model = build(row_id, "llama" if "llama" in row.families else row.families[0])
    model.save_pretrained(str(tmp_path))
    adapter = "ab" if peft_type == "BOTTLENECK_FUSION" else "default"  # the fusion's own folder
    folder = tmp_path / adapter if adapter != "default" else tmp_path
    lines = report_lines(folder)

    assert lines["rank"] == expected_rank(peft_type)
    if peft_type in MODEL_LEVEL:
        assert lines["targets"].startswith("- (model level: "), lines["targets"]
    elif peft_type == "ADAPTION_PROMPT":  # model level, saved under the attention blocks it prompts
        assert lines["targets"] == f"self_attn ({row.settings['adapter_layers']} modules)"
    else:  # the names and number of the live model's layers that hold the adapter
        layers = [path for path, layer in model.delta_layers()
                  if isinstance(layer, DeltaLayer) and adapter in layer.adapters]
        names = sorted({path.rsplit(".", 1)[-1] for path in layers})
        assert layers and lines["targets"] == f"{', '.join(names)} ({len(layers)} modules)"


def test_loha_replays_the_issue(tmp_path):
    """The issue's case: a LoHa adapter showed `rank: -` and `targets: 0 modules`."""
    model = dt.get_peft_model(build("lora", "llama").unload(),
                              dt.LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(str(tmp_path))
    lines = report_lines(tmp_path)
    assert lines["rank"] == "r 4, alpha 8" and lines["targets"] == "q_proj, v_proj (4 modules)"


# ---------------------------------------------------------------------- --version, train --help
def test_version_prints_the_installed_version():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"deltatune {version('deltatune')}"


def test_train_help_lists_every_config_key_with_its_default():
    """Every field of every section of RunConfig appears as `section.field` in `train --help` with its
    default, so the list cannot drift from src/deltatune/train/config.py."""
    result = run_cli("train", "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # wrapped lines joined
    hints = typing.get_type_hints(RunConfig)
    keys = 0
    for section in dataclasses.fields(RunConfig):
        if not dataclasses.is_dataclass(hints[section.name]):
            continue
        for field in dataclasses.fields(hints[section.name]):
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            shown = {None: "null", True: "true", False: "false"}.get(default, default) \
                if default is None or isinstance(default, bool) else default
            assert re.search(rf" {section.name}\.{field.name} [^\[]*\[{re.escape(str(shown))}\]", text), \
                f"{section.name}.{field.name} [{shown}] missing from train --help"
            keys += 1
    assert keys >= 30 and " method.name a registered method: " in text and " output_dir a string " in text
    for method in dt.registered_methods():
        assert method.lower() in text
