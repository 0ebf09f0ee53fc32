"""Tiny random diffusion models and pipelines for tests, built from configs in memory (no hub).

Sizes follow diffusers' own fast tests (block_out_channels (4, 8), cross-attention dim 32), so a denoiser
forward takes milliseconds. Every builder takes a `seed`: two calls with the same seed give bit-identical
weights. `tiny_sd_pipeline` is a whole StableDiffusionPipeline (UNet, VAE, CLIP text encoder and a CLIP BPE
tokenizer built from the byte alphabet with no merges), so `pipeline.load_lora_weights()`, training and
sampling run through diffusers' real code; `save_tiny_pipeline` writes it as a local pipeline folder, the
form `deltatune train`'s `model:` field takes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

CROSS_ATTENTION_DIM = 32
SAMPLE_SIZE = 16  # latent side; images are 2x that (one VAE down block halves)


def _seeded(build, seed: int):
    torch.manual_seed(seed)
    return build().float().eval()


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    """UNet2DConditionModel: down (ResNet, CrossAttn), up (CrossAttn, ResNet); to_q/k/v/out.0, ff.net.*,
    proj_in/out (Linear), conv1/conv2/conv_shortcut (Conv2d), time_embedding.linear_1/2."""
    return _seeded(lambda: UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=SAMPLE_SIZE, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=CROSS_ATTENTION_DIM, norm_num_groups=2, attention_head_dim=2), seed)


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    return _seeded(lambda: AutoencoderKL(
        block_out_channels=(4, 8), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=2,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D")), seed)


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's byte-level alphabet: printable bytes stand for themselves, the rest map above U+0100."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer over the 256-symbol byte alphabet with no merges (each character one token)."""
    symbols = _byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={token: i for i, token in enumerate(vocab)}, merges=[], model_max_length=16)


def tiny_clip_text_encoder(seed: int = 0) -> CLIPTextModel:
    """2-layer CLIP text encoder, hidden 32: q/k/v/out_proj, mlp.fc1/fc2; vocabulary of tiny_clip_tokenizer."""
    config = CLIPTextConfig(vocab_size=514, hidden_size=CROSS_ATTENTION_DIM, intermediate_size=37,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                            bos_token_id=512, eos_token_id=513, pad_token_id=513)
    return _seeded(lambda: CLIPTextModel(config), seed)


def tiny_sd3_transformer(seed: int = 0) -> SD3Transformer2DModel:
    """1-block SD3 MMDiT: attn.to_q/k/v/to_out.0, attn.add_q/k/v_proj, to_add_out, ff.net.*, ff_context."""
    return _seeded(lambda: SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        caption_projection_dim=16, joint_attention_dim=CROSS_ATTENTION_DIM, pooled_projection_dim=CROSS_ATTENTION_DIM,
        out_channels=4), seed)


def tiny_flux_transformer(seed: int = 0) -> FluxTransformer2DModel:
    """1 double + 1 single Flux block: attn.to_q/k/v/to_out.0, add_*_proj, proj_mlp, proj_out, ff.net.*."""
    return _seeded(lambda: FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=CROSS_ATTENTION_DIM, pooled_projection_dim=CROSS_ATTENTION_DIM,
        axes_dims_rope=(4, 6, 6)), seed)


def tiny_sd_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A whole Stable-Diffusion-style pipeline: UNet, VAE, CLIP text encoder + tokenizer, DDPM scheduler."""
    return StableDiffusionPipeline(
        unet=tiny_unet(seed), vae=tiny_vae(seed + 1), text_encoder=tiny_clip_text_encoder(seed + 2),
        tokenizer=tiny_clip_tokenizer(),
        scheduler=DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", clip_sample=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def save_tiny_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """Write tiny_sd_pipeline as a local pipeline folder (model_index.json, unet/, vae/ ...); returns it."""
    folder = Path(folder)
    tiny_sd_pipeline(seed).save_pretrained(folder, safe_serialization=True)
    return folder


def latent_batch(batch: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    """UNet inputs: sample (batch, 4, 16, 16), timestep (batch,), encoder_hidden_states (batch, 5, 32)."""
    generator = torch.Generator().manual_seed(seed)
    return {"sample": torch.randn(batch, 4, SAMPLE_SIZE, SAMPLE_SIZE, generator=generator),
            "timestep": torch.randint(0, 1000, (batch,), generator=generator),
            "encoder_hidden_states": torch.randn(batch, 5, CROSS_ATTENTION_DIM, generator=generator)}


def sd3_batch(batch: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    """tiny_sd3_transformer inputs: hidden_states (batch, 4, 8, 8), encoder_hidden_states (batch, 5, 32),
    pooled_projections (batch, 32), timestep (batch,)."""
    generator = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(batch, 4, 8, 8, generator=generator),
            "encoder_hidden_states": torch.randn(batch, 5, CROSS_ATTENTION_DIM, generator=generator),
            "pooled_projections": torch.randn(batch, CROSS_ATTENTION_DIM, generator=generator),
            "timestep": torch.randint(0, 1000, (batch,), generator=generator)}


def flux_batch(batch: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    """tiny_flux_transformer inputs: 16 packed image tokens (batch, 16, 4) and 5 text tokens (batch, 5, 32),
    their position ids (16, 3) / (5, 3), pooled_projections (batch, 32), timestep in [0, 1) (batch,)."""
    generator = torch.Generator().manual_seed(seed)
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    return {"hidden_states": torch.randn(batch, 16, 4, generator=generator),
            "encoder_hidden_states": torch.randn(batch, 5, CROSS_ATTENTION_DIM, generator=generator),
            "pooled_projections": torch.randn(batch, CROSS_ATTENTION_DIM, generator=generator),
            "timestep": torch.rand(batch, generator=generator),
            "img_ids": torch.stack([torch.zeros(16), rows.flatten(), cols.flatten()], dim=-1),
            "txt_ids": torch.zeros(5, 3)}
