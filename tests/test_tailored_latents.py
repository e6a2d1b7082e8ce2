"""Tailored training at scale: a resumable on-disk VAE latent cache, WebDataset tar shards as input,
and an exact resume on 2 CPU processes (accelerate launch, gloo) trained from both."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from _tailored_helpers import save_tiny_base, write_manifest

from cyclex.tailored_training import (
    TailoredTrainingConfig,
    read_manifest,
    read_tailored_metadata,
    train_tailored,
)
from cyclex.tailored_training.dataset import TailoredImageDataset
from cyclex.tailored_training.latent_cache import (
    LatentCacheMismatch,
    encode_latent_shards,
    load_latent_cache,
    prepare_latent_cache,
    shard_path,
)
from cyclex.tailored_training.train import encode_latents, load_base_components
from cyclex.tailored_training.webdataset_shards import (
    expand_shards,
    is_webdataset_source,
    write_webdataset_shards,
)

CONFIG = TailoredTrainingConfig(
    max_train_steps=4, checkpointing_steps=2, resolution=32, train_batch_size=4, learning_rate=1e-3,
    lr_scheduler="linear", lr_warmup_steps=1, report_to="none", validation_steps=2, validation_fraction=0.2,
    num_inversion_steps=2, seed=5, latent_cache_shard_size=32,
)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny_base(tmp_path_factory.mktemp("base") / "sd")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_manifest(tmp_path_factory.mktemp("data"), n=44)  # 36 train images: two cache shards of 32


def _unet(folder) -> dict[str, torch.Tensor]:
    from diffusers import UNet2DConditionModel

    return {k: v.clone() for k, v in UNet2DConditionModel.from_pretrained(folder, subfolder="unet").state_dict().items()}


def test_webdataset_shards_hold_the_manifest(manifest, tmp_path):
    rows = read_manifest(manifest)
    shards = write_webdataset_shards(rows, tmp_path / "shards", samples_per_shard=16)
    assert [p.name for p in shards] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    pattern = str(tmp_path / "shards" / "train-{000000..000002}.tar")
    assert is_webdataset_source(pattern) and is_webdataset_source(tmp_path / "shards")
    assert not is_webdataset_source(manifest)
    assert expand_shards(pattern) == shards
    from_shards = read_manifest(pattern)
    assert [(r["id"], r["prompt"]) for r in from_shards] == [(r["id"], r["prompt"]) for r in rows]
    images, shard_images = TailoredImageDataset(rows, 32), TailoredImageDataset(from_shards, 32)
    for index in (0, 17, len(rows) - 1):
        assert torch.equal(images[index]["pixel_values"], shard_images[index]["pixel_values"])
    # writing again keeps the shards (a resumed conversion), a missing shard is named
    before = [p.stat().st_mtime_ns for p in shards]
    write_webdataset_shards(rows, tmp_path / "shards", samples_per_shard=16)
    assert [p.stat().st_mtime_ns for p in shards] == before
    with pytest.raises(FileNotFoundError, match="train-000003.tar"):
        expand_shards(str(tmp_path / "shards" / "train-{000000..000003}.tar"))


def test_latent_cache_is_the_in_memory_encoding_and_resumes(base, manifest, tmp_path):
    from cyclex.provenance import module_weights_sha256

    rows = read_manifest(manifest)[:40]
    vae = load_base_components(base)["vae"]
    images = TailoredImageDataset(rows, 32)
    with torch.no_grad():
        in_memory = torch.cat([encode_latents(vae, torch.stack([images[i]["pixel_values"]
                                                                 for i in range(s, min(s + 32, len(rows)))]))
                               for s in range(0, len(rows), 32)])
        folder = tmp_path / "cache"
        meta = prepare_latent_cache(folder, rows, 32, module_weights_sha256(vae), 32)
        # two "processes" share the shards: shard 0 to process 0, shard 1 to process 1
        assert encode_latent_shards(vae, images, folder, meta, device="cpu", encode=encode_latents,
                                    process_index=1, num_processes=2) == [1]
        with pytest.raises(FileNotFoundError, match="latents-000000.safetensors is missing"):
            load_latent_cache(folder, meta)
        assert encode_latent_shards(vae, images, folder, meta, device="cpu", encode=encode_latents) == [0]
        assert torch.equal(load_latent_cache(folder, meta), in_memory)
        # a second run encodes nothing; a lost shard alone is encoded again
        kept = shard_path(folder, 1).stat().st_mtime_ns
        shard_path(folder, 0).unlink()
        assert encode_latent_shards(vae, images, folder, meta, device="cpu", encode=encode_latents) == [0]
        assert shard_path(folder, 1).stat().st_mtime_ns == kept
    with pytest.raises(LatentCacheMismatch, match="resolution"):
        prepare_latent_cache(folder, rows, 64, module_weights_sha256(vae), 32)
    with pytest.raises(LatentCacheMismatch, match="ids_sha256"):
        prepare_latent_cache(folder, rows[:-1], 32, module_weights_sha256(vae), 32)


def test_training_from_shards_and_the_cache_is_training_from_the_manifest(base, manifest, tmp_path):
    described = tmp_path / "dataset.json"  # the data set's description travels with its shards
    described.write_text(json.dumps({"template": "prism", "prompt_source": "generated", "generator": "demo:clean"}))
    shards = write_webdataset_shards(read_manifest(manifest), tmp_path / "shards", samples_per_shard=20,
                                     dataset_json=described)
    plain = train_tailored(manifest, base, tmp_path / "plain", CONFIG)
    cached_cfg = dataclasses.replace(CONFIG, latent_cache_dir=str(tmp_path / "cache"))
    scaled = train_tailored(shards[0].parent, base, tmp_path / "scaled", cached_cfg)
    assert plain.global_step == scaled.global_step == 4
    assert len(list((tmp_path / "cache").glob("latents-*.safetensors"))) == 2
    metadata = read_tailored_metadata(tmp_path / "scaled")
    assert metadata["prompt_template"] == "prism" and metadata["generator"] == "demo:clean"
    reference, trained = _unet(tmp_path / "plain"), _unet(tmp_path / "scaled")
    for key, value in reference.items():
        torch.testing.assert_close(trained[key], value, rtol=0, atol=0)


def _launch_training(source, base, out, cache):
    from cyclex.cycle.distributed import free_port

    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "-m", "cyclex.tailored_training", "--manifest", str(source),
               "--base", str(base), "--out", str(out), "--max-steps", "4", "--checkpointing-steps", "2",
               "--resolution", "32", "--train-batch-size", "4", "--learning-rate", "1e-3", "--lr-scheduler", "linear",
               "--lr-warmup-steps", "1", "--report-to", "none", "--seed", "5", "--validation-fraction", "0.2",
               "--latent-cache-dir", str(cache), "--latent-cache-shard-size", "32", "--no-select"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def test_two_processes_resume_exactly_from_shards_and_the_cache(base, manifest, tmp_path):
    shards = write_webdataset_shards(read_manifest(manifest), tmp_path / "shards", samples_per_shard=20)
    pattern = str(tmp_path / "shards" / "train-{000000..000002}.tar")
    assert len(shards) == 3
    out, cache = tmp_path / "run", tmp_path / "cache"
    first = _launch_training(pattern, base, out, cache)
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads((out / "cyclex_tailored.json").read_text())["num_processes"] == 2
    # both processes encoded a shard of the cache
    assert "process 0 encoded shards [0]" in first.stderr and "process 1 encoded shards [1]" in first.stderr
    uninterrupted = _unet(out / "checkpoints" / "checkpoint-000004")
    # a run that died after step 2: its last checkpoint goes, and the same command resumes from step 2
    shutil.rmtree(out / "checkpoints" / "checkpoint-000004")
    cache_times = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    second = _launch_training(pattern, base, out, cache)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stdout + second.stderr
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == cache_times  # nothing encoded again
    resumed = _unet(out / "checkpoints" / "checkpoint-000004")
    for key, value in uninterrupted.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6)
