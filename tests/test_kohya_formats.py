"""kohya / A1111 LoRA and LyCORIS LoHa / LoKr files (io/kohya_format.py, io/lycoris_format.py), checked by
the real readers and writers: diffusers' `pipeline.load_lora_weights()` and the `lycoris-lora` package's
kohya network (`LycorisNetworkKohya`, `create_network_from_weights`), on tiny in-memory pipelines."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltatune import LoHaConfig, LoKrConfig, LoraConfig, get_peft_model
from deltatune.errors import DeltaConfigError
from deltatune.io.kohya_format import load_kohya, save_kohya
from deltatune.io.kohya_keys import module_table

pytest.importorskip("diffusers")
lycoris_kohya = pytest.importorskip("lycoris.kohya")
from tiny_diffusion import latent_batch, tiny_clip_text_encoder, tiny_sd_pipeline, tiny_unet  # noqa: E402

TOL = 1e-5
IDS = torch.tensor([[512, 40, 41, 42, 60, 513]])
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "time_emb_proj"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
# LyCORIS's "full" preset also names TimestepEmbedding and time_embedding.linear_1/2, which collide on a
# diffusers UNet (lycoris 4.1.3: "duplicated lora name"); this preset is "full" without that overlap.
PRESET = {"enable_conv": True, "unet_target_module": ["Transformer2DModel", "ResnetBlock2D", "Downsample2D",
                                                      "Upsample2D"],
          "unet_target_name": ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"],
          "text_encoder_target_module": ["CLIPAttention", "CLIPMLP"], "text_encoder_target_name": []}


def outputs(unet, te):
    with torch.no_grad():
        return unet(**latent_batch()).sample, te(input_ids=IDS).last_hidden_state


def randomize(module, seed=3, std=0.2):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator) * std)


@pytest.fixture
def lycoris_network():
    """Build a LyCORIS kohya network (algo, dims, alphas ...) on a fresh tiny UNet and text encoder."""
    cls = lycoris_kohya.LycorisNetworkKohya
    saved = {k: getattr(cls, k) for k in ("ENABLE_CONV", "UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME",
                                          "TEXT_ENCODER_TARGET_REPLACE_MODULE", "TEXT_ENCODER_TARGET_REPLACE_NAME")}
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    cls.apply_preset(PRESET)

    def build(algo, **kwargs):
        unet, te = tiny_unet(0), tiny_clip_text_encoder(2)
        net = cls(te, unet, network_module=algo, **kwargs)
        net.apply_to(te, unet, True, True)
        randomize(net)
        return net, unet, te

    yield build
    for key, value in saved.items():
        setattr(cls, key, value)


def as_live_names(state):
    """Our text-encoder keys keep CLIPTextModel's `text_model` level (lora_te_text_model_encoder_..., as every
    file made with Transformers 4 has them); LyCORIS 4.1.3 matches keys against the live model's names only,
    which Transformers 5 spells without that level: rename for it."""
    return {k.replace("lora_te_text_model_", "lora_te_"): v for k, v in state.items()}


def lycoris_load(state, seed_unet=0, seed_te=2):
    """Load a state dict in LyCORIS (create_network_from_weights + apply_to): (unet, te) carrying it."""
    unet, te = tiny_unet(seed_unet), tiny_clip_text_encoder(seed_te)
    state = as_live_names(state)
    net, _ = lycoris_kohya.create_network_from_weights(1.0, None, None, te, unet,
                                                       weights_sd={k: v.clone() for k, v in state.items()})
    net.apply_to(te, unet, True, True)
    net.load_state_dict(state, strict=False)
    return unet, te, net


# ---------------------------------------------------------------- kohya LoRA, checked by diffusers
def test_lora_written_here_loads_in_diffusers_with_equal_outputs(tmp_path):
    unet = get_peft_model(tiny_unet(0), LoraConfig(r=4, lora_alpha=6, target_modules=UNET_TARGETS,
                                                   rank_pattern={"conv1": 2, "to_k": 3}, alpha_pattern={"conv2": 1.5},
                                                   init_lora_weights=False))
    te = get_peft_model(tiny_clip_text_encoder(2), LoraConfig(r=2, lora_alpha=5, target_modules=TE_TARGETS,
                                                              use_rslora=True, init_lora_weights=False))
    ours = outputs(unet, te)
    with unet.disable_adapter(), te.disable_adapter():
        base = outputs(unet, te)
    assert min((o - b).abs().max().item() for o, b in zip(ours, base)) > 1e-2  # the adapters do something
    path = save_kohya({"unet": unet, "text_encoder": te}, tmp_path / "lora.safetensors")
    keys = load_file(path)
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in keys  # the level other tools keep
    assert keys["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (2, 4, 3, 3)
    assert keys["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"].shape == (4, 2, 1, 1)

    pipe = tiny_sd_pipeline(0)
    pipe.load_lora_weights(str(path))
    theirs = outputs(pipe.unet, pipe.text_encoder)
    assert (theirs[0] - ours[0]).abs().max().item() <= TOL
    assert (theirs[1] - ours[1]).abs().max().item() <= TOL


def test_kohya_lora_file_reads_as_diffusers_and_lycoris_read_it(tmp_path, lycoris_network):
    """A kohya LoRA file written by another tool (LyCORIS's kohya network, LoCon on every conv): our reader, diffusers'
    and LyCORIS's give one output."""
    net, lyco_unet, lyco_te = lycoris_network("lora", lora_dim=4, alpha=2.0, conv_lora_dim=2, conv_alpha=3.0)
    state = net.state_dict()
    assert any(v.dim() == 4 and v.shape[-1] == 3 for k, v in state.items() if k.endswith("lora_down.weight"))
    path = tmp_path / "kohya.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    reference = outputs(lyco_unet, lyco_te)

    got = load_kohya(path, {"unet": tiny_unet(0), "text_encoder": tiny_clip_text_encoder(2)})
    ours = outputs(got["unet"], got["text_encoder"])
    pipe = tiny_sd_pipeline(0)
    pipe.load_lora_weights(str(path))
    theirs = outputs(pipe.unet, pipe.text_encoder)
    for mine, lyco, diffusers_out in zip(ours, reference, theirs):
        assert (mine - lyco).abs().max().item() <= TOL
        assert (mine - diffusers_out).abs().max().item() <= TOL
    # and back: what we write from it is the same file, to float precision
    again = load_file(save_kohya(got, tmp_path / "again.safetensors"))
    again = as_live_names(again)
    assert set(again) == set(state)
    assert max((again[k] - state[k].float()).abs().max().item() for k in state) <= 1e-6


# ---------------------------------------------------------------- LyCORIS LoHa / LoKr, checked by lycoris
LYCORIS_CASES = [
    ("loha", dict(lora_dim=2, alpha=3.0, conv_lora_dim=2, conv_alpha=1.0)),
    ("loha", dict(lora_dim=2, alpha=3.0, conv_lora_dim=2, conv_alpha=1.0, use_tucker=True)),
    ("lokr", dict(lora_dim=2, alpha=3.0, conv_lora_dim=1, conv_alpha=0.5)),
    ("lokr", dict(lora_dim=2, alpha=3.0, conv_lora_dim=1, conv_alpha=0.5, decompose_both=True)),
    ("lokr", dict(lora_dim=2, alpha=3.0, conv_lora_dim=1, conv_alpha=0.5, use_tucker=True)),
    ("lokr", dict(lora_dim=1, alpha=0.5, conv_lora_dim=1, conv_alpha=0.5, factor=2)),
]


CASE_IDS = [f"{a}-{'-'.join(k for k in kw if k in ('use_tucker', 'decompose_both', 'factor')) or 'plain'}"
            for a, kw in LYCORIS_CASES]


@pytest.mark.parametrize("algo,kwargs", LYCORIS_CASES, ids=CASE_IDS)
def test_lycoris_file_loads_here_and_ours_loads_in_lycoris(tmp_path, lycoris_network, algo, kwargs):
    net, lyco_unet, lyco_te = lycoris_network(algo, **kwargs)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    reference = outputs(lyco_unet, lyco_te)
    base = outputs(tiny_unet(0), tiny_clip_text_encoder(2))
    assert min((r - b).abs().max().item() for r, b in zip(reference, base)) > 1e-3  # non-zero updates
    path = tmp_path / "lycoris.safetensors"
    save_file(state, str(path))

    got = load_kohya(path, {"unet": tiny_unet(0), "text_encoder": tiny_clip_text_encoder(2)})
    method = {"loha": "LOHA", "lokr": "LOKR"}[algo]
    assert got["unet"].peft_config["default"].peft_type == method
    ours = outputs(got["unet"], got["text_encoder"])
    for mine, lyco in zip(ours, reference):
        assert (mine - lyco).abs().max().item() <= TOL
    if kwargs.get("use_tucker"):  # conv modules really took the CP form
        assert any(k.endswith(("hada_t1", "lokr_t2")) for k in state)

    written = load_file(save_kohya(got, tmp_path / "ours.safetensors"))
    assert set(as_live_names(written)) == set(state)
    # LyCORIS reads back what we wrote: its own loader where it can build the module, else its network
    # with these settings and load_state_dict (its loader takes the rank of a Tucker w2_a from the wrong
    # axis, lycoris 4.1.3 LokrModule.make_module_from_state_dict)
    if algo == "lokr" and kwargs.get("use_tucker"):
        net2, unet2, te2 = lycoris_network(algo, **kwargs)
        net2.load_state_dict(as_live_names(written))
    else:
        unet2, te2, _ = lycoris_load(written)
    for theirs, mine in zip(outputs(unet2, te2), ours):
        assert (theirs - mine).abs().max().item() <= TOL


@pytest.mark.parametrize("config", [
    LoHaConfig(r=2, alpha=5, target_modules=UNET_TARGETS, use_effective_conv2d=True, init_weights=False),
    LoKrConfig(r=1, alpha=3, target_modules=UNET_TARGETS, init_weights=False, rank_pattern={"to_q": 8}),
], ids=["loha-tucker", "lokr-full-and-lowrank"])
def test_our_loha_lokr_round_trip_and_load_in_lycoris(tmp_path, lycoris_network, config):
    unet = get_peft_model(tiny_unet(0), config)
    randomize(unet)
    te = get_peft_model(tiny_clip_text_encoder(2), LoKrConfig(r=2, alpha=4, target_modules=TE_TARGETS,
                                                               decompose_both=True, init_weights=False))
    randomize(te)
    ours = outputs(unet, te)
    path = save_kohya({"unet": unet, "text_encoder": te}, tmp_path / "x.safetensors")
    back = load_kohya(path, {"unet": tiny_unet(0), "text_encoder": tiny_clip_text_encoder(2)})
    unet2, te2, _ = lycoris_load(load_file(path))
    for mine, again, lyco in zip(ours, outputs(back["unet"], back["text_encoder"]), outputs(unet2, te2)):
        assert (mine - again).abs().max().item() <= TOL
        assert (mine - lyco).abs().max().item() <= TOL


# ---------------------------------------------------------------- errors, names, the table
def test_module_table_maps_flattened_names_by_the_live_model():
    table = module_table(tiny_unet(0))
    flat = "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    assert table[flat] == "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert table["down_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj"].endswith("ff.net.0.proj")
    te_table = module_table(tiny_clip_text_encoder(2))
    assert te_table["text_model_encoder_layers_0_self_attn_q_proj"] == "encoder.layers.0.self_attn.q_proj"
    assert te_table["encoder_layers_0_self_attn_q_proj"] == "encoder.layers.0.self_attn.q_proj"


def _lora_file(tmp_path, extra):
    tensors = {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight":
               torch.randn(2, 8),
               "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight":
               torch.randn(8, 2), **extra}
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("extra,message", [
    ({"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_z.lora_down.weight": torch.randn(2, 8)},
     "attn1_to_z.lora_down.weight' matches no module of unet"),
    ({"lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a": torch.randn(4, 2)}, "mixes methods"),
    ({"lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": torch.randn(2, 5, 3, 3),
      "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": torch.randn(4, 2, 1, 1)},
     "shape mismatch for down_blocks.0.resnets.0.conv1"),
    ({"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(2, 32)},
     "no text encoder was given"),
    ({"lora_unet_down_blocks_0_resnets_0_conv1.lora_mid.weight": torch.randn(2, 2, 3, 3)}, "lora_mid"),
    ({"something_else": torch.randn(1)}, "is not a kohya/LyCORIS key"),
])
def test_bad_files_are_refused_naming_the_key_before_any_change(tmp_path, extra, message):
    unet = tiny_unet(0)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    names = [n for n, _ in unet.named_modules()]
    with pytest.raises(DeltaConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_kohya(_lora_file(tmp_path, extra), {"unet": unet})
    assert [n for n, _ in unet.named_modules()] == names
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())


def test_lycoris_factor_split_we_cannot_build_is_refused_naming_the_module(tmp_path, lycoris_network):
    """LyCORIS splits a dimension by a factor above its square root as (dim/f, f), PEFT and we as (f, dim/f):
    such a file has no LoKr of ours with the same layout."""
    net, _, _ = lycoris_network("lokr", lora_dim=1, alpha=1.0, conv_lora_dim=1, conv_alpha=1.0, factor=4)
    path = tmp_path / "f4.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    with pytest.raises(DeltaConfigError, match=r"module .*: its LoKr factors"):
        load_kohya(path, {"unet": tiny_unet(0), "text_encoder": tiny_clip_text_encoder(2)})


def test_dora_both_ways_with_lycoris(tmp_path, lycoris_network):
    """DoRA as kohya / LyCORIS write it (dora_scale, per output row): LyCORIS's file loads here with its outputs,
    ours loads in LyCORIS with ours. diffusers 0.42.1 drops dora_scale from such files (lora_pipeline.py
    lora_state_dict: "a DoRA checkpoint that is not compatible"), so it gives plain LoRA's output: inspect
    says so (test_kohya_cli.py)."""
    net, lyco_unet, lyco_te = lycoris_network("lora", lora_dim=2, alpha=1.0, conv_lora_dim=2, conv_alpha=1.0,
                                              dora_wd=True, weight_decompose=True)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    assert any(k.endswith("dora_scale") for k in state)
    save_file(state, str(tmp_path / "dora.safetensors"))
    got = load_kohya(tmp_path / "dora.safetensors", {"unet": tiny_unet(0), "text_encoder": tiny_clip_text_encoder(2)})
    assert got["unet"].peft_config["default"].use_dora
    ours = outputs(got["unet"], got["text_encoder"])
    for mine, lyco in zip(ours, outputs(lyco_unet, lyco_te)):
        assert (mine - lyco).abs().max().item() <= TOL

    unet = get_peft_model(tiny_unet(0), LoraConfig(r=2, lora_alpha=3, target_modules=["to_q", "to_out.0", "conv1"],
                                                   use_dora=True, init_lora_weights=False))
    randomize(unet, std=0.1)
    path = save_kohya({"unet": unet}, tmp_path / "ours.safetensors")
    assert load_file(path)["lora_unet_down_blocks_0_resnets_0_conv1.dora_scale"].shape == (4, 1, 1, 1)
    with torch.no_grad():
        mine = unet(**latent_batch()).sample
    lyco_unet, _, _ = lycoris_load(load_file(path))
    back = load_kohya(path, {"unet": tiny_unet(0)})["unet"]
    with torch.no_grad():
        assert (lyco_unet(**latent_batch()).sample - mine).abs().max().item() <= TOL
        assert (back(**latent_batch()).sample - mine).abs().max().item() <= TOL


def test_saving_other_methods_is_refused(tmp_path):
    from deltatune import OFTConfig

    dm = get_peft_model(tiny_unet(0), OFTConfig(oft_block_size=2, target_modules=["to_q"]))
    with pytest.raises(DeltaConfigError, match="OFT"):
        save_kohya({"unet": dm}, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_two_text_encoders_get_te1_te2_and_read_back(tmp_path):
    """SDXL-style pipelines: text_encoder -> lora_te1_, text_encoder_2 -> lora_te2_, and back to the right one."""
    te1 = get_peft_model(tiny_clip_text_encoder(2), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    te2 = get_peft_model(tiny_clip_text_encoder(5), LoHaConfig(r=2, target_modules=["fc1"], init_weights=False))
    path = save_kohya({"text_encoder": te1, "text_encoder_2": te2}, tmp_path / "xl.safetensors")
    keys = load_file(path)
    assert {k.split("_text_model")[0] for k in keys} == {"lora_te1", "lora_te2"}
    back = load_kohya(path, {"text_encoder": tiny_clip_text_encoder(2), "text_encoder_2": tiny_clip_text_encoder(5)})
    with torch.no_grad():
        for ours, again in ((te1, back["text_encoder"]), (te2, back["text_encoder_2"])):
            assert torch.equal(ours(input_ids=IDS).last_hidden_state, again(input_ids=IDS).last_hidden_state)


def test_missing_alpha_means_scale_one_as_in_diffusers(tmp_path):
    unet = get_peft_model(tiny_unet(0), LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "conv2"],
                                                   init_lora_weights=False))
    tensors = {k: v for k, v in load_file(save_kohya({"unet": unet}, tmp_path / "a.safetensors")).items()
               if not k.endswith(".alpha")}
    save_file(tensors, str(tmp_path / "no_alpha.safetensors"))
    got = load_kohya(tmp_path / "no_alpha.safetensors", {"unet": tiny_unet(0)})
    pipe = tiny_sd_pipeline(0)
    pipe.load_lora_weights(str(tmp_path / "no_alpha.safetensors"))
    with torch.no_grad():
        mine, theirs = got["unet"](**latent_batch()).sample, pipe.unet(**latent_batch()).sample
        assert (mine - theirs).abs().max().item() <= TOL
        assert (mine - unet(**latent_batch()).sample).abs().max().item() > 1e-3  # scale 1, not the saved 4 / 2
        for _path, layer in got["unet"].delta_layers():
            assert layer.adapters["default"].scaling == 1.0


def test_load_into_an_existing_delta_model_adds_an_adapter(tmp_path):
    source = get_peft_model(tiny_unet(0), LoraConfig(r=2, target_modules=["to_v"], init_lora_weights=False))
    path = save_kohya({"unet": source}, tmp_path / "s.safetensors")
    dm = get_peft_model(tiny_unet(0), LoraConfig(r=4, target_modules=["to_q"]))
    load_kohya(path, {"unet": dm}, adapter_name="style")
    assert set(dm.peft_config) == {"default", "style"}
    dm.set_adapter("style")
    with torch.no_grad():
        assert torch.equal(dm(**latent_batch()).sample, source(**latent_batch()).sample)
    with pytest.raises(DeltaConfigError, match="already exists"):
        load_kohya(path, {"unet": dm}, adapter_name="style")


def test_flattened_names_two_modules_share_are_refused():
    from torch import nn

    from deltatune.io.kohya_keys import resolve

    model = nn.Module()
    model.a_b = nn.Module()
    model.a_b.c = nn.Linear(2, 2)
    model.a = nn.Module()
    model.a.b_c = nn.Linear(2, 2)
    table = module_table(model)
    assert table["a_b_c"] is None
    with pytest.raises(DeltaConfigError, match="several modules of unet flatten to 'a_b_c'"):
        resolve(table, "a_b_c", "lora_unet_a_b_c.lora_down.weight", "unet")
