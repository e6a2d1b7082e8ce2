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

Decoding follows the model's own `generation_config` (its `generation_config.json`: beams, lengths,
sampling); the `generation_kwargs` the caller passes (the spec's `::key=value` options) override
single fields. Two guards: a config that names no length gets `DEFAULT_MAX_NEW_TOKENS` (transformers'
own default of 20 tokens cuts reports short), and no call ever generates past the decoder's
positions (`n_positions` / `max_position_embeddings`): a learned position table of 64 entries raises
IndexError at token 65, so `max_new_tokens` is capped to what the positions leave after the prompt,
with one warning that names both numbers.
"""

from __future__ import annotations

import copy
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

# Used only when the model's generation_config names no length at all (neither max_new_tokens nor
# max_length): long enough for a findings section, and capped by the decoder's positions anyway.
DEFAULT_MAX_NEW_TOKENS = 96


def decoder_positions(model: torch.nn.Module) -> int | None:
    """How many token positions the text decoder has (None: no fixed table, e.g. unknown configs).

    VisionEncoderDecoder: its decoder's `n_positions` (GPT-2) or `max_position_embeddings` (BERT ...);
    image-text-to-text models: their text config's, else the model config's.
    """
    config = model.config
    text = getattr(config, "decoder", None) or getattr(config, "text_config", None) or config
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def resolve_generation_config(model: torch.nn.Module, overrides: Mapping[str, Any] | None = None):
    """The model's own `generation_config` with `overrides` applied (a copy; the model is untouched).

    Unknown override names are an error naming them (transformers would silently keep them as
    attributes). A config that names no length gets max_new_tokens=DEFAULT_MAX_NEW_TOKENS.
    """
    from transformers import GenerationConfig

    base = getattr(model, "generation_config", None)
    config = copy.deepcopy(base) if base is not None else GenerationConfig.from_model_config(model.config)
    overrides = dict(overrides or {})
    known = set(GenerationConfig().to_dict())
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"generation options {unknown} are not fields of transformers' GenerationConfig")
    if "max_length" in overrides and "max_new_tokens" not in overrides:
        config.max_new_tokens = None  # the caller's max_length wins over the model's max_new_tokens
    for key, value in overrides.items():
        setattr(config, key, value)
    if config.max_new_tokens is None and config.max_length is None:
        config.max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    return config


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
    generation_kwargs: fields of the model's `generation_config` to override (num_beams,
        max_new_tokens, do_sample, ...); everything else is the model's own. `generation_config` is
        the result, what every `generate` call uses (lengths capped to the decoder's positions).
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
        self.generation_config = resolve_generation_config(model, generation_kwargs)
        if self.generation_config.do_sample:
            logger.warning("%s samples its reports (do_sample=True in its generation config): the same image "
                           "gets different reports, so the cycle check is not reproducible; add ::do_sample=false "
                           "to the generator spec for greedy or beam decoding",
                           name or getattr(model, "name_or_path", type(model).__name__))
        self.positions = decoder_positions(model)
        self._warned_positions = False
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
    def generate(self, images) -> list[str]:
        """images: paths, PIL images, arrays or (B, 1, H, W) tensors in [0, 1] (`cyclex.adapters.inputs`;
        multi-view: the first view is used) -> B reports. Mixed sizes go in at the processor's size."""
        return generate_in_batches(self.info.name, images, self.batch_size, self._generate_batch,
                                   mixed_sizes_to=self.info.input_size)

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
            # the decoder starts from decoder_start_token_id: one position is taken before the first new token
            sequences = self.model.generate(pixel_values=pixel_values, generation_config=self._config_for(1))
            return [text.strip() for text in self.tokenizer.batch_decode(sequences, skip_special_tokens=True)]
        # 3. Instruction models: the prompt travels with every image
        prompt_text = self._prompt_text()
        inputs = self.processor(images=pil_images, text=[prompt_text] * len(pil_images),
                                return_tensors="pt", padding=True)
        inputs = {key: value.to(self.device) for key, value in inputs.items()}
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        prompt_length = inputs["input_ids"].shape[1] if "input_ids" in inputs else 0
        sequences = self.model.generate(**inputs, generation_config=self._config_for(prompt_length))
        # 4. Decoder-only models echo the prompt tokens: keep only the new ones
        input_ids = inputs.get("input_ids")
        if input_ids is not None and sequences.shape[1] >= input_ids.shape[1] and torch.equal(
                sequences[:, :input_ids.shape[1]], input_ids):
            sequences = sequences[:, input_ids.shape[1]:]
        texts = self.tokenizer.batch_decode(sequences, skip_special_tokens=True)
        return [self._strip_prompt(text) for text in texts]

    def _config_for(self, prompt_length: int):
        """The generation config of one call: max_new_tokens capped so prompt + report fit the positions."""
        config = copy.deepcopy(self.generation_config)
        wanted = config.max_new_tokens
        if wanted is None:  # a max_length from the model's config or the spec counts the prompt too
            wanted = max(1, int(config.max_length) - prompt_length)
        config.max_new_tokens, config.max_length = int(wanted), None
        if self.positions is None:
            return config
        room = self.positions - prompt_length
        if room < 1:
            raise GeneratorError(f"{self.info.name}: the prompt takes {prompt_length} tokens, all of the decoder's "
                                 f"{self.positions} positions; shorten ::prompt=")
        if wanted > room:
            if not self._warned_positions:
                logger.warning("%s: max_new_tokens=%d would run past the decoder's %d positions (prompt %d); "
                               "generating at most %d new tokens (set ::max_new_tokens= to silence this)",
                               self.info.name, wanted, self.positions, prompt_length, room)
                self._warned_positions = True
            config.max_new_tokens = room
        return config

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
