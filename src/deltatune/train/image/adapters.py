"""The adapted parts of a text-to-image pipeline as one module the training loop trains like a DeltaModel:
its forward is the loss, and it answers the calls the loop makes on a DeltaModel (trainable counts, the
training-time method hooks, save_pretrained) by asking each adapted component.

Saved layout (our peft layout, one folder per adapted component):

    OUTPUT_DIR/adapter/unet/{adapter_config.json, adapter_model.safetensors}
    OUTPUT_DIR/adapter/text_encoder/...          (image.train_text_encoder only)
    OUTPUT_DIR/adapter/diffusers/pytorch_lora_weights.safetensors
                                                 (LoRA/DoRA: what `pipeline.load_lora_weights` reads)
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ...errors import AdapterFileError, DeltaConfigError
from ...io.diffusers_layout import RUN_ADAPTER_FOLDER, adapter_folders, check_writable, save_diffusers_lora
from .loss import noise_prediction_loss, prior_preservation_sum

ADAPTER_FOLDER = RUN_ADAPTER_FOLDER
DIFFUSERS_FOLDER = "diffusers"  # inside ADAPTER_FOLDER: the same adapters in diffusers' own layout
COMPONENTS = ("unet", "text_encoder")  # the pipeline attributes an adapter can sit on, in saving order


def save_image_adapter(components: dict[str, nn.Module], folder: str | Path) -> Path:
    """Save each adapted component (a DeltaModel) to `folder/<component>/` in our peft layout, and all of them
    to `folder/diffusers/` in diffusers' layout when diffusers can read them; returns `folder`. The one place
    an image run's adapters are written (final adapter and checkpoints alike)."""
    folder = Path(folder)
    for name, model in components.items():
        model.save_pretrained(str(folder / name))
    if diffusers_can_read(components):
        save_diffusers_lora(components, folder / DIFFUSERS_FOLDER)
    return folder


def diffusers_can_read(components: dict[str, nn.Module]) -> bool:
    """Whether diffusers' `load_lora_weights` reads every component's adapter (LoRA, and DoRA on the denoiser;
    io/diffusers_layout.check_writable's rules); other methods are exported with `deltatune export --to kohya`."""
    try:
        for name, model in components.items():
            check_writable(model.peft_config["default"], "default", name)
    except DeltaConfigError:
        return False
    return True


def adapter_components(folder: str | Path) -> dict[str, Path]:
    """{component: its adapter folder} for an image adapter folder (`OUTPUT_DIR/adapter`, or a run's
    OUTPUT_DIR holding one); {} when `folder` holds none."""
    try:
        folders = adapter_folders(Path(folder))  # io/diffusers_layout: the one place that finds them
    except AdapterFileError:
        return {}
    return {f.name: f for f in folders if f.name in COMPONENTS}


class ImageAdapters(nn.Module):
    """The denoiser's adapter (and the text encoder's, when trained) with the frozen VAE and the DDPM noise
    schedule; `forward(pixel_values, input_ids, is_class)` is the summed noise-prediction loss.

    Args:
        unet: the pipeline's UNet as a DeltaModel.
        text_encoder: the pipeline's text encoder, a DeltaModel when it is trained, else frozen as is.
        vae: the pipeline's VAE (frozen).
        noise_scheduler: a DDPMScheduler built from the pipeline's scheduler config.
        snr_gamma, prior_loss_weight: see ImageSection.
    """

    def __init__(self, unet, text_encoder, vae, noise_scheduler, snr_gamma: float | None = None,
                 prior_loss_weight: float = 1.0, text_encoder_adapted: bool = False) -> None:
        super().__init__()
        self.unet, self.text_encoder, self.vae = unet, text_encoder, vae
        self.noise_scheduler = noise_scheduler
        self.snr_gamma, self.prior_loss_weight = snr_gamma, prior_loss_weight
        self.text_encoder_adapted = text_encoder_adapted
        vae.requires_grad_(False)
        if not text_encoder_adapted:
            text_encoder.requires_grad_(False)

    @property
    def components(self) -> dict[str, nn.Module]:
        """The adapted components by pipeline attribute name (the keys save_image_adapter writes)."""
        return {"unet": self.unet, **({"text_encoder": self.text_encoder} if self.text_encoder_adapted else {})}

    def train(self, mode: bool = True) -> ImageAdapters:
        super().train(mode)
        self.vae.eval()  # frozen parts never switch to training behaviour
        if not self.text_encoder_adapted:
            self.text_encoder.eval()
        return self

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Text hidden states (B, L, d): through the text encoder's adapter when it is trained."""
        if self.text_encoder_adapted:
            return self.text_encoder(input_ids)[0]
        with torch.no_grad():
            return self.text_encoder(input_ids)[0]

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, is_class: torch.Tensor) -> torch.Tensor:
        """Summed loss over the batch (see loss.py): pixels (B, 3, R, R) in [-1, 1], input_ids (B, L),
        is_class (B,) bool. Noise, timesteps and the VAE's latent sample come from torch's global
        generator, which the loop seeds per micro-batch."""
        with torch.no_grad():
            latents = self.vae.encode(pixel_values).latent_dist.sample() * self.vae.config.scaling_factor
        noise = torch.randn_like(latents)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (latents.shape[0],), device=latents.device)
        per_sample = noise_prediction_loss(self.unet, self.noise_scheduler, latents, self.encode_text(input_ids),
                                           noise, timesteps, self.snr_gamma)
        return prior_preservation_sum(per_sample, is_class, self.prior_loss_weight)

    # the calls the training loop makes on a DeltaModel, answered by each adapted component
    @property
    def share_dropout_masks(self) -> bool:
        return self.unet.share_dropout_masks

    @share_dropout_masks.setter
    def share_dropout_masks(self, value: bool) -> None:
        for model in self.components.values():
            model.share_dropout_masks = value

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameters of the pipeline parts this module holds (VAE included)."""
        params = list(self.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def before_optimizer_step(self, step: int) -> None:
        for model in self.components.values():
            model.before_optimizer_step(step)

    def after_optimizer_step(self, step: int, optimizer=None) -> None:
        for model in self.components.values():
            model.after_optimizer_step(step, optimizer)

    def extra_loss(self) -> torch.Tensor | None:
        terms = [t for t in (m.extra_loss() for m in self.components.values()) if t is not None]
        return sum(terms) if terms else None

    def save_pretrained(self, folder: str) -> None:
        """Write every adapted component to `folder/adapter/<component>/` (save_image_adapter)."""
        save_image_adapter(self.components, Path(folder) / ADAPTER_FOLDER)
