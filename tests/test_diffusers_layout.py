"""The diffusers LoRA layout both ways, with diffusers' own loader and writer as the other side
(io/diffusers_layout.py): a deltatune LoRA / DoRA saved with `save_diffusers_lora` loads with
`pipeline.load_lora_weights()` (SD pipeline: UNet + text encoder) or `load_lora_adapter` (SD3 / Flux
transformers) and gives our outputs (denoiser and a whole pipeline call, <= 1e-5 in float32); files diffusers
writes (`save_lora_weights` from peft-adapted components, with and without its metadata, older key forms) load
here with diffusers' outputs. Ranks and alphas that differ per module travel in both directions."""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline
from peft import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import deltatune as dt
from deltatune.io.diffusers_layout import METADATA_KEY, WEIGHTS_NAME
from test_conformance import make_inputs, output, randomize
from tiny_diffusion import latent_batch, tiny_clip_text_encoder, tiny_sd_pipeline
from tiny_models import token_batch

TOL = 1e-5
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1",
                "conv2", "conv_shortcut"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]
# ranks and alphas that differ per module: the per-module values must reach the reader
PATTERNS = dict(rank_pattern={"conv1": 2, "attn2.to_k": 3}, alpha_pattern={"to_v": 3.0, "conv_shortcut": 1.5})
DIT = {"sd3": ("SD3Transformer2DModel", StableDiffusion3Pipeline), "flux": ("FluxTransformer2DModel", FluxPipeline)}


def images(pipe, seed: int = 0):
    """One whole pipeline call: 2 denoising steps, fixed generator, numpy output (batch, 32, 32, 3)."""
    with torch.no_grad():
        return pipe("a red cube", num_inference_steps=2, generator=torch.Generator().manual_seed(seed),
                    output_type="np", guidance_scale=3.0).images


def text_out(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state


def unet_out(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**latent_batch()).sample


def our_pipeline(use_dora: bool, **config):
    """A tiny SD pipeline whose UNet (LoRA or DoRA) and text encoder (LoRA) carry randomized deltatune adapters,
    adapted in place: {"unet": DeltaModel, "text_encoder": DeltaModel}, pipeline."""
    pipe = tiny_sd_pipeline()
    unet = dt.get_peft_model(pipe.unet, dt.LoraConfig(target_modules=UNET_TARGETS, use_dora=use_dora, **config))
    text = dt.get_peft_model(pipe.text_encoder, dt.LoraConfig(r=4, lora_alpha=2, target_modules=TE_TARGETS))
    randomize(unet, seed=3)
    randomize(text, seed=4)
    return {"unet": unet.eval(), "text_encoder": text.eval()}, pipe


# ---------------------------------------------------------------------------------------- ours -> diffusers
@pytest.mark.parametrize("use_dora,config", [(False, dict(r=4, lora_alpha=8, **PATTERNS)),
                                             (False, dict(r=4, lora_alpha=8, use_rslora=True)),
                                             (True, dict(r=4, lora_alpha=8, **PATTERNS))],
                         ids=["lora_patterns", "rslora", "dora_patterns"])
def test_our_file_loads_in_the_pipeline_with_our_outputs(use_dora, config, tmp_path):
    models, ours = our_pipeline(use_dora, **config)
    path = dt.save_diffusers_lora(models, tmp_path / "lora")
    assert path.name == WEIGHTS_NAME
    theirs = tiny_sd_pipeline()
    base_unet, base_images = unet_out(theirs.unet), images(theirs)
    theirs.load_lora_weights(str(tmp_path / "lora"))
    expected = unet_out(ours.unet)
    assert (expected - base_unet).abs().max() > 1e-3, "the adapter must change the UNet's output"
    torch.testing.assert_close(unet_out(theirs.unet), expected, atol=TOL, rtol=TOL)
    ids = token_batch(batch=2, length=6)
    torch.testing.assert_close(text_out(theirs.text_encoder, ids), text_out(ours.text_encoder, ids), atol=TOL,
                               rtol=TOL)
    our_images = images(ours)
    assert abs(our_images - base_images).max() > 1e-4
    assert abs(images(theirs) - our_images).max() <= TOL


@pytest.mark.parametrize("family", DIT)
def test_our_dit_file_loads_with_load_lora_adapter(family, tmp_path):
    """SD3 / Flux transformers: diffusers' model-level loader (`load_lora_adapter(prefix="transformer")`)."""
    from conformance_rows import ROWS, base_model

    config = ROWS["lora"].config(family)  # attention, context attention, feed-forward (r=4, alpha 8)
    config.alpha_pattern = {"to_q": 2.0}
    model = dt.get_peft_model(base_model(family), config).eval()
    randomize(model)
    dt.save_diffusers_lora({"transformer": model}, tmp_path)
    theirs = base_model(family)
    theirs.load_lora_adapter(str(tmp_path), prefix="transformer", use_safetensors=True)
    inputs = make_inputs(family)
    expected = output(model, inputs)
    assert (expected - output(base_model(family), inputs)).abs().max() > 1e-4
    torch.testing.assert_close(output(theirs, inputs), expected, atol=TOL, rtol=TOL)


def test_metadata_names_exact_modules_and_per_module_alphas(tmp_path):
    models, _ = our_pipeline(False, r=4, lora_alpha=8, **PATTERNS)
    dt.save_diffusers_lora(models, tmp_path)
    with safe_open(str(tmp_path / WEIGHTS_NAME), "pt") as handle:
        metadata = json.loads(handle.metadata()[METADATA_KEY])
    assert metadata["unet.r"] == 4 and metadata["unet.lora_alpha"] == 8 and metadata["text_encoder.r"] == 4
    conv1 = "down_blocks.0.resnets.0.conv1"
    assert metadata["unet.rank_pattern"][conv1.replace(".", "\\.")] == 2
    assert all(key.startswith(("unet.", "text_encoder.")) for key in load_file(str(tmp_path / WEIGHTS_NAME)))


# ---------------------------------------------------------------------------------------- diffusers -> ours
def peft_adapted(model, config: peft.LoraConfig, seed: int):
    """`model` with peft's LoRA injected (diffusers' own way), weights randomized; returns the model."""
    model = peft.inject_adapter_in_model(config, model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.2)
    return model.eval()


@pytest.mark.parametrize("with_metadata", [True, False])
def test_a_file_diffusers_wrote_loads_here_with_its_outputs(with_metadata, tmp_path):
    """StableDiffusionPipeline.save_lora_weights of a peft-adapted UNet (alpha != r, a rank_pattern) and text
    encoder; without metadata diffusers itself reads alpha = rank, and so must we."""
    pipe = tiny_sd_pipeline()
    unet_config = peft.LoraConfig(r=4, lora_alpha=6, target_modules=UNET_TARGETS, rank_pattern={"conv2": 2})
    te_config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=TE_TARGETS)
    unet, text = peft_adapted(pipe.unet, unet_config, 1), peft_adapted(pipe.text_encoder, te_config, 2)
    metadata = {"unet_lora_adapter_metadata": unet_config.to_dict(),
                "text_encoder_lora_adapter_metadata": te_config.to_dict()} if with_metadata else {}
    StableDiffusionPipeline.save_lora_weights(str(tmp_path), unet_lora_layers=get_peft_model_state_dict(unet),
                                              text_encoder_lora_layers=get_peft_model_state_dict(text), **metadata)
    reader = tiny_sd_pipeline()  # diffusers reading its own file: the outputs the file means
    reader.load_lora_weights(str(tmp_path))
    ours = tiny_sd_pipeline()
    loaded = dt.load_diffusers_lora(tmp_path, {"unet": ours.unet, "text_encoder": ours.text_encoder})
    assert set(loaded) == {"unet", "text_encoder"}
    expected = unet_out(reader.unet)
    assert (expected - unet_out(tiny_sd_pipeline().unet)).abs().max() > 1e-3
    torch.testing.assert_close(unet_out(loaded["unet"]), expected, atol=TOL, rtol=TOL)
    if with_metadata:  # the file's alphas, not diffusers' metadata-free default, are what the sender trained
        torch.testing.assert_close(unet_out(loaded["unet"]), unet_out(unet), atol=TOL, rtol=TOL)
    ids = token_batch(batch=2, length=6)
    torch.testing.assert_close(text_out(ours.text_encoder, ids), text_out(reader.text_encoder, ids), atol=TOL,
                               rtol=TOL)
    assert abs(images(ours) - images(reader)).max() <= TOL


def test_older_key_forms_load_as_diffusers_reads_them(tmp_path):
    """`.lora.down/up.weight` (UNet) and `text_model.`-prefixed `.lora_linear_layer.down/up.weight` (CLIP, before
    Transformers 5 flattened it), no metadata: alpha = rank, as diffusers reads them."""
    models, _ = our_pipeline(False, r=4, lora_alpha=4)
    dt.save_diffusers_lora(models, tmp_path / "new")
    legacy = {}
    for key, tensor in load_file(str(tmp_path / "new" / WEIGHTS_NAME)).items():
        if key.startswith("unet."):
            key = key.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight")
        else:
            key = key.replace("text_encoder.", "text_encoder.text_model.", 1)
            key = key.replace(".lora_A.", ".lora_linear_layer.down.").replace(".lora_B.", ".lora_linear_layer.up.")
        legacy[key] = tensor
    (tmp_path / "old").mkdir()
    save_file(legacy, str(tmp_path / "old" / "my_lora.safetensors"))
    reader = tiny_sd_pipeline()
    reader.load_lora_weights(str(tmp_path / "old"), weight_name="my_lora.safetensors")
    ours = tiny_sd_pipeline()
    dt.load_diffusers_lora(tmp_path / "old", {"unet": ours.unet, "text_encoder": ours.text_encoder})
    torch.testing.assert_close(unet_out(ours.unet), unet_out(reader.unet), atol=TOL, rtol=TOL)
    torch.testing.assert_close(unet_out(ours.unet), unet_out(models["unet"]), atol=TOL, rtol=TOL)
    ids = token_batch(batch=2, length=6)
    torch.testing.assert_close(text_out(ours.text_encoder, ids), text_out(reader.text_encoder, ids), atol=TOL,
                               rtol=TOL)


@pytest.mark.parametrize("family", DIT)
def test_a_dit_file_diffusers_wrote_loads_here(family, tmp_path):
    """The SD3 / Flux pipeline class's save_lora_weights (no pipeline needed) of a peft-adapted transformer."""
    from conformance_rows import base_model

    config = peft.LoraConfig(r=4, lora_alpha=5, target_modules=["to_q", "to_k", "to_v", "to_out.0", "ff.net.2"])
    theirs = peft_adapted(base_model(family), config, 7)
    DIT[family][1].save_lora_weights(str(tmp_path), transformer_lora_layers=get_peft_model_state_dict(theirs),
                                     transformer_lora_adapter_metadata=config.to_dict())
    loaded = dt.load_diffusers_lora(tmp_path, {"transformer": base_model(family)})["transformer"]
    inputs = make_inputs(family)
    expected = output(theirs, inputs)
    assert (expected - output(base_model(family), inputs)).abs().max() > 1e-4
    torch.testing.assert_close(output(loaded, inputs), expected, atol=TOL, rtol=TOL)


# ---------------------------------------------------------------------------------------- refusals
def test_methods_diffusers_cannot_read_are_refused_before_writing(tmp_path):
    pipe = tiny_sd_pipeline()
    loha = dt.get_peft_model(pipe.unet, dt.LoHaConfig(r=2, target_modules=["to_q"]))
    with pytest.raises(dt.DeltaConfigError, match="LoRA and DoRA only"):
        dt.save_diffusers_lora({"unet": loha}, tmp_path / "x")
    text = dt.get_peft_model(tiny_clip_text_encoder(), dt.LoraConfig(target_modules=["q_proj"], use_dora=True))
    with pytest.raises(dt.DeltaConfigError, match="DoRA on a text encoder"):
        dt.save_diffusers_lora({"text_encoder": text}, tmp_path / "x")
    plain = dt.get_peft_model(tiny_sd_pipeline().unet, dt.LoraConfig(target_modules=["to_q"]))
    with pytest.raises(dt.DeltaConfigError, match="component 'vae'"):
        dt.save_diffusers_lora({"unet": plain, "vae": plain}, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_text_encoder_dora_really_does_not_load_in_diffusers(tmp_path):
    """Why the refusal above: diffusers' own round trip of a text encoder's DoRA changes its output (when a
    diffusers release fixes this, this test fails and the refusal should go)."""
    pipe = tiny_sd_pipeline()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True)
    text = peft_adapted(pipe.text_encoder, config, 3)
    ids = token_batch(batch=2, length=6)
    StableDiffusionPipeline.save_lora_weights(str(tmp_path), text_encoder_lora_layers=get_peft_model_state_dict(text),
                                              text_encoder_lora_adapter_metadata=config.to_dict())
    reader = tiny_sd_pipeline()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reader.load_lora_weights(str(tmp_path))
    assert (text_out(reader.text_encoder, ids) - text_out(text, ids)).abs().max() > 1e-2


def test_bad_files_are_refused_and_no_model_changes(tmp_path):
    models, _ = our_pipeline(False, r=4, lora_alpha=8)
    dt.save_diffusers_lora(models, tmp_path)
    pipe = tiny_sd_pipeline()
    before = str(pipe.unet), str(pipe.text_encoder)
    with pytest.raises(dt.AdapterFileError, match="component 'text_encoder', which was not given"):
        dt.load_diffusers_lora(tmp_path, {"unet": pipe.unet})
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    key = next(k for k in tensors if k.startswith("text_encoder.") and k.endswith("lora_A.weight"))
    tensors[key] = torch.zeros(4, 7)  # a text encoder of another width: refused after the UNet was checked
    save_file(tensors, str(tmp_path / WEIGHTS_NAME))
    with pytest.raises(dt.AdapterFileError, match="shape mismatch"):
        dt.load_diffusers_lora(tmp_path, {"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    assert (str(pipe.unet), str(pipe.text_encoder)) == before, "a refused load must leave every model as it was"
    save_file({"lora_unet_down_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(2, 8)},
              str(tmp_path / WEIGHTS_NAME))
    with pytest.raises(dt.AdapterFileError, match="kohya"):
        dt.load_diffusers_lora(tmp_path, {"unet": pipe.unet})
    save_file({"unet.no_such.block.to_q.lora_A.weight": torch.zeros(2, 8),
               "unet.no_such.block.to_q.lora_B.weight": torch.zeros(8, 2)}, str(tmp_path / WEIGHTS_NAME))
    with pytest.raises(dt.AdapterFileError, match="has no module 'no_such.block.to_q'"):
        dt.load_diffusers_lora(tmp_path, {"unet": pipe.unet})
    assert str(pipe.unet) == before[0]


def test_round_trip_here_is_exact(tmp_path):
    models, _ = our_pipeline(True, r=4, lora_alpha=8, **PATTERNS)
    models["text_encoder"] = dt.get_peft_model(tiny_clip_text_encoder(seed=2),  # tiny_sd_pipeline's seed + 2
                                               dt.LoraConfig(r=2, lora_alpha=3, target_modules=TE_TARGETS))
    randomize(models["text_encoder"], seed=8)
    dt.save_diffusers_lora(models, tmp_path)
    fresh = tiny_sd_pipeline()
    loaded = dt.load_diffusers_lora(tmp_path, {"unet": fresh.unet, "text_encoder": fresh.text_encoder})
    torch.testing.assert_close(unet_out(loaded["unet"]), unet_out(models["unet"]), atol=0, rtol=0)
    ids = token_batch(batch=2, length=6)
    torch.testing.assert_close(text_out(loaded["text_encoder"], ids), text_out(models["text_encoder"], ids),
                               atol=0, rtol=0)
    merged = copy.deepcopy(loaded["unet"]).merge_and_unload()
    torch.testing.assert_close(unet_out(merged), unet_out(models["unet"]), atol=TOL, rtol=TOL)


# ---------------------------------------------------------------------------------------- the command line
def test_export_command_turns_saved_adapters_into_the_diffusers_layout(tmp_path, capsys):
    """`deltatune export --to diffusers`: our UNet adapter (component from its base model folder, a pipeline's
    unet/) and peft's text-encoder adapter (--component) load with load_lora_weights and give their outputs."""
    from deltatune.cli import main
    from tiny_diffusion import save_tiny_pipeline

    folder = save_tiny_pipeline(tmp_path / "pipe")
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    unet = dt.get_peft_model(pipe.unet, dt.LoraConfig(r=4, lora_alpha=6, target_modules=UNET_TARGETS,
                                                      rank_pattern={"conv2": 2}))
    randomize(unet, seed=2)
    unet.save_pretrained(tmp_path / "unet_adapter")
    assert main(["export", "--to", "diffusers", "--adapter", str(tmp_path / "unet_adapter"),
                 "--out", str(tmp_path / "out")]) == 0
    assert "load_lora_weights" in capsys.readouterr().out
    reader = StableDiffusionPipeline.from_pretrained(folder)
    reader.load_lora_weights(str(tmp_path / "out"))
    torch.testing.assert_close(unet_out(reader.unet), unet_out(unet.eval()), atol=TOL, rtol=TOL)

    te_config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=TE_TARGETS, init_lora_weights=False)
    text = peft.get_peft_model(tiny_clip_text_encoder(seed=2), te_config).eval()
    text.save_pretrained(tmp_path / "te_adapter")
    assert main(["export", "--to", "diffusers", "--adapter", str(tmp_path / "te_adapter"),
                 "--out", str(tmp_path / "te_out"),
                 "--component", "text_encoder"]) == 0
    reader = tiny_sd_pipeline()
    reader.load_lora_weights(str(tmp_path / "te_out"))
    ids = token_batch(batch=2, length=6)
    torch.testing.assert_close(text_out(reader.text_encoder, ids), text_out(text, ids), atol=TOL, rtol=TOL)


def test_export_of_a_text_to_image_run_writes_every_component(tmp_path):
    """A run's adapter folder (adapter/unet/, adapter/text_encoder/, both naming the whole pipeline as their
    base model): one file, each component under its folder's name, loading with both outputs."""
    from deltatune.cli import main
    from tiny_diffusion import save_tiny_pipeline

    folder = save_tiny_pipeline(tmp_path / "pipe")
    models, ours = our_pipeline(False, r=4, lora_alpha=8, **PATTERNS)
    for name, model in models.items():
        model.peft_config["default"].base_model_name_or_path = str(folder)
        model.save_pretrained(tmp_path / "run" / "adapter" / name)
    assert main(["export", "--to", "diffusers", "--adapter", str(tmp_path / "run" / "adapter"),
                 "--out", str(tmp_path / "out")]) == 0
    reader = StableDiffusionPipeline.from_pretrained(folder)
    reader.load_lora_weights(str(tmp_path / "out"))
    torch.testing.assert_close(unet_out(reader.unet), unet_out(ours.unet), atol=TOL, rtol=TOL)
    assert abs(images(reader) - images(ours)).max() <= TOL
    assert main(["export", "--to", "diffusers", "--adapter", str(tmp_path / "run" / "adapter"),
                 "--out", str(tmp_path / "x"),
                 "--component", "unet"]) == 2


def test_export_command_errors_are_one_line(tmp_path, capsys):
    from deltatune.cli import main

    loha = dt.get_peft_model(tiny_sd_pipeline().unet, dt.LoHaConfig(r=2, target_modules=["to_q"]))
    loha.save_pretrained(tmp_path / "loha")
    assert main(["export", "--to", "diffusers", "--adapter", str(tmp_path / "loha"), "--out", str(tmp_path / "out"),
                 "--component", "unet"]) == 2
    assert "LoRA and DoRA only" in capsys.readouterr().err
    lora = dt.get_peft_model(tiny_clip_text_encoder(), dt.LoraConfig(target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "lora")  # a model built in memory: no folder names its component
    assert main(["export", "--to", "diffusers", "--adapter", str(tmp_path / "lora"),
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--component" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_metadata_without_alpha_reads_peft_default_as_diffusers_does(tmp_path):
    """Metadata that names r but no lora_alpha: diffusers builds peft.LoraConfig(r=...), whose lora_alpha is 8."""
    models, _ = our_pipeline(False, r=2, lora_alpha=2)
    dt.save_diffusers_lora({"unet": models["unet"]}, tmp_path / "full")
    tensors = load_file(str(tmp_path / "full" / WEIGHTS_NAME))
    (tmp_path / "partial").mkdir()
    metadata = {"unet.r": 2, "unet.target_modules": UNET_TARGETS}
    save_file(tensors, str(tmp_path / "partial" / WEIGHTS_NAME), metadata={METADATA_KEY: json.dumps(metadata)})
    reader = tiny_sd_pipeline()
    reader.load_lora_weights(str(tmp_path / "partial"))
    ours = dt.load_diffusers_lora(tmp_path / "partial", {"unet": tiny_sd_pipeline().unet})["unet"]
    assert ours.peft_config["default"].lora_alpha == 8
    torch.testing.assert_close(unet_out(ours), unet_out(reader.unet), atol=TOL, rtol=TOL)
    assert (unet_out(ours) - unet_out(models["unet"])).abs().max() > 1e-3  # alpha 8, not the sender's 2
