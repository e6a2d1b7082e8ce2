"""Any transformers image-to-text model as a report generator.

Two families are handled by one class:

* encoder-decoder captioners (`VisionEncoderDecoderModel`, e.g. ViT + GPT-2): image processor +
  tokenizer, `model.generate(pixel_values=...)`, decoded with special tokens skipped;
* instruction-following vision-language models (`AutoModelForImageTextToText`: LLaVA, BLIP, ...):
  one processor, `processor(images=..., text=prompt)`, the prompt (e.g. "Describe the findings")
  is wrapped in the processor's chat template when it has one (else the image token is prepended
  when missing), and the prompt tokens are stripped from what a decoder-only model returns.

cyclex images (B, 1, H, W) in [0, 1] are converted to 8-bit RGB PIL images, so the model's own
processor does its usual resize/normalise exactly as it would on files from disk.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cyclex.adapters.base import GeneratorError, GeneratorInfo
from cyclex.adapters.callable import generate_in_batches

logger = logging.getLogger(__name__)

# Greedy decoding unless the user asks otherwise: reports must be reproducible for the cycle check.
DEFAULT_GENERATION_KWARGS: dict[str, Any] = {"max_new_tokens": 96, "num_beams": 1, "do_sample": False}


def images_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 1, H, W) float in [0, 1] -> B RGB PIL images (gray replicated to 3 channels, 8 bit)."""
    gray = (images[:, 0].clamp(0, 1).cpu().numpy() * 255.0).round().astype(np.uint8)
    return [Image.fromarray(plane).convert("RGB") for plane in gray]


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class HFImageToTextGenerator:
    """A transformers image-to-text model (local folder or hub id) behind `generate(images)`.

    model: a `VisionEncoderDecoderModel` or an image-text-to-text model.
    processor: the model's processor (instruction models) -- or None for encoder-decoder models,
        which use `image_processor` + `tokenizer` instead.
    prompt: instruction text for instruction models (ignored with a warning for encoder-decoders).
    generation_kwargs: passed to `model.generate`, over `DEFAULT_GENERATION_KWARGS`.
    batch_size: images per `generate` call.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        processor: Any = None,
        image_processor: Any = None,
        tokenizer: Any = None,
        prompt: str | None = None,
        generation_kwargs: Mapping[str, Any] | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 16,
        name: str | None = None,
    ):
        self.is_encoder_decoder_captioner = model.config.model_type == "vision-encoder-decoder"
        if self.is_encoder_decoder_captioner:
            image_processor = image_processor or getattr(processor, "image_processor", None)
            tokenizer = tokenizer or getattr(processor, "tokenizer", None)
            if image_processor is None or tokenizer is None:
                raise ValueError("a VisionEncoderDecoderModel needs an image_processor and a tokenizer")
            if prompt:
                logger.warning("prompt %r ignored: encoder-decoder captioners take no instruction", prompt)
                prompt = None
        elif processor is None:
            raise ValueError(f"model type {model.config.model_type!r} needs its processor (AutoProcessor)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device) if device is not None else _default_device()
        self.model = model.to(self.device).eval()
        self.processor = processor
        self.image_processor = image_processor if image_processor is not None else getattr(
            processor, "image_processor", None)
        self.tokenizer = tokenizer if tokenizer is not None else getattr(processor, "tokenizer", None)
        self.prompt = prompt
        self.generation_kwargs = {**DEFAULT_GENERATION_KWARGS, **dict(generation_kwargs or {})}
        self.batch_size = batch_size
        self.info = GeneratorInfo(
            name=name or f"hf:{getattr(model, 'name_or_path', '') or type(model).__name__}",
            input_size=self._processor_size(),
            channels=3,
            mean=tuple(getattr(self.image_processor, "image_mean", None) or (0.5, 0.5, 0.5)),
            std=tuple(getattr(self.image_processor, "image_std", None) or (0.5, 0.5, 0.5)),
            views_per_study=1,
        )
        self._warned_multiview = False

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path,
        prompt: str | None = None,
        generation_kwargs: Mapping[str, Any] | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 16,
        dtype: torch.dtype | None = None,
        local_files_only: bool | None = None,
    ) -> HFImageToTextGenerator:
        """Load a model folder or hub id; an existing local folder never touches the network."""
        from transformers import (
            AutoConfig,
            AutoImageProcessor,
            AutoModelForImageTextToText,
            AutoProcessor,
            AutoTokenizer,
            VisionEncoderDecoderModel,
        )

        source = str(path_or_id)
        if local_files_only is None:
            local_files_only = Path(source).is_dir()
        options = {"local_files_only": local_files_only}
        model_options = dict(options, **({"dtype": dtype} if dtype is not None else {}))
        try:
            config = AutoConfig.from_pretrained(source, **options)
            if config.model_type == "vision-encoder-decoder":
                model = VisionEncoderDecoderModel.from_pretrained(source, **model_options)
                image_processor = AutoImageProcessor.from_pretrained(source, **options)
                tokenizer = AutoTokenizer.from_pretrained(source, **options)
                return cls(model, image_processor=image_processor, tokenizer=tokenizer, prompt=prompt,
                           generation_kwargs=generation_kwargs, device=device, batch_size=batch_size,
                           name=f"hf:{source}")
            model = AutoModelForImageTextToText.from_pretrained(source, **model_options)
            processor = AutoProcessor.from_pretrained(source, **options)
        except (OSError, ValueError, KeyError) as error:
            raise GeneratorError(
                f"cannot load a transformers image-to-text model from {source!r}: {error}") from error
        return cls(model, processor=processor, prompt=prompt, generation_kwargs=generation_kwargs,
                   device=device, batch_size=batch_size, name=f"hf:{source}")

    def _processor_size(self) -> tuple[int, int] | None:
        size = getattr(self.image_processor, "size", None)
        if size is None:
            return None
        if isinstance(size, int):
            return (size, size)
        getter = size.get if isinstance(size, Mapping) else (lambda key: getattr(size, key, None))
        height, width = getter("height"), getter("width")
        if height and width:
            return (int(height), int(width))
        shortest = getter("shortest_edge")
        return (int(shortest), int(shortest)) if shortest else None

    # ------------------------------------------------------------------ generation
    def generate(self, images: torch.Tensor) -> list[str]:
        """images: (B, 1, H, W) float in [0, 1] (multi-view: the first view is used) -> B reports."""
        return generate_in_batches(self.info.name, images, self.batch_size, self._generate_batch)

    def _single_view(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim == 5:
            if images.shape[1] > 1 and not self._warned_multiview:
                logger.warning("%s takes one view per study; using the first of %d views",
                               self.info.name, images.shape[1])
                self._warned_multiview = True
            images = images[:, 0]
        return images

    @torch.no_grad()
    def _generate_batch(self, images: torch.Tensor) -> list[str]:
        # 1. Convert to what the processor reads from disk
        pil_images = images_to_pil(self._single_view(images))
        # 2. Encoder-decoder captioners: pixels in, tokens out
        if self.is_encoder_decoder_captioner:
            pixel_values = self.image_processor(images=pil_images, return_tensors="pt").pixel_values
            pixel_values = pixel_values.to(self.device, dtype=self.model.dtype)
            sequences = self.model.generate(pixel_values=pixel_values, **self.generation_kwargs)
            return [text.strip() for text in self.tokenizer.batch_decode(sequences, skip_special_tokens=True)]
        # 3. Instruction models: the prompt travels with every image
        prompt_text = self._prompt_text()
        inputs = self.processor(images=pil_images, text=[prompt_text] * len(pil_images),
                                return_tensors="pt", padding=True)
        inputs = {key: value.to(self.device) for key, value in inputs.items()}
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        sequences = self.model.generate(**inputs, **self.generation_kwargs)
        # 4. Decoder-only models echo the prompt tokens: keep only the new ones
        input_ids = inputs.get("input_ids")
        if input_ids is not None and sequences.shape[1] >= input_ids.shape[1] and torch.equal(
                sequences[:, :input_ids.shape[1]], input_ids):
            sequences = sequences[:, input_ids.shape[1]:]
        texts = self.tokenizer.batch_decode(sequences, skip_special_tokens=True)
        return [self._strip_prompt(text) for text in texts]

    def _prompt_text(self) -> str:
        instruction = self.prompt or ""
        chat_template = getattr(self.processor, "chat_template", None)
        if chat_template:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        image_token = getattr(self.processor, "image_token", None)
        if image_token and image_token not in instruction:
            return f"{image_token}\n{instruction}" if instruction else image_token
        return instruction

    def _strip_prompt(self, text: str) -> str:
        """Remove an echoed instruction (models like BLIP return the prompt as a text prefix)."""
        text = text.strip()
        if self.prompt and text.startswith(self.prompt.strip()):
            text = text[len(self.prompt.strip()):]
        return text.strip()

    def __repr__(self) -> str:
        return f"HFImageToTextGenerator({self.info.name!r}, device={self.device})"
