"""ELBO training of the causal HVAE and of its parent predictors (SPEC section 5 settings).

The loop reads top to bottom: data, model, AdamW with linear warm-up, per step the loss, backward,
clip the gradient norm at `grad_clip` (350) and skip the update when the norm before clipping is
above `grad_skip` (500) or not finite, then the EMA of the weights (0.999, warmed up so a short CPU
run is not dominated by its first steps). No device is hard-coded: pass an `accelerate.Accelerator`
to train on several GPUs (it places the model and the batches), or nothing to train on the CPU.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cyclex.causal.parent_predictors import parent_log_likelihood

logger = logging.getLogger(__name__)


@dataclass
class TrainingConfig:
    """Optimiser settings; defaults are the paper's (seed 004 appendix B) except where a comment says why."""

    steps: int = 1000
    batch_size: int = 32
    learning_rate: float = 5e-5  # the paper's; the tiny CPU config uses 1e-3 to train in minutes
    warmup_steps: int = 100
    betas: tuple[float, float] = (0.9, 0.9)
    weight_decay: float = 0.1
    grad_clip: float = 350.0
    grad_skip: float = 500.0  # skip updates whose gradient norm (before clipping) exceeds this
    ema_rate: float = 0.999
    kl_beta: float = 1.0
    seed: int = 0
    log_every: int = 50

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        for name in ("steps", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TrainingConfig.{name} must be >= 1, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear learning-rate warm-up: (step + 1) / warmup_steps, then 1."""
    return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)


def clip_or_skip(parameters, grad_clip: float, grad_skip: float, accelerator=None) -> tuple[float, bool]:
    """Clip the gradient's L2 norm at grad_clip; returns (norm before clipping, skip this update?).

    Skip when the norm is NaN / inf or above grad_skip (VDVAE's and causal-gen's guard against
    the rare huge gradients of deep hierarchies); the caller then zeroes the gradients.
    """
    parameters = [p for p in parameters if p.grad is not None]
    if accelerator is not None:
        norm = accelerator.clip_grad_norm_(parameters, grad_clip)
    else:
        norm = torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
    value = float(norm)
    return value, (not math.isfinite(value)) or value > grad_skip


def apply_update(loss: torch.Tensor, model: nn.Module, optimizer, scheduler, config, accelerator=None,
                 on_update=None) -> tuple[float, bool]:
    """Backward, clip or skip (`clip_or_skip`), then step the optimiser and the warm-up schedule and call
    on_update (the EMA) unless skipped; returns (gradient norm before clipping, skipped?)."""
    optimizer.zero_grad(set_to_none=True)
    if accelerator is not None:
        accelerator.backward(loss)
    else:
        loss.backward()
    norm, skip = clip_or_skip(model.parameters(), config.grad_clip, config.grad_skip, accelerator)
    if skip:
        optimizer.zero_grad(set_to_none=True)
    else:
        optimizer.step()
        scheduler.step()  # warm-up counts applied updates (and torch wants step() after optimizer.step())
        if on_update is not None:
            on_update()
    return norm, skip


class EMA:
    """Exponential moving average of a model's weights; rate warms up as min(rate, (1 + n) / (10 + n))."""

    def __init__(self, model: nn.Module, rate: float = 0.999) -> None:
        self.rate = float(rate)
        self.model = copy.deepcopy(model).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        rate = min(self.rate, (1 + self.updates) / (10 + self.updates))
        for ema_p, p in zip(self.model.parameters(), model.parameters(), strict=True):
            ema_p.mul_(rate).add_(p.detach(), alpha=1.0 - rate)
        for ema_b, b in zip(self.model.buffers(), model.buffers(), strict=True):
            ema_b.copy_(b)
        self.updates += 1


@dataclass
class TrainingLog:
    """What a training run did: losses every `log_every` steps, skipped updates, seconds."""

    history: list[dict]
    skipped_updates: int
    seconds: float
    steps: int

    def to_dict(self) -> dict:
        return asdict(self)


def endless_batches(dataset: TensorDataset, batch_size: int, seed: int, accelerator=None):
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=len(dataset) >= batch_size,
                        generator=torch.Generator().manual_seed(seed))
    if accelerator is not None:
        loader = accelerator.prepare(loader)
    while True:
        yield from loader


def optimise(model: nn.Module, loss_of_batch: Callable[..., dict[str, torch.Tensor]], dataset: TensorDataset,
             config: TrainingConfig, *, accelerator=None, ema: EMA | None = None) -> TrainingLog:
    """The shared loop: `loss_of_batch(model, *batch) -> {"loss": scalar, ...}` minimised with AdamW.

    `model` is handed back to loss_of_batch as accelerate prepared it (wrapped for several GPUs), so
    the loss must go through its forward. Returns the log; `ema` is updated after every applied step.
    """
    torch.manual_seed(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, betas=config.betas,
                                  weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_factor(step, config.warmup_steps))
    if accelerator is not None:
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    batches = endless_batches(dataset, config.batch_size, config.seed, accelerator)
    history, skipped, started = [], 0, time.perf_counter()
    running: dict[str, float] = {}
    model.train()
    for step in range(config.steps):
        batch = next(batches)
        out = loss_of_batch(model, *batch)
        update_ema = None if ema is None else (
            lambda: ema.update(accelerator.unwrap_model(model) if accelerator is not None else model))
        norm, skip = apply_update(out["loss"], model, optimizer, scheduler, config, accelerator, update_ema)
        skipped += int(skip)
        for key, value in out.items():
            running[key] = running.get(key, 0.0) + float(value.detach())
        running["grad_norm"] = running.get("grad_norm", 0.0) + norm
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            count = (step % config.log_every) + 1
            entry = {"step": step + 1, **{k: v / count for k, v in running.items()}, "skipped": skipped,
                     "seconds": round(time.perf_counter() - started, 1)}
            history.append(entry)
            logger.info("step %d: %s", step + 1, {k: round(v, 4) for k, v in entry.items() if isinstance(v, float)})
            running = {}
    model.eval()
    return TrainingLog(history=history, skipped_updates=skipped, seconds=round(time.perf_counter() - started, 1),
                       steps=config.steps)


def train_hvae(model, images: torch.Tensor, parents: torch.Tensor, config: TrainingConfig,
               accelerator=None) -> tuple[nn.Module, TrainingLog]:
    """ELBO training on images (N, 1, S, S) in [0, 1] with parents (N, P); returns (EMA model, log)."""
    ema = EMA(model, config.ema_rate)

    def loss_of_batch(net, x, pa):
        out = net(x * 2.0 - 1.0, pa, beta=config.kl_beta)  # CausalHVAE.forward is the ELBO
        return {"loss": out["nelbo"], "nll": out["nll"], "kl": out["kl"]}

    log = optimise(model, loss_of_batch, TensorDataset(images, parents), config, accelerator=accelerator, ema=ema)
    return ema.model, log


def train_parent_predictor(predictor, images: torch.Tensor, parents: torch.Tensor, config: TrainingConfig,
                           accelerator=None) -> tuple[nn.Module, TrainingLog]:
    """Maximum likelihood of every parent from the image; returns (EMA predictor, log)."""
    ema = EMA(predictor, config.ema_rate)

    sigma = predictor.config.age_sigma

    def loss_of_batch(net, x, pa):
        return {"loss": -parent_log_likelihood(net(x), pa, sigma).sum(1).mean()}

    log = optimise(predictor, loss_of_batch, TensorDataset(images, parents), config, accelerator=accelerator, ema=ema)
    return ema.model, log
