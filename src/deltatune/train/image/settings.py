"""The `image:` section of a run config (model.task: text-to-image) and the checks that tie it to the
other sections. Plain values only: nothing here imports diffusers.

    model:  {name_or_path: PIPELINE_FOLDER, task: text-to-image}
    data:   {train: IMAGE_FOLDER}                   # images + metadata.jsonl (file_name + caption)
    image:  caption_column, resolution, center_crop, random_flip, snr_gamma,
            class_data, class_prompt, prior_loss_weight, train_text_encoder, text_encoder_target_modules
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ...errors import require

TEXT_TO_IMAGE = "text-to-image"
# diffusers' own LoRA scripts target the attention projections of the denoiser and of CLIP
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass
class ImageSection:
    caption_column: str = "text"  # the metadata.jsonl field holding each image's caption
    resolution: int = 512  # images are resized (shorter side) and cropped to resolution x resolution
    center_crop: bool = False  # false: a random crop per step (when the resized image is not square)
    random_flip: bool = False  # flip left-right with probability 1/2 per step
    snr_gamma: float | None = None  # min-SNR-gamma loss weighting (Hang et al. 2023); the paper uses 5
    class_data: str | None = None  # prior preservation (DreamBooth): a folder of class images
    class_prompt: str | None = None  # the caption of every class image
    prior_loss_weight: float = 1.0  # loss = instance loss + prior_loss_weight * class loss
    train_text_encoder: bool = False  # an adapter on the text encoder too
    text_encoder_target_modules: list[str] | None = None  # null: CLIP's q/k/v/out_proj

    def __post_init__(self) -> None:
        require(bool(self.caption_column), "image.caption_column", self.caption_column, "must be a field name")
        require(self.resolution >= 8, "image.resolution", self.resolution, "must be at least 8 pixels")
        require(self.snr_gamma is None or self.snr_gamma > 0, "image.snr_gamma", self.snr_gamma,
                "must be > 0 (or null for plain MSE); the paper uses 5")
        require(self.prior_loss_weight >= 0, "image.prior_loss_weight", self.prior_loss_weight, "must be >= 0")
        require((self.class_data is None) == (self.class_prompt is None), "image.class_prompt",
                self.class_prompt, "prior preservation needs both image.class_data (a folder of class images) "
                "and image.class_prompt (their caption)")
        require(self.text_encoder_target_modules is None or self.train_text_encoder,
                "image.text_encoder_target_modules", self.text_encoder_target_modules,
                "needs image.train_text_encoder=true")


def check_image_run(config: Any) -> None:
    """Cross-section checks of a RunConfig: an `image:` setting only with model.task=text-to-image, and the
    text-only settings an image run cannot honour refused by name (before anything loads).

    Raises:
        DeltaConfigError: naming the key at fault.
    """
    if config.model.task != TEXT_TO_IMAGE:
        for f in dataclasses.fields(ImageSection):
            value = getattr(config.image, f.name)
            require(value == f.default, f"image.{f.name}", value,
                    f"is a text-to-image setting; set model.task: {TEXT_TO_IMAGE}")
        return
    data, training = config.data, config.training
    require(isinstance(data.train, str) or data.train is None, "data.train", data.train,
            "must be one folder of images with a metadata.jsonl for model.task=text-to-image")
    require(data.eval is None and data.val_split is None, "data.eval" if data.eval else "data.val_split",
            data.eval or data.val_split, "text-to-image runs have no evaluation set; remove it")
    require(not data.packing, "data.packing", data.packing, "packs token sequences; not for text-to-image")
    require(config.model.quantize is None, "model.quantize", config.model.quantize,
            "quantized bases are for language models; not for text-to-image")
    require(training.neftune_noise_alpha is None, "training.neftune_noise_alpha", training.neftune_noise_alpha,
            "adds noise to token embeddings; not for text-to-image")
    require(not training.gradient_checkpointing, "training.gradient_checkpointing",
            training.gradient_checkpointing, "is not supported for text-to-image runs yet")
    require(training.metric_for_best is None, "training.metric_for_best", training.metric_for_best,
            "needs an evaluation set, which text-to-image runs do not have")
    require(config.method.get("task_type") is None, "method.task_type", config.method.get("task_type"),
            "an image model's adapters have no task type; remove it")
