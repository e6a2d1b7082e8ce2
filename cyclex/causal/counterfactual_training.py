"""Counterfactual training of the causal HVAE (Ribeiro et al. 2023 sec. 3.4; seed 004 eqs. 2, 8, 9).

Each item has one parent k intervened on (one per batch as in causal-gen with
`one_parent_per_batch`): age is permuted across the batch (a draw from its marginal, as causal-gen
does); a binary parent (sex, a finding) is flipped, so removals and additions of every finding are
both trained, which is what the cycle asks of the maker. Then

    aux   = -mean log q_psi(pa~_k | x~)                (parent predictors, frozen)
    c     = eps - nelbo(x, pa)                          (constraint: the ELBO must not worsen)
    loss  = aux - (lambda - damping sg(c)) c - expert   (model update, damped Lagrangian)
    lambda <- max(0, lambda - lr_lambda * c)            (gradient ascent on the Lagrangian in lambda)

`expert` is `alpha log(1 + beta |p(x) - p(x~)|)` of the intervened finding (cyclex.causal.expert),
with gradients. eps defaults to the pretrained model's nelbo on the training data plus a margin.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import torch
from torch.utils.data import TensorDataset

from cyclex.causal.expert import DifferentiableExpert, expert_term
from cyclex.causal.training import (
    EMA,
    TrainingConfig,
    TrainingLog,
    apply_update,
    endless_batches,
    warmup_factor,
)

logger = logging.getLogger(__name__)


@dataclass
class CounterfactualTrainingConfig:
    """Settings of counterfactual training on top of the optimiser's (`training`)."""

    training: TrainingConfig
    elbo_bound: float | None = None  # eps (nats/dim); None: the pretrained nelbo + elbo_margin
    elbo_margin: float = 0.01  # nats/dim the ELBO may lose before the constraint bites
    lagrange_lr: float = 0.1  # learning rate of the multiplier's gradient ascent
    lagrange_init: float = 0.0
    damping: float = 100.0  # causal-gen's damping of the constraint term
    expert_alpha: float = 1.0  # alpha of the expert term (0 switches it off)
    expert_beta: float = 10.0  # beta of the expert term
    # causal-gen intervenes on one parent per batch; one per item gives every parent a share of each
    # batch, which a short CPU run needs
    one_parent_per_batch: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


class LagrangeMultiplier(torch.nn.Module):
    """lambda >= 0, trained by gradient ascent on the Lagrangian: it rises while the constraint is violated."""

    def __init__(self, init: float = 0.0, lr: float = 0.1) -> None:
        super().__init__()
        self.value = torch.nn.Parameter(torch.tensor(float(init)))
        self.optimizer = torch.optim.SGD([self.value], lr=lr)

    def step(self, constraint: torch.Tensor) -> float:
        """One ascent step given c = eps - nelbo (c < 0: violated); returns the clamped lambda."""
        self.optimizer.zero_grad(set_to_none=True)
        # d/dlambda of (lambda * c) is c: descending it is ascending the Lagrangian aux - lambda c
        (self.value * constraint.detach()).backward()
        self.optimizer.step()
        with torch.no_grad():
            self.value.clamp_(min=0.0)
        return float(self.value.detach())


def intervene(pa: torch.Tensor, columns: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """pa~ with column columns[i] of item i intervened: age (column 0) set to another item's age (a
    permutation of the batch, a draw from its marginal), a binary parent flipped."""
    pa_new = pa.clone()
    rows = torch.arange(pa.shape[0])
    permuted_age = pa[torch.randperm(pa.shape[0], generator=generator), 0]
    flipped = 1.0 - pa[rows, columns]
    pa_new[rows, columns] = torch.where(columns == 0, permuted_age, flipped)
    return pa_new


def draw_columns(batch: int, n_parents: int, per_batch: bool, generator: torch.Generator) -> torch.Tensor:
    """The parent each item is intervened on: one for the whole batch (causal-gen) or one per item."""
    if per_batch:
        return torch.randint(n_parents, (1,), generator=generator).expand(batch).clone()
    return torch.randint(n_parents, (batch,), generator=generator)


@torch.no_grad()
def mean_nelbo(model, images: torch.Tensor, parents: torch.Tensor, batch_size: int = 64) -> float:
    """The model's mean negative ELBO (nats/dim) over a data set, posterior sampled once."""
    total, count = 0.0, 0
    model.eval()
    for start in range(0, images.shape[0], batch_size):
        x, pa = images[start:start + batch_size], parents[start:start + batch_size]
        total += float(model.elbo(x * 2.0 - 1.0, pa)["nelbo"]) * x.shape[0]
        count += x.shape[0]
    return total / max(count, 1)


def counterfactual_loss(model, predictor, x01: torch.Tensor, pa: torch.Tensor, columns: torch.Tensor,
                        generator: torch.Generator, multiplier: float, elbo_bound: float,
                        config: CounterfactualTrainingConfig,
                        expert: DifferentiableExpert | None = None) -> dict[str, torch.Tensor]:
    """One batch's terms; `loss` is what the model minimises, `constraint` what the multiplier sees.

    columns (B,): the parent intervened on per item (`draw_columns`).
    """
    x = x01 * 2.0 - 1.0
    rows = torch.arange(x.shape[0])
    nelbo = model.elbo(x, pa)["nelbo"]
    pa_new = intervene(pa, columns, generator)
    x_cf = (model.predict(model.abduct(x, pa), pa_new) + 1.0) / 2.0
    aux = -predictor.log_likelihood(x_cf, pa_new)[rows, columns].mean()
    constraint = elbo_bound - nelbo
    loss = aux - (multiplier - config.damping * constraint.detach()) * constraint
    terms = {"aux": aux.detach(), "nelbo": nelbo.detach(), "constraint": constraint.detach()}
    if expert is not None and config.expert_alpha > 0:
        names = model.config.schema.names
        expert_columns = torch.tensor([-1 if c < 2 or expert.column(names[c]) is None else expert.column(names[c])
                                       for c in columns.tolist()])
        use = (expert_columns >= 0) & (pa_new[rows, columns] != pa[rows, columns])
        if use.any():
            with torch.no_grad():
                p_factual = expert.probabilities(x01[use])[torch.arange(int(use.sum())), expert_columns[use]]
            p_cf = expert.probabilities(x_cf[use])[torch.arange(int(use.sum())), expert_columns[use]]
            term = expert_term(p_factual, p_cf, config.expert_alpha, config.expert_beta)
            loss = loss - term
            terms["expert"] = term.detach()
    return {"loss": loss, "constraint_tensor": constraint, **terms}


def train_counterfactual(model, predictor, images: torch.Tensor, parents: torch.Tensor,
                         config: CounterfactualTrainingConfig, *, expert: DifferentiableExpert | None = None,
                         accelerator=None) -> tuple[torch.nn.Module, TrainingLog, dict]:
    """Counterfactual training from a pretrained HVAE; returns (EMA model, log, {"elbo_bound", "lambda"})."""
    settings = config.training
    torch.manual_seed(settings.seed)
    for parameter in predictor.parameters():
        parameter.requires_grad_(False)
    predictor.eval()
    model.requires_grad_(True)  # a pretrained EMA copy arrives frozen
    elbo_bound = config.elbo_bound
    if elbo_bound is None:
        elbo_bound = mean_nelbo(model, images[:512], parents[:512]) + config.elbo_margin
    multiplier = LagrangeMultiplier(config.lagrange_init, config.lagrange_lr)
    ema = EMA(model, settings.ema_rate)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, betas=settings.betas,
                                  weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_factor(step, settings.warmup_steps))
    net = model
    if accelerator is not None:
        net, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        net = accelerator.unwrap_model(net)  # abduct / predict are methods, not the forward
    batches = endless_batches(TensorDataset(images, parents), settings.batch_size, settings.seed, accelerator)
    generator = torch.Generator().manual_seed(settings.seed)
    n_parents = model.config.schema.size
    history, skipped, started, running = [], 0, time.perf_counter(), {}
    net.train()
    for step in range(settings.steps):
        x01, pa = next(batches)
        columns = draw_columns(x01.shape[0], n_parents, config.one_parent_per_batch, generator)
        out = counterfactual_loss(net, predictor, x01, pa, columns, generator, float(multiplier.value.detach()),
                                  elbo_bound, config, expert)
        norm, skip = apply_update(out["loss"], net, optimizer, scheduler, settings, accelerator,
                                  lambda: ema.update(net))
        skipped += int(skip)
        lam = multiplier.step(out["constraint_tensor"])
        for key in ("loss", "aux", "nelbo", "constraint", "expert"):
            if key in out:
                running[key] = running.get(key, 0.0) + float(out[key].detach())
                running[f"n_{key}"] = running.get(f"n_{key}", 0) + 1
        if (step + 1) % settings.log_every == 0 or step + 1 == settings.steps:
            entry = {"step": step + 1, "lambda": lam, "grad_norm": norm, "skipped": skipped,
                     "seconds": round(time.perf_counter() - started, 1)}
            entry.update({k: running[k] / running[f"n_{k}"] for k in ("loss", "aux", "nelbo", "constraint", "expert")
                          if k in running})
            history.append(entry)
            logger.info("cf step %d: %s", step + 1, entry)
            running = {}
    net.eval()
    log = TrainingLog(history=history, skipped_updates=skipped, seconds=round(time.perf_counter() - started, 1),
                      steps=settings.steps)
    return ema.model, log, {"elbo_bound": elbo_bound, "lambda": float(multiplier.value.detach())}
