"""The whole life cycle of an image adapter through the command line, each step checked by the tool that
reads the file: `deltatune train` (text-to-image) -> the run's diffusers file loads with
`pipeline.load_lora_weights()` and gives our denoiser and pipeline outputs; `deltatune export --to kohya`
of the run's adapter folder (no --pipeline: the adapters name it) loads in diffusers the same way; a LoHa
run, which diffusers cannot read, gets no diffusers file and exports as LyCORIS, which `inspect` names."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline

from deltatune import load_diffusers_lora
from deltatune.cli import main
from deltatune.errors import DeltaConfigError
from deltatune.train.image.generate import load_adapted_pipeline
from image_runs import image_files, write_config
from tiny_diffusion import latent_batch

TOL = 1e-5


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return image_files(tmp_path_factory.mktemp("life"))


def outputs(pipe) -> tuple[torch.Tensor, torch.Tensor, object]:
    """UNet output, text-encoder output and a 2-step pipeline image with fixed inputs and generator."""
    with torch.no_grad():
        ids = pipe.tokenizer(["a red square"], return_tensors="pt").input_ids
        image = pipe("a red square", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                     output_type="np", guidance_scale=3.0).images
        return pipe.unet(**latent_batch()).sample, pipe.text_encoder(ids)[0], image


def assert_same(reader, ours) -> None:
    for theirs, mine in zip(outputs(reader), outputs(ours)):
        assert abs(torch.as_tensor(theirs) - torch.as_tensor(mine)).max() <= TOL


def test_a_trained_lora_loads_in_diffusers_with_our_outputs(files, capsys):
    config = write_config(files, "lora", image={"train_text_encoder": True}, max_steps=4)
    assert main(["train", str(config)]) == 0
    run = files["root"] / "lora"
    ours, _ = load_adapted_pipeline(run)
    base = StableDiffusionPipeline.from_pretrained(files["pipeline"])
    moved = abs(outputs(ours)[0] - outputs(base)[0]).max()
    assert moved > 1e-3  # training moved the denoiser: the equalities below compare a real adapter
    base.load_lora_weights(str(run / "adapter" / "diffusers"))
    assert_same(base, ours)
    with pytest.raises(DeltaConfigError, match="already carries a peft adapter"):  # not "Conv2d unsupported"
        load_diffusers_lora(run / "adapter" / "diffusers", {"unet": base.unet, "text_encoder": base.text_encoder})

    capsys.readouterr()
    assert main(["inspect", str(run / "adapter" / "unet")]) == 0  # an image adapter: image tools, not LLM servers
    report = capsys.readouterr().out
    assert "to_out.0" in report and "export --to diffusers" in report and "vLLM" not in report
    assert main(["inspect", str(run / "adapter" / "diffusers")]) == 0  # the folder load_lora_weights reads
    assert "diffusers:      yes" in capsys.readouterr().out
    assert main(["inspect", str(run)]) == 0  # a run: one report per component
    report = capsys.readouterr().out
    assert "adapter/unet" in report and "adapter/text_encoder" in report

    kohya = files["root"] / "lora.safetensors"
    assert main(["export", "--to", "kohya", "--adapter", str(run), "--out", str(kohya)]) == 0  # the run folder
    reader = StableDiffusionPipeline.from_pretrained(files["pipeline"])
    reader.load_lora_weights(str(kohya))
    assert_same(reader, ours)


def test_a_loha_run_exports_as_lycoris(files, capsys):
    config = write_config(files, "loha", method={"name": "loha", "r": 4, "alpha": 4}, max_steps=3)
    assert main(["train", str(config)]) == 0
    adapter = files["root"] / "loha" / "adapter"
    assert (adapter / "unet").is_dir() and not (adapter / "diffusers").exists()
    assert main(["inspect", str(adapter / "unet")]) == 0
    assert "diffusers:     no - diffusers' load_lora_weights reads LoRA and DoRA only" in capsys.readouterr().out
    out = files["root"] / "loha.safetensors"
    assert main(["export", "--to", "kohya", "--adapter", str(adapter), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    report = capsys.readouterr().out
    assert "LyCORIS" in report and "LoHa" in report


def test_a_loha_run_converts_to_a_lora_diffusers_loads(files, capsys):
    """`convert --to lora` on an image run's LoHa (its base is the pipeline folder: the component comes from
    the adapter's folder name), then `export --to diffusers`: diffusers' loader gives the LoHa's outputs (the
    rank covers every layer's update, so the SVD is exact to float32)."""
    run = files["root"] / "loha-convert"
    assert main(["train", str(write_config(files, "loha-convert", method={"name": "loha", "r": 4, "alpha": 4},
                                           max_steps=3))]) == 0
    lora = files["root"] / "converted"
    assert main(["convert", "--to", "lora", "--adapter", str(run / "adapter" / "unet"), "--rank", "16",
                 "--out", str(lora)]) == 0
    assert main(["export", "--to", "diffusers", "--adapter", f"unet={lora}", "--out", str(lora / "diffusers")]) == 0
    ours, _ = load_adapted_pipeline(run)
    reader = StableDiffusionPipeline.from_pretrained(files["pipeline"])
    reader.load_lora_weights(str(lora / "diffusers"))
    with torch.no_grad():
        theirs, mine = reader.unet(**latent_batch()).sample, ours.unet(**latent_batch()).sample
    assert abs(theirs - mine).max() <= 1e-4


def test_convert_reads_a_diffusers_component_folder_as_the_base(files, tmp_path):
    """An adapter made on `pipe.unet` records the component folder (pipe/unet) as its base: convert loads it
    by the class its config.json names."""
    import deltatune as dt
    from deltatune.io.pipelines import load_pipeline

    unet = dt.get_peft_model(load_pipeline(files["pipeline"]).unet, dt.LoKrConfig(r=2, target_modules=["to_q"],
                                                                                    init_weights=False))
    unet.save_pretrained(tmp_path / "lokr")
    assert main(["convert", "--to", "lora", "--adapter", str(tmp_path / "lokr"), "--rank", "32",
                 "--out", str(tmp_path / "lora")]) == 0
    lora = dt.DeltaModel.from_pretrained(load_pipeline(files["pipeline"]).unet, str(tmp_path / "lora"))
    with torch.no_grad():
        assert abs(lora(**latent_batch()).sample - unet(**latent_batch()).sample).max() <= 1e-4


def test_a_text_model_adapter_is_not_exported_as_a_unet(tmp_path, capsys):
    """--component unet on a GPT-2 LoRA: refused naming a module outside a UNet, nothing written."""
    import deltatune as dt
    from tiny_models import tiny_gpt2

    dt.get_peft_model(tiny_gpt2(), dt.LoraConfig(target_modules=["c_attn"])).save_pretrained(tmp_path / "gpt2")
    assert main(["export", "--to", "diffusers", "--component", "unet", "--adapter", str(tmp_path / "gpt2"),
                 "--out", str(tmp_path / "out")]) == 2
    assert "transformer.h.0.attn.c_attn is not in a unet model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
