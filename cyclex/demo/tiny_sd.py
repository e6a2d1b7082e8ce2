"""Tiny Stable Diffusion components built from configs, for the phantom world and for tests.

The same recipe diffusers' own tests use (`get_dummy_components`): a small UNet2DConditionModel, a
small AutoencoderKL and a small CLIP text encoder, plus a CLIP BPE tokenizer whose vocabulary covers
the structured prompts. Everything is a real diffusers / transformers object, so the pipeline saves
and loads with `StableDiffusionPipeline.save_pretrained / from_pretrained` like a full-size one.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cyclex.findings import ABNORMALITIES, PRISM_TEMPLATE, StructuredPrompt

# Words that reports and prompts use besides the finding names; kept so the tokenizer also serves
# the raw-report ablation on phantom reports.
_EXTRA_WORDS = (
    "no acute cardiopulmonary process normal chest x-ray ray showing significant findings lung lungs "
    "with abnormalities the a is are there of and left right bilateral small moderate large mild severe "
    "possible possibly likely may be cannot excluded heart size within limits clear pleural effusion "
    "pneumothorax focal consolidation opacity enlarged silhouette tube line pacemaker rib fracture "
    "nodule edema atelectasis stable unchanged"
)


def prompt_corpus() -> list[str]:
    """Every single-finding and empty prompt of both templates, plus report words."""
    texts = [_EXTRA_WORDS]
    for template in (StructuredPrompt().template, PRISM_TEMPLATE):
        texts.append(StructuredPrompt((), template=template).text)
        texts.append(StructuredPrompt(ABNORMALITIES, template=template).text)
    return texts


_WORD_RE = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]+")


def write_clip_tokenizer(out_dir: str | Path, corpus: Iterable[str] | None = None) -> Path:
    """Write vocab.json + merges.txt for a `CLIPTokenizer` covering `corpus`.

    No tiny CLIP tokenizer ships offline, so one is trained here with `tokenizers`' BPE trainer,
    using CLIP's own word split and "</w>" suffix; the vocabulary is large enough that every corpus
    word ends as a single token.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts = [t.lower() for t in (corpus if corpus is not None else prompt_corpus())]
    words = sorted({w for t in texts for w in _WORD_RE.findall(t)})
    specials = ["<|startoftext|>", "<|endoftext|>", "!"]  # "!" pads, as in diffusers' tiny CLIP tests
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token="<|endoftext|>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    alphabet = list("abcdefghijklmnopqrstuvwxyz0123456789.,-'")
    trainer = trainers.BpeTrainer(
        vocab_size=10_000, special_tokens=specials, end_of_word_suffix="</w>", initial_alphabet=alphabet,
        min_frequency=1, show_progress=False,
    )
    bpe.train_from_iterator(words, trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    vocab = dict(state["vocab"])
    # Bare characters with the suffix must exist for words outside the corpus.
    for c in alphabet:
        vocab.setdefault(c + "</w>", len(vocab))
        vocab.setdefault(c, len(vocab))
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["merges"]]
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return out


def build_clip_tokenizer(corpus: Iterable[str] | None = None, model_max_length: int = 77):
    from transformers import CLIPTokenizer

    # from_pretrained on the written folder reads vocab.json + merges.txt in transformers 4 and 5 alike.
    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer(tmp, corpus)
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=model_max_length, pad_token="!")


@dataclass
class TinySDConfig:
    """Sizes of the tiny pipeline; the defaults make a 64 px model that trains in seconds on a CPU."""

    sample_size: int = 64  # image side in pixels
    unet_block_out_channels: tuple[int, ...] = (32, 64)
    unet_layers_per_block: int = 1
    vae_block_out_channels: tuple[int, ...] = (32, 64, 64)  # three blocks: latents are 4x smaller
    latent_channels: int = 4
    text_hidden_size: int = 32
    text_layers: int = 2
    text_heads: int = 4
    # False zeroes the text encoder's position embeddings; with text_layers=0 the encoder is then a
    # bag of tokens (each token's output depends on that token only), see DemoBaseSDConfig.
    text_position_embeddings: bool = True
    model_max_length: int = 48  # all 13 findings take 37 tokens; 77 works too
    seed: int = 0


def tiny_sd_components(config: TinySDConfig | None = None) -> dict:
    """unet, vae, text_encoder, tokenizer, scheduler for a `StableDiffusionPipeline`, random weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = config or TinySDConfig()
    tokenizer = build_clip_tokenizer(model_max_length=cfg.model_max_length)
    torch.manual_seed(cfg.seed)
    vae_blocks = len(cfg.vae_block_out_channels)
    latent_size = cfg.sample_size // (2 ** (vae_blocks - 1))
    unet_blocks = len(cfg.unet_block_out_channels)
    unet = UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        block_out_channels=cfg.unet_block_out_channels,
        layers_per_block=cfg.unet_layers_per_block,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (unet_blocks - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (unet_blocks - 1) + ("UpBlock2D",),
        cross_attention_dim=cfg.text_hidden_size,
        attention_head_dim=8,
        norm_num_groups=min(32, cfg.unet_block_out_channels[0]),
    )
    vae = AutoencoderKL(
        sample_size=cfg.sample_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=cfg.vae_block_out_channels,
        down_block_types=("DownEncoderBlock2D",) * vae_blocks,
        up_block_types=("UpDecoderBlock2D",) * vae_blocks,
        latent_channels=cfg.latent_channels,
        layers_per_block=1,
        norm_num_groups=min(32, cfg.vae_block_out_channels[0]),
    )
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_hidden_size,
        intermediate_size=cfg.text_hidden_size * 2,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=cfg.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=cfg.text_hidden_size,
    )
    text_encoder = CLIPTextModel(text_config)
    if not cfg.text_position_embeddings:
        # transformers 4 nests the embeddings under .text_model, transformers 5 does not
        embeddings = getattr(text_encoder, "text_model", text_encoder).embeddings
        with torch.no_grad():
            embeddings.position_embedding.weight.zero_()
    # SD v1.x scheduler settings (PRISM: scaled_linear betas 0.00085 .. 0.012).
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        num_train_timesteps=1000,
    )
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


def tiny_sd_pipeline(config: TinySDConfig | None = None):
    """A ready `StableDiffusionPipeline` of tiny random components (no safety checker)."""
    from diffusers import StableDiffusionPipeline

    parts = tiny_sd_components(config)
    pipe = StableDiffusionPipeline(
        **parts, safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def config_dict(config: TinySDConfig) -> dict:
    return asdict(config)
