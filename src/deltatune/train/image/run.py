"""Setting up a text-to-image run for the training loop (loop.py): the data first (every image read and
checked, no model loaded), then the pipeline with its adapters and the loss steps the loop takes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from ...api import get_peft_model
from ...errors import DeltaConfigError
from ...io.pipelines import load_pipeline
from .adapters import ImageAdapters
from .data import METADATA, ImageExample, caption_rows, class_rows, crop_and_flip, read_examples
from .loss import check_prediction_type
from .settings import TEXT_ENCODER_TARGETS, ImageSection


@dataclass
class ImageData:
    instances: list[ImageExample]
    classes: list[ImageExample]  # prior preservation's class images; [] without it
    metadata: Path

    def fingerprint_files(self) -> list[str]:
        """The files whose content defines the run's data (for --resume's change check)."""
        return [str(p) for p in dict.fromkeys([self.metadata, *(e.path for e in self.instances + self.classes)])]

    def summary(self) -> str:
        extra = f", {len(self.classes)} class images" if self.classes else ""
        return f"{len(self.instances)} images{extra}"


def read_image_data(settings: ImageSection, folder: str) -> ImageData:
    """Every training image (and class image) read and resized, before any model loads.

    Raises:
        DataError: see data.caption_rows, data.class_rows and data.load_image.
    """
    if not folder:
        raise DeltaConfigError("data.train is required: a folder of images with a metadata.jsonl")
    instances = read_examples(caption_rows(folder, settings.caption_column), settings.resolution)
    classes = []
    if settings.class_data:
        classes = read_examples(class_rows(settings.class_data, settings.class_prompt), settings.resolution)
    return ImageData(instances, classes, Path(folder) / METADATA)


class ImageSteps:
    """The loop's loss step for images: a batch of instance images (each paired with a class image under
    prior preservation), cropped and flipped with the generator the loop seeds, and the summed loss of
    ImageAdapters.forward. Each instance image counts 1 toward the step's normaliser."""

    unit = "images"

    def __init__(self, data: ImageData, tokenizer, settings: ImageSection) -> None:
        self.data, self.settings = data, settings

        def token_ids(examples: list[ImageExample]) -> torch.Tensor:  # (N, L), padded to the model's length
            if not examples:
                return torch.zeros(0, tokenizer.model_max_length, dtype=torch.long)
            return tokenizer([e.caption for e in examples], padding="max_length", truncation=True,
                             max_length=tokenizer.model_max_length, return_tensors="pt").input_ids

        self.instance_ids, self.class_ids = token_ids(data.instances), token_ids(data.classes)

    def __len__(self) -> int:
        return len(self.data.instances)

    def weight(self, index: int) -> int:
        return 1

    def size(self, index: int) -> int:
        return 1

    def batch(self, indices: list[int], device) -> dict[str, torch.Tensor]:
        s = self.settings
        pixels = [crop_and_flip(self.data.instances[i].pixels, s.resolution, s.center_crop, s.random_flip)
                  for i in indices]
        ids = [self.instance_ids[i] for i in indices]
        if self.data.classes:  # class image i mod N goes with instance i, as in DreamBooth's dataset
            picks = [i % len(self.data.classes) for i in indices]
            pixels += [crop_and_flip(self.data.classes[j].pixels, s.resolution, s.center_crop, s.random_flip)
                       for j in picks]
            ids += [self.class_ids[j] for j in picks]
        is_class = torch.tensor([False] * len(indices) + [True] * (len(pixels) - len(indices)))
        return {"pixel_values": torch.stack(pixels).to(device), "input_ids": torch.stack(ids).to(device),
                "is_class": is_class.to(device)}

    def loss_sum(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch)


def _check_pipeline(pipeline, settings: ImageSection, name: str) -> None:
    missing = [part for part in ("unet", "vae", "text_encoder", "tokenizer") if getattr(pipeline, part, None) is None]
    if missing:
        raise DeltaConfigError(
            f"model.name_or_path={name!r}: a {type(pipeline).__name__} without {missing}; text-to-image training "
            "takes a UNet pipeline with one CLIP text encoder (StableDiffusionPipeline layout)"
        )
    check_prediction_type(pipeline.scheduler.config.get("prediction_type", "epsilon"))
    levels = len(pipeline.vae.config.block_out_channels) + len(pipeline.unet.config.block_out_channels) - 2
    factor = 2**levels
    if settings.resolution % factor:
        raise DeltaConfigError(f"image.resolution={settings.resolution}: must be a multiple of {factor} for this "
                               "pipeline (its VAE and UNet each halve the size per level)")


def build_image_model(config, data: ImageData, method_config, seed: int, dtype: torch.dtype):
    """The pipeline loaded from model.name_or_path with its adapters (initialised from `seed`), as the
    module the loop trains, the loop's loss steps, and the pipeline's tokenizer.

    Raises:
        ModelNotFoundError, ModuleNotFoundError: see io.models.load_pipeline.
        DeltaConfigError: a pipeline without a UNet and CLIP text encoder, a resolution it cannot take,
            a scheduler target other than epsilon or v_prediction, or targets that match no module.
    """
    from diffusers import DDPMScheduler

    settings = config.image
    pipeline = load_pipeline(config.model.name_or_path, dtype)
    _check_pipeline(pipeline, settings, config.model.name_or_path)
    torch.manual_seed(seed)  # the adapters' initial weights
    unet = get_peft_model(pipeline.unet, method_config)
    text_encoder = pipeline.text_encoder
    if settings.train_text_encoder:
        targets = settings.text_encoder_target_modules or TEXT_ENCODER_TARGETS
        text_encoder = get_peft_model(text_encoder, dataclasses.replace(method_config, target_modules=list(targets)))
    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    model = ImageAdapters(unet, text_encoder, pipeline.vae, noise_scheduler, settings.snr_gamma,
                          settings.prior_loss_weight, settings.train_text_encoder)
    return model, ImageSteps(data, pipeline.tokenizer, settings), pipeline.tokenizer
