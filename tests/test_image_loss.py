"""The text-to-image loss against hand-computed numbers: the DDPM forward process and both targets written
out from the betas, min-SNR-gamma weights on a two-step schedule, prior preservation's sum, and the batch
an image run builds (instance i paired with class image i mod N)."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from deltatune.train.image.data import ImageExample
from deltatune.train.image.loss import min_snr_weights, noise_prediction_loss, prior_preservation_sum, snr
from deltatune.train.image.run import ImageData, ImageSteps
from deltatune.train.image.settings import ImageSection
from tiny_diffusion import tiny_clip_tokenizer, tiny_unet


def test_min_snr_weights_on_a_hand_computed_schedule():
    """betas (0.5, 0.5): alphas_cumprod (0.5, 0.25), SNR (1, 1/3). gamma 0.5: epsilon weights
    min(SNR, g) / SNR = (0.5, 1); v weights min(SNR, g) / (SNR + 1) = (0.25, 0.25)."""
    scheduler = DDPMScheduler(num_train_timesteps=2, trained_betas=[0.5, 0.5])
    t = torch.tensor([0, 1])
    torch.testing.assert_close(snr(scheduler.alphas_cumprod, t), torch.tensor([1.0, 1 / 3]))
    torch.testing.assert_close(min_snr_weights(scheduler.alphas_cumprod, t, 0.5, "epsilon"), torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(min_snr_weights(scheduler.alphas_cumprod, t, 0.5, "v_prediction"),
                               torch.tensor([0.25, 0.25]))
    # gamma above every SNR: epsilon weights are all 1 (plain MSE)
    torch.testing.assert_close(min_snr_weights(scheduler.alphas_cumprod, t, 10.0, "epsilon"), torch.ones(2))


def _by_hand(unet, betas: torch.Tensor, latents, hidden, noise, t, target: str) -> torch.Tensor:
    """The DDPM forward process and target from the betas alone (no scheduler code)."""
    alpha_bar = torch.cumprod(1 - betas.double(), 0)[t].float().view(-1, 1, 1, 1)
    noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
    predicted = unet(noisy, t, encoder_hidden_states=hidden).sample
    wanted = noise if target == "epsilon" else alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    return ((predicted - wanted) ** 2).mean(dim=(1, 2, 3))


def test_noise_prediction_loss_is_the_ddpm_formula():
    """For epsilon and v-prediction schedulers, with and without min-SNR weights, the per-sample loss equals
    the formula computed from the betas by hand."""
    unet = tiny_unet()
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 4, 16, 16, generator=generator), torch.randn(3, 4, 16, 16, generator=generator)
    hidden, t = torch.randn(3, 5, 32, generator=generator), torch.tensor([3, 420, 999])
    for target in ("epsilon", "v_prediction"):
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", prediction_type=target)
        with torch.no_grad():
            expected = _by_hand(unet, scheduler.betas, latents, hidden, noise, t, target)
            got = noise_prediction_loss(unet, scheduler, latents, hidden, noise, t)
            weighted = noise_prediction_loss(unet, scheduler, latents, hidden, noise, t, snr_gamma=5.0)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        alpha_bar = torch.cumprod(1 - scheduler.betas.double(), 0)[t]
        ratio = (alpha_bar / (1 - alpha_bar)).float()
        weight = ratio.clamp(max=5.0) / (ratio if target == "epsilon" else ratio + 1)
        torch.testing.assert_close(weighted, expected * weight, rtol=1e-5, atol=1e-6)


def test_prior_preservation_is_instance_plus_weight_times_prior():
    """Instance losses (1, 2), class losses (3, 4), weight 0.5: 3 + 0.5 * 7 = 6.5; divided by the two
    instance images (the loop's normaliser) it is mean instance 1.5 + 0.5 * mean class 3.5 = 3.25."""
    per_sample = torch.tensor([1.0, 2.0, 3.0, 4.0])
    is_class = torch.tensor([False, False, True, True])
    total = prior_preservation_sum(per_sample, is_class, 0.5)
    assert total.item() == 6.5 and total.item() / 2 == 1.5 + 0.5 * 3.5
    assert prior_preservation_sum(per_sample[:2], is_class[:2], 0.5).item() == 3.0  # no class rows: instances


def test_batches_pair_each_instance_with_class_image_i_mod_n():
    """Instances 0..2 with two class images: a batch of instances [2, 1] holds class images [0, 1] after them,
    captioned with the class prompt, flagged is_class; center crops of the resized images."""
    def example(value: float, caption: str) -> ImageExample:
        return ImageExample(torch.full((3, 8, 12), value), caption, None)

    data = ImageData([example(i, f"instance {i}") for i in range(3)], [example(10 + j, "cls") for j in range(2)],
                     None)
    settings = ImageSection(resolution=8, center_crop=True, class_data="x", class_prompt="cls")
    steps = ImageSteps(data, tiny_clip_tokenizer(), settings)
    batch = steps.batch([2, 1], "cpu")
    assert batch["pixel_values"].shape == (4, 3, 8, 8)
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [2.0, 1.0, 10.0, 11.0]
    assert batch["is_class"].tolist() == [False, False, True, True]
    tokenizer = tiny_clip_tokenizer()
    cls_ids = tokenizer("cls", padding="max_length", max_length=16, return_tensors="pt").input_ids[0]
    assert torch.equal(batch["input_ids"][2], cls_ids) and torch.equal(batch["input_ids"][3], cls_ids)
    assert not torch.equal(batch["input_ids"][0], cls_ids)
    assert [steps.weight(i) for i in range(3)] == [1, 1, 1] and len(steps) == 3
