"""The noise-prediction loss of diffusion training (Ho et al. 2020, "Denoising Diffusion Probabilistic
Models", arXiv:2006.11239), with min-SNR-gamma weighting (Hang et al. 2023, "Efficient Diffusion Training via
Min-SNR Weighting Strategy", arXiv:2303.09556) and DreamBooth's prior preservation (Ruiz et al. 2022,
arXiv:2208.12242).

For latents z0 (VAE latents x vae.config.scaling_factor), noise e ~ N(0, I) and a timestep t:
    z_t = sqrt(a_t) z0 + sqrt(1 - a_t) e        a_t = alphas_cumprod[t] of the DDPM schedule
    loss = || unet(z_t, t, text) - target ||^2  target = e (epsilon), or v = sqrt(a_t) e - sqrt(1 - a_t) z0
    SNR(t) = a_t / (1 - a_t);  min-SNR weight = min(SNR, gamma) / SNR (epsilon), / (SNR + 1) (v-prediction)
    prior preservation: loss = mean instance loss + prior_loss_weight * mean class loss
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...errors import DeltaConfigError

PREDICTION_TYPES = ("epsilon", "v_prediction")


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio a_t / (1 - a_t) at each timestep; (B,) float32."""
    alpha = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alpha / (1 - alpha)


def min_snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float,
                    prediction_type: str) -> torch.Tensor:
    """Per-sample min-SNR-gamma loss weights (B,): min(SNR, gamma) / SNR for an epsilon target, divided by
    SNR + 1 for a v target (the v loss is already (SNR + 1) times the epsilon loss)."""
    ratio = snr(alphas_cumprod, timesteps)
    clipped = torch.clamp(ratio, max=gamma)
    return clipped / (ratio + 1) if prediction_type == "v_prediction" else clipped / ratio


def check_prediction_type(prediction_type: str) -> None:
    """Raises DeltaConfigError for a scheduler target this loss does not train (e.g. "sample")."""
    if prediction_type not in PREDICTION_TYPES:
        raise DeltaConfigError(f"the pipeline's scheduler config has prediction_type={prediction_type!r}; "
                               f"text-to-image training supports {list(PREDICTION_TYPES)}")


def noise_prediction_loss(unet, scheduler, latents: torch.Tensor, encoder_hidden_states: torch.Tensor,
                          noise: torch.Tensor, timesteps: torch.Tensor, snr_gamma: float | None = None
                          ) -> torch.Tensor:
    """Per-sample loss (B,) of the denoiser on latents (B, C, h, w) noised with `noise` (same shape) at
    `timesteps` (B,), conditioned on text hidden states (B, L, d).

    Args:
        unet: the denoiser (UNet2DConditionModel, or a DeltaModel around it); called as
            unet(noisy, timesteps, encoder_hidden_states=...).sample.
        scheduler: a DDPMScheduler (add_noise, get_velocity, alphas_cumprod, config.prediction_type).
        snr_gamma: min-SNR-gamma weighting; None for plain MSE.
    """
    prediction_type = scheduler.config.prediction_type
    check_prediction_type(prediction_type)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    predicted = unet(noisy, timesteps, encoder_hidden_states=encoder_hidden_states).sample
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    # float32 for the error: under bf16 autocast the prediction comes back in bf16
    per_sample = F.mse_loss(predicted.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma is not None:
        per_sample = per_sample * min_snr_weights(scheduler.alphas_cumprod, timesteps, snr_gamma, prediction_type)
    return per_sample


def prior_preservation_sum(per_sample: torch.Tensor, is_class: torch.Tensor, prior_loss_weight: float
                           ) -> torch.Tensor:
    """Sum of instance losses + prior_loss_weight x sum of class losses: divided by the instance count (each
    instance image is paired with one class image) it is mean instance + weight x mean class loss."""
    is_class = is_class.to(per_sample.device)
    return per_sample[~is_class].sum() + prior_loss_weight * per_sample[is_class].sum()
