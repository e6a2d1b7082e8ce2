"""A 2-process CPU run through `accelerate launch --multi_gpu --num_processes 2 -m cyclex.tailored_training`
(no visible CUDA -> gloo, MULTI_CPU) trains and saves."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch
from _tailored_helpers import save_tiny_base, write_manifest

from cyclex.tailored_training import read_tailored_metadata


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_cpu_run_trains_and_saves(tmp_path):
    from diffusers import StableDiffusionPipeline

    base = save_tiny_base(tmp_path / "base")
    manifest = write_manifest(tmp_path / "data", n=10)
    out = tmp_path / "out"
    command = [
        # `--cpu` alone starts one process unless mpirun is set up; `--multi_gpu` on a machine without
        # (visible) CUDA starts 2 torch.distributed processes that join a gloo group on the CPU.
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        "-m", "cyclex.tailored_training", "--manifest", str(manifest), "--base", str(base), "--out", str(out),
        "--max-steps", "2", "--checkpointing-steps", "1", "--resolution", "32", "--train-batch-size", "2",
        "--report-to", "none", "--lr-warmup-steps", "0", "--no-select",
    ]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    final = out / "checkpoints" / "checkpoint-000002"
    assert read_tailored_metadata(out)["num_processes"] == 2
    assert (final / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    trained = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    before = StableDiffusionPipeline.from_pretrained(base, local_files_only=True)
    assert not torch.equal(trained.unet.conv_in.weight, before.unet.conv_in.weight)
    assert torch.equal(trained.vae.decoder.conv_out.weight, before.vae.decoder.conv_out.weight)
