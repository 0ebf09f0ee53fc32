"""`deltatune export --to kohya` and `deltatune inspect FILE.safetensors` on image-model adapter files: the
export loads in diffusers with the adapters' outputs; each inspect verdict is checked against the tool itself
where it installs here (diffusers, lycoris-lora)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("diffusers")
pytest.importorskip("lycoris")
from deltatune import LoHaConfig, LoKrConfig, LoraConfig, get_peft_model  # noqa: E402
from deltatune.cli import main  # noqa: E402
from deltatune.io.kohya_format import save_kohya  # noqa: E402
from tiny_diffusion import latent_batch, save_tiny_pipeline, tiny_clip_text_encoder, tiny_sd_pipeline, tiny_unet  # noqa: E402

IDS = torch.tensor([[512, 40, 41, 42, 60, 513]])


def _loads_in_diffusers(path) -> bool:
    try:
        tiny_sd_pipeline(0).load_lora_weights(str(path))
    except (ValueError, KeyError, IndexError):
        return False
    return True


def test_export_to_kohya_from_adapter_folders_loads_in_diffusers(tmp_path, capsys):
    pipeline = save_tiny_pipeline(tmp_path / "pipe")
    unet = get_peft_model(tiny_unet(0), LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_v", "conv1"],
                                                   init_lora_weights=False))
    te = get_peft_model(tiny_clip_text_encoder(2), LoraConfig(r=2, lora_alpha=1, target_modules=["out_proj", "fc1"],
                                                              init_lora_weights=False))
    unet.save_pretrained(tmp_path / "unet_adapter")
    te.save_pretrained(tmp_path / "te_adapter")
    out = tmp_path / "style.safetensors"
    assert main(["export", "--to", "kohya", "--pipeline", str(pipeline),
                 "--adapter", f"unet={tmp_path / 'unet_adapter'}",
                 "--adapter", f"text_encoder={tmp_path / 'te_adapter'}",
                 "--out", str(out)]) == 0
    assert "written to" in capsys.readouterr().out
    pipe = tiny_sd_pipeline(0)
    pipe.load_lora_weights(str(out))
    with torch.no_grad():
        assert (pipe.unet(**latent_batch()).sample - unet(**latent_batch()).sample).abs().max() <= 1e-5
        ours = te(input_ids=IDS).last_hidden_state
        assert (pipe.text_encoder(input_ids=IDS).last_hidden_state - ours).abs().max() <= 1e-5

    assert main(["inspect", str(out)]) == 0
    report = capsys.readouterr().out
    assert "format:       kohya LoRA" in report
    assert "diffusers:      yes" in report and "kohya readers:  yes" in report


def test_export_bad_component_is_one_line_error(tmp_path, capsys):
    pipeline = save_tiny_pipeline(tmp_path / "pipe")
    assert main(["export", "--to", "kohya", "--pipeline", str(pipeline), "--adapter", f"vae={tmp_path}",
                 "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "vae" in capsys.readouterr().err


@pytest.mark.parametrize("te_targets,diffusers_loads", [(["q_proj", "k_proj"], False), (["q_proj", "fc2"], True)])
def test_inspect_text_encoder_rule_matches_diffusers(tmp_path, capsys, te_targets, diffusers_loads):
    """diffusers 0.42.1 cannot type a text-encoder LoRA on q/k/v only; inspect says so, and diffusers agrees."""
    te = get_peft_model(tiny_clip_text_encoder(2), LoraConfig(r=2, target_modules=te_targets, init_lora_weights=False))
    path = save_kohya({"text_encoder": te}, tmp_path / "te.safetensors")
    assert _loads_in_diffusers(path) is diffusers_loads
    assert main(["inspect", str(path)]) == 0
    report = capsys.readouterr().out
    assert ("diffusers:      yes" in report) is diffusers_loads
    assert "kohya readers:  yes" in report  # text_model_encoder_layers_<i>_... names, as ComfyUI maps them


def test_inspect_attention_alpha_rule_matches_diffusers(tmp_path, capsys):
    """An attention projection with its own alpha loads in diffusers with the wrong scale (measured here)."""
    unet = get_peft_model(tiny_unet(0), LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k"],
                                                   alpha_pattern={"to_q": 6}, init_lora_weights=False))
    path = save_kohya({"unet": unet}, tmp_path / "a.safetensors")
    pipe = tiny_sd_pipeline(0)
    pipe.load_lora_weights(str(path))
    with torch.no_grad():
        assert (pipe.unet(**latent_batch()).sample - unet(**latent_batch()).sample).abs().max() > 1e-4
    assert main(["inspect", str(path)]) == 0
    assert "attention projections with their own alpha" in capsys.readouterr().out


def test_inspect_dora_rule_matches_diffusers(tmp_path, capsys):
    """diffusers drops dora_scale from kohya files: its output is plain LoRA's, not ours; inspect says no."""
    unet = get_peft_model(tiny_unet(0), LoraConfig(r=2, target_modules=["to_q", "conv1"], use_dora=True,
                                                   init_lora_weights=False))
    with torch.no_grad():  # a trained magnitude: at init m = ||W + dW|| and DoRA's output is LoRA's
        for _, layer in unet.delta_layers():
            layer.adapters["default"].lora_magnitude_vector.mul_(1.5)
    path = save_kohya({"unet": unet}, tmp_path / "d.safetensors")
    pipe = tiny_sd_pipeline(0)
    pipe.load_lora_weights(str(path))
    with torch.no_grad():
        assert (pipe.unet(**latent_batch()).sample - unet(**latent_batch()).sample).abs().max() > 1e-3
    assert main(["inspect", str(path)]) == 0
    report = capsys.readouterr().out
    assert "diffusers:      no - DoRA" in report and "kohya readers:  yes" in report


@pytest.mark.parametrize("config,lycoris_loads", [
    (LoHaConfig(r=2, target_modules=["to_q", "conv1"], init_weights=False), True),
    (LoKrConfig(r=1, target_modules=["conv1"], use_effective_conv2d=True, init_weights=False), False),
])
def test_inspect_lycoris_files(tmp_path, capsys, config, lycoris_loads):
    from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights

    unet = get_peft_model(tiny_unet(0), config)
    path = save_kohya({"unet": unet}, tmp_path / "l.safetensors")
    assert not _loads_in_diffusers(path)
    saved = LycorisNetworkKohya.UNET_TARGET_REPLACE_MODULE  # its default preset collides on a diffusers UNet
    LycorisNetworkKohya.UNET_TARGET_REPLACE_MODULE = ["Transformer2DModel", "ResnetBlock2D"]
    try:
        create_network_from_weights(1.0, None, None, None, tiny_unet(0), weights_sd=load_file(path))
        loaded = True
    except (RuntimeError, AttributeError, ValueError):
        loaded = False
    finally:
        LycorisNetworkKohya.UNET_TARGET_REPLACE_MODULE = saved
    assert loaded is lycoris_loads
    assert main(["inspect", str(path)]) == 0
    report = capsys.readouterr().out
    assert "format:       LyCORIS" in report
    assert "diffusers:      no" in report and "kohya readers:  yes" in report
    assert ("LyCORIS:        yes" in report) is lycoris_loads


def test_inspect_unknown_file_is_one_line_error(tmp_path, capsys):
    from safetensors.torch import save_file

    save_file({"model.layers.0.weight": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    assert main(["inspect", str(tmp_path / "w.safetensors")]) == 2
    assert "model.layers.0.weight" in capsys.readouterr().err
