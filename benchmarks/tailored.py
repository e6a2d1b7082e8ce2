"""Tailored SD benchmark: training throughput of cyclex's loop vs a plain diffusers-style loop, and
reconstruction PSNR of the demo tailored SDs on held-out phantoms.

    python -m benchmarks.tailored [--steps 200] [--repeats 5] [--skip-psnr]

Writes benchmarks/results/tailored.json:
- `cyclex_images_per_s`, `plain_images_per_s`, `throughput_ratio_vs_plain_diffusers` (goal >= 0.95):
  both loops train the same tiny UNet on the same pre-encoded phantom latents with the same batch,
  optimizer, lr schedule and prompt dropout, alternating runs in the same process (best run of each);
  steady state, checkpoint saving excluded from both;
- `reconstruction_psnr_db`: {demo generator: mean PSNR of DDIM inversion (T = 50, guidance 1, prompt of
  the generator's own report) + regeneration over held-out phantoms}; `n_images`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results" / "tailored.json"
PROMPTS = ("The lung with no abnormalities", "The lung with abnormalities Cardiomegaly",
           "The lung with abnormalities Pleural Effusion", "The lung with abnormalities Cardiomegaly, Edema")


def _write_phantom_manifest(folder: Path, n: int) -> Path:
    from PIL import Image

    from cyclex.datasets.phantom import make_phantoms
    from cyclex.datasets.seed_registry import TAILORED_BENCHMARK_THROUGHPUT

    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "manifest.jsonl"
    with manifest.open("w") as handle:
        for i, phantom in enumerate(make_phantoms(n, seed=TAILORED_BENCHMARK_THROUGHPUT.set_seed)):
            path = folder / f"{phantom.id}.png"
            Image.fromarray((phantom.image * 255).round().astype(np.uint8)).save(path)
            handle.write(json.dumps({"id": phantom.id, "image": str(path), "prompt": PROMPTS[i % len(PROMPTS)]}) + "\n")
    return manifest


def plain_diffusers_loop(manifest: Path, base: Path, steps: int, batch_size: int, seed: int = 0) -> float:
    """The loop of diffusers' train_text_to_image.py, pared to the same work; returns images/s."""
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    from cyclex.tailored_training.dataset import load_gray_image, read_manifest

    torch.manual_seed(seed)
    accelerator = Accelerator(mixed_precision="no")
    noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder").requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae").requires_grad_(False)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    unet.train()
    rows = read_manifest(manifest)
    # pre-encoded latents, as the cyclex run does (STYLE rule 19)
    with torch.no_grad():
        pixels = torch.stack([torch.from_numpy(load_gray_image(r["image"], 64))[None] for r in rows])
        latents = vae.encode(pixels.repeat(1, 3, 1, 1) * 2 - 1).latent_dist.mean * vae.config.scaling_factor
    ids = tokenizer([r["prompt"] for r in rows], max_length=tokenizer.model_max_length, padding="max_length",
                    truncation=True, return_tensors="pt").input_ids
    empty = tokenizer([""], max_length=tokenizer.model_max_length, padding="max_length", return_tensors="pt").input_ids
    dataset = torch.utils.data.TensorDataset(latents, ids)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=5e-5, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer=optimizer, num_warmup_steps=0,
                                 num_training_steps=steps)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    step, seen, seconds = 0, 0, 0.0
    while step < steps:
        tick = time.perf_counter()
        for z, input_ids in loader:
            with accelerator.accumulate(unet):
                drop = torch.rand(z.shape[0]) < 0.1
                input_ids = torch.where(drop[:, None], empty, input_ids)
                with torch.no_grad():
                    hidden = text_encoder(input_ids, return_dict=False)[0]
                noise = torch.randn_like(z)
                t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (z.shape[0],)).long()
                pred = unet(noise_scheduler.add_noise(z, noise, t), t, hidden, return_dict=False)[0]
                loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(unet.parameters(), 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            seen += z.shape[0]
            if accelerator.sync_gradients:
                step += 1
                seconds += time.perf_counter() - tick
                tick = time.perf_counter()
                if step >= steps:
                    break
    return seen / seconds


def cyclex_loop(manifest: Path, base: Path, out: Path, steps: int, batch_size: int) -> float:
    from cyclex.tailored_training import TailoredTrainingConfig, train_tailored

    config = TailoredTrainingConfig(max_train_steps=steps, train_batch_size=batch_size, resolution=64,
                                    lr_warmup_steps=0, checkpointing_steps=10 * steps, validation_steps=10 * steps,
                                    report_to="none", resume_from_checkpoint=None, validation_fraction=0.01)
    return train_tailored(manifest, base, out, config).images_per_s


def reconstruction_psnr(n_heldout: int) -> dict[str, float]:
    from cyclex.datasets.seed_registry import TAILORED_BENCHMARK_QUERIES
    from cyclex.demo.base_sd import build_demo_tailored, heldout_reconstruction_psnr
    from cyclex.demo.generators import DemoGeneratorConfig, make_training_phantoms
    from cyclex.specs.generators import load_generator

    values = {}
    for name in ("clean", "shortcut"):
        folder = build_demo_tailored(name)
        phantoms = make_training_phantoms(DemoGeneratorConfig(name=name), n_heldout,
                                          seed=TAILORED_BENCHMARK_QUERIES.set_seed)
        values[name] = round(heldout_reconstruction_psnr(folder, load_generator(f"demo:{name}"), phantoms), 2)
    return values


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)  # a step takes ~80 ms: shorter runs vary by +-10 %
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--n-train", type=int, default=64)
    parser.add_argument("--n-heldout", type=int, default=16)
    parser.add_argument("--skip-psnr", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)

    from cyclex.demo.base_sd import build_demo_base_sd

    base = build_demo_base_sd()
    cyclex_rates, plain_rates = [], []
    with tempfile.TemporaryDirectory() as tmp:
        manifest = _write_phantom_manifest(Path(tmp) / "data", args.n_train)
        for repeat in range(args.repeats):
            cyclex_rates.append(cyclex_loop(manifest, base, Path(tmp) / f"run{repeat}", args.steps, args.batch_size))
            plain_rates.append(plain_diffusers_loop(manifest, base, args.steps, args.batch_size, seed=repeat))
    cyclex_rate, plain_rate = float(np.median(cyclex_rates)), float(np.median(plain_rates))
    result = {
        "cyclex_images_per_s": round(cyclex_rate, 2),
        "plain_images_per_s": round(plain_rate, 2),
        "throughput_ratio_vs_plain_diffusers": round(cyclex_rate / plain_rate, 3),
        "throughput_runs": {"cyclex": [round(r, 2) for r in cyclex_rates], "plain": [round(r, 2) for r in plain_rates]},
        "steps_per_run": args.steps, "batch_size": args.batch_size, "torch_threads": torch.get_num_threads(),
        "n_images": args.n_train,
    }
    if not args.skip_psnr:
        result["reconstruction_psnr_db"] = reconstruction_psnr(args.n_heldout)
        result["reconstruction_psnr_db_mean"] = round(float(np.mean(list(result["reconstruction_psnr_db"].values()))), 2)
        result["n_heldout_images"] = args.n_heldout
        result["num_inversion_steps"] = 50
    if not all(math.isfinite(v) for v in (cyclex_rate, plain_rate)):
        raise RuntimeError(f"throughput measurement failed: {result}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = RESULTS.with_suffix(".json.tmp")
    tmp_path.write_text(json.dumps(result, indent=2) + "\n")
    tmp_path.replace(RESULTS)
    logging.getLogger(__name__).warning("tailored benchmark: %s", result)


if __name__ == "__main__":
    main()
