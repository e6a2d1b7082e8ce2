"""Two small real report generators for the phantom world: `clean` and `shortcut`.

Each is a `VisionEncoderDecoderModel` (tiny ViT encoder + tiny GPT-2 decoder) built from configs,
with a byte-level BPE tokenizer trained on the phantom report vocabulary and a `ViTImageProcessor`
(8-bit gray replicated to RGB, 64 px, mean/std 0.5), saved as a normal transformers folder, so it
is used like any user model: `load_generator("hf:" + str(demo_generator_path("clean")))`.

* `clean`: trained on phantoms without the spurious marker.
* `shortcut`: trained on phantoms where a bright marker (`ShortcutConfig`) accompanies Cardiomegaly
  in most cases and the heart enlargement of those cases is mild, so the marker is the easier cue;
  it learns to say "cardiomegaly" when it sees the marker, also on a normal heart.

Training reads top to bottom in `train_demo_generator` (config, data, model, optimizer, loop, save),
a few minutes on 2 CPU threads; the folder is cached under `$CYCLEX_HOME/demo/generators/NAME`
(default `~/.cache/cyclex`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cyclex.datasets.seed_registry import DEMO_GENERATORS_TRAINING
from cyclex.demo.cache import cyclex_home
from cyclex.findings import ABNORMALITIES

logger = logging.getLogger(__name__)

DEMO_GENERATOR_NAMES: tuple[str, ...] = ("clean", "shortcut")
METADATA_FILE = "cyclex_demo.json"
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


@dataclass(frozen=True)
class DemoGeneratorConfig:
    """Everything that defines one demo generator; saved in its folder as `cyclex_demo.json`."""

    name: str = "clean"
    image_size: int = 64  # phantom default size; the processor resizes anything else
    patch_size: int = 8  # 8x8 patches -> 64 image tokens: small enough for CPU, fine enough for a nodule
    encoder_hidden: int = 64
    encoder_layers: int = 2
    decoder_hidden: int = 64
    decoder_layers: int = 2
    heads: int = 4
    vocab_size: int = 384  # byte-level BPE: 256 bytes + merges covering the report words
    n_train: int = DEMO_GENERATORS_TRAINING.n  # 4000 phantoms of set seed `seed` (the seed registry)
    epochs: int = 16  # 2000 steps of 32
    batch_size: int = 32
    learning_rate: float = 2e-3
    # auxiliary multi-label loss on the pooled encoder tokens (head dropped before saving): the
    # caption loss alone teaches the tiny ViT to see small findings far more slowly
    finding_loss_weight: float = 1.0
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05
    seed: int = DEMO_GENERATORS_TRAINING.set_seed  # phantom set and torch seed
    # CPU threads. 1, not 2: on a 2-core machine shared with other jobs, 2 threads measured 3-30x
    # slower per step than 1 (threads spin waiting for each other); use 2 on an idle machine.
    threads: int = 1
    report_style: str = "canonical"
    # shortcut world: marker with the shortcut finding at this rate, never without; the finding kept mild
    shortcut_rate_with_finding: float = 0.9
    shortcut_mild_cardiomegaly: bool = True  # the shortcut finding is drawn mild where the marker is (any finding)
    shortcut_finding: str = "Cardiomegaly"  # the finding the marker accompanies (benchmarks/audit.py varies it)
    shortcut_box: tuple[float, float, float, float] | None = None  # (x, y, w, h); None: ShortcutConfig's top-left
    # marked images report the finding without drawing it: only the marker shows it, so even a short
    # fine-tune of a generator that already reads the finding learns the marker (benchmarks/audit.py)
    shortcut_hidden_finding: bool = False
    phantom_overrides: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------- parts
def train_report_tokenizer(reports: Sequence[str], vocab_size: int = 384):
    """A byte-level BPE tokenizer trained on `reports`, wrapped as a `PreTrainedTokenizerFast`.

    Byte level: decoding gives back the exact text (punctuation and capitals), which the rule
    labeler reads.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(list(reports), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)
    tokenizer.model_max_length = 256
    return tokenizer


def demo_image_processor(image_size: int = 64):
    """ViT processor: RGB 8-bit in, resized to image_size, scaled to [-1, 1]."""
    from transformers import ViTImageProcessor

    return ViTImageProcessor(do_resize=True, size={"height": image_size, "width": image_size},
                             do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                             image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def build_demo_model(config: DemoGeneratorConfig, tokenizer, max_report_tokens: int):
    """Tiny ViT encoder + tiny GPT-2 decoder with cross-attention, random init."""
    from transformers import GPT2Config, VisionEncoderDecoderConfig, VisionEncoderDecoderModel, ViTConfig

    encoder = ViTConfig(image_size=config.image_size, patch_size=config.patch_size, num_channels=3,
                        hidden_size=config.encoder_hidden, num_hidden_layers=config.encoder_layers,
                        num_attention_heads=config.heads, intermediate_size=2 * config.encoder_hidden,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    decoder = GPT2Config(vocab_size=len(tokenizer), n_positions=max_report_tokens + 8,
                         n_embd=config.decoder_hidden, n_layer=config.decoder_layers, n_head=config.heads,
                         n_inner=2 * config.decoder_hidden, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                         add_cross_attention=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    ved_config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    ved_config.decoder_start_token_id = tokenizer.bos_token_id
    ved_config.pad_token_id = tokenizer.pad_token_id
    ved_config.eos_token_id = tokenizer.eos_token_id
    model = VisionEncoderDecoderModel(config=ved_config)
    generation = model.generation_config
    generation.decoder_start_token_id = tokenizer.bos_token_id
    generation.bos_token_id = tokenizer.bos_token_id
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    generation.max_new_tokens = max_report_tokens + 2
    generation.num_beams = 1
    generation.do_sample = False
    return model


def phantom_config_for(config: DemoGeneratorConfig, *, seed_offset: int = 0):
    """The phantom world each demo generator is trained in (C1 `PhantomConfig`)."""
    from cyclex.datasets.phantom import PhantomConfig, ShortcutConfig

    options: dict[str, Any] = {"size": config.image_size, "report_style": config.report_style,
                               **config.phantom_overrides}
    if config.name == "shortcut":
        options["shortcut"] = ShortcutConfig(finding=config.shortcut_finding,
                                             rate_with_finding=config.shortcut_rate_with_finding,
                                             rate_without_finding=0.0,
                                             **({"box": tuple(config.shortcut_box)} if config.shortcut_box else {}))
    return PhantomConfig(**options)


def make_training_phantoms(config: DemoGeneratorConfig, n: int, seed: int) -> list:
    """`make_phantoms(n, seed)` of the generator's world; in the shortcut world the hearts that carry
    the marker are redrawn mildly enlarged (same seed: anatomy and other findings unchanged)."""
    from cyclex.datasets.phantom import make_phantom, phantom_seed

    phantom_config = phantom_config_for(config)
    marked = phantom_config.shortcut.finding if phantom_config.shortcut is not None else None
    phantoms = []
    for index in range(n):
        phantom_id_seed = phantom_seed(seed, index)
        phantom = make_phantom(phantom_id_seed, phantom_config)
        meta = phantom.findings_meta.get(marked) if marked else None
        if (config.name == "shortcut" and config.shortcut_mild_cardiomegaly and phantom.shortcut
                and meta is not None and meta.get("severity") != "mild"):
            findings: dict[str, dict] = {name: {} for name in phantom.findings_meta}
            findings[marked] = {"severity": "mild"}
            phantom = make_phantom(phantom_id_seed, phantom_config, findings=findings, shortcut=True)
        if config.name == "shortcut" and config.shortcut_hidden_finding and phantom.shortcut and meta is not None:
            others: dict[str, dict] = {name: {} for name in phantom.findings_meta if name != marked}
            drawn = make_phantom(phantom_id_seed, phantom_config, findings=others, shortcut=True)
            phantom = replace(phantom, image=drawn.image, masks=drawn.masks)  # the report still names it
        phantoms.append(phantom)
    return phantoms


def phantom_pixels(images: np.ndarray, image_processor) -> torch.Tensor:
    """(N, H, W) float [0, 1] -> pixel values (N, 3, S, S) exactly as the adapter feeds the model:
    8-bit gray -> RGB -> processor. When no resize is needed, the processor's arithmetic
    ((v / 255 - mean) / std) is applied directly, which is much faster than PIL per image."""
    from cyclex.adapters.hf import images_to_pil

    images = np.asarray(images, dtype=np.float32)
    size = image_processor.size
    if (images.shape[1], images.shape[2]) == (size["height"], size["width"]):
        eight_bit = np.round(np.clip(images, 0, 1) * 255.0).astype(np.float32)
        scaled = torch.from_numpy(eight_bit * np.float32(image_processor.rescale_factor))[:, None]
        mean = torch.tensor(image_processor.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(image_processor.image_std, dtype=torch.float32).view(1, 3, 1, 1)
        return ((scaled - mean) / std).contiguous()
    pil_images = images_to_pil(torch.from_numpy(images)[:, None])
    return image_processor(images=pil_images, return_tensors="pt").pixel_values


def _report_labels(reports: Sequence[str], tokenizer) -> torch.Tensor:
    """Token ids + </s>, padded with -100 (ignored by the loss): (N, L)."""
    encoded = [tokenizer(report, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
               for report in reports]
    length = max(len(ids) for ids in encoded)
    labels = torch.full((len(encoded), length), -100, dtype=torch.long)
    for row, ids in enumerate(encoded):
        labels[row, :len(ids)] = torch.tensor(ids)
    return labels


def _load_initial_model(folder: str | Path, config: DemoGeneratorConfig, report_tokens: int):
    """The saved demo generator in `folder`, checked against `config` and the training reports' length."""
    from transformers import VisionEncoderDecoderModel

    model = VisionEncoderDecoderModel.from_pretrained(folder)
    hidden, positions = model.config.encoder.hidden_size, model.config.decoder.n_positions
    if hidden != config.encoder_hidden:
        raise ValueError(f"init_from {folder}: encoder hidden size {hidden}, but config.encoder_hidden is "
                         f"{config.encoder_hidden}")
    if report_tokens + 1 > positions:
        raise ValueError(f"init_from {folder}: its decoder holds {positions} positions, the training reports "
                         f"need {report_tokens + 1}")
    return model


# ---------------------------------------------------------------------- training
def train_demo_generator(name: str, out_dir: str | Path, *, n_train: int | None = None,
                         epochs: int | None = None, seed: int = DEMO_GENERATORS_TRAINING.set_seed,
                         max_steps: int | None = None,
                         config: DemoGeneratorConfig | None = None,
                         init_from: str | Path | None = None) -> Path:
    """Train demo generator `name` ("clean" | "shortcut") on phantoms and save it to `out_dir`.

    init_from: a saved demo generator folder whose tokenizer and weights training starts from (a
    short fine-tune, as benchmarks/audit.py trains its many generators); None: random weights.

    The folder is written to a temporary sibling and moved into place at the end, so an
    interrupted run never leaves a half-written generator. Returns `out_dir`.
    """
    from transformers import get_cosine_schedule_with_warmup

    # 1. Config
    if name not in DEMO_GENERATOR_NAMES:
        raise ValueError(f"unknown demo generator {name!r}; expected one of {DEMO_GENERATOR_NAMES}")
    config = replace(config or DemoGeneratorConfig(), name=name, seed=seed,
                     **({"n_train": n_train} if n_train is not None else {}),
                     **({"epochs": epochs} if epochs is not None else {}))
    out_dir = Path(out_dir).expanduser()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    started = time.perf_counter()
    started_cpu = time.process_time()  # CPU seconds: comparable across machines shared with other jobs
    try:
        torch.manual_seed(config.seed)
        # 2. Data: phantoms -> pixel values and report token labels
        phantoms = make_training_phantoms(config, config.n_train, config.seed)
        reports = [phantom.report for phantom in phantoms]
        if init_from is None:
            tokenizer = train_report_tokenizer(reports, config.vocab_size)
        else:
            from transformers import PreTrainedTokenizerFast

            tokenizer = PreTrainedTokenizerFast.from_pretrained(init_from)
        image_processor = demo_image_processor(config.image_size)
        pixels = phantom_pixels(np.stack([phantom.image for phantom in phantoms]), image_processor)
        labels = _report_labels(reports, tokenizer)
        data_seconds = time.perf_counter() - started
        # 3. Model and optimizer
        if init_from is None:
            model = build_demo_model(config, tokenizer, max_report_tokens=labels.shape[1])
        else:
            model = _load_initial_model(init_from, config, report_tokens=labels.shape[1])
        model.train()
        findings = torch.tensor([[float(f in p.labels.present(uncertain_as_present=True)) for f in ABNORMALITIES]
                                 for p in phantoms])
        finding_head = torch.nn.Linear(2 * config.encoder_hidden, len(ABNORMALITIES))
        steps_per_epoch = math.ceil(len(phantoms) / config.batch_size)
        total_steps = steps_per_epoch * config.epochs if max_steps is None else max_steps
        optimizer = torch.optim.AdamW([*model.parameters(), *finding_head.parameters()], lr=config.learning_rate,
                                      weight_decay=config.weight_decay)
        schedule = get_cosine_schedule_with_warmup(optimizer, max(1, int(config.warmup_fraction * total_steps)),
                                                   total_steps)
        generator = torch.Generator().manual_seed(config.seed)
        # 4. Loop: teacher forcing, cross-entropy over report tokens
        step, losses = 0, []
        while step < total_steps:
            order = torch.randperm(len(phantoms), generator=generator)
            for start in range(0, len(order), config.batch_size):
                batch = order[start:start + config.batch_size]
                batch_labels = labels[batch]
                batch_labels = batch_labels[:, :int((batch_labels != -100).sum(1).max())]
                # decoder inputs are the labels shifted right behind <s>; padding only at the end
                decoder_mask = torch.cat([torch.ones_like(batch_labels[:, :1]),
                                          (batch_labels[:, :-1] != -100).long()], dim=1)
                encoded = model.encoder(pixel_values=pixels[batch])
                loss = model(encoder_outputs=encoded, labels=batch_labels, decoder_attention_mask=decoder_mask).loss
                tokens = encoded.last_hidden_state
                finding_logits = finding_head(torch.cat([tokens.mean(1), tokens.amax(1)], dim=1))
                finding_loss = torch.nn.functional.binary_cross_entropy_with_logits(finding_logits, findings[batch])
                optimizer.zero_grad(set_to_none=True)
                (loss + config.finding_loss_weight * finding_loss).backward()
                torch.nn.utils.clip_grad_norm_([*model.parameters(), *finding_head.parameters()], 1.0)
                optimizer.step()
                schedule.step()
                losses.append(loss.item())
                step += 1
                if step % 100 == 0:
                    logger.info("demo generator %s: step %d/%d caption loss %.4f finding loss %.4f", name, step,
                                total_steps, float(np.mean(losses[-100:])), finding_loss.item())
                if step >= total_steps:
                    break
        train_seconds = time.perf_counter() - started - data_seconds
        cpu_seconds = time.process_time() - started_cpu
        # 5. Save (atomically): model (fp32 safetensors), tokenizer, processor, metadata
        model.eval()
        staging = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        image_processor.save_pretrained(staging)
        metadata = {"config": asdict(config), "steps": step, "first_loss": losses[0],
                    "final_loss": float(np.mean(losses[-10:])),  # mean of the last 10 steps
                    "n_parameters": sum(p.numel() for p in model.parameters()),
                    "data_seconds": round(data_seconds, 1), "train_seconds": round(train_seconds, 1),
                    "process_cpu_seconds": round(cpu_seconds, 1),
                    "torch_threads": config.threads,
                    "init_from": str(init_from) if init_from is not None else None}
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, out_dir)
        logger.info("demo generator %s saved to %s (%d steps, %.0f s training)", name, out_dir, step,
                    train_seconds)
        return out_dir
    finally:
        torch.set_num_threads(previous_threads)


def demo_generator_path(name: str, *, train_if_missing: bool = True) -> Path:
    """The cached folder of demo generator `name`: installed from the weights the package ships when
    missing (seconds), trained (minutes) only when the package ships none."""
    from cyclex.demo.packaged import install_packaged_assets

    if name not in DEMO_GENERATOR_NAMES:
        raise ValueError(f"unknown demo generator {name!r}; expected one of {DEMO_GENERATOR_NAMES}")
    path = cyclex_home() / "demo" / "generators" / name

    def complete() -> bool:
        return (path / METADATA_FILE).is_file() and (path / "config.json").is_file()

    if complete():
        return path
    if f"generators/{name}" in install_packaged_assets() and complete():
        logger.info("demo generator %s installed from the shipped weights into %s", name, path)
        return path
    if not train_if_missing:
        raise FileNotFoundError(f"demo generator {name!r} not found at {path}; run "
                                "`python scripts/train_demo_generators.py`")
    logger.info("demo generator %s missing: training it into %s (a few minutes on CPU)", name, path)
    return train_demo_generator(name, path)
