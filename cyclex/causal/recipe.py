"""The whole training recipe of seed 004's Table 1 arms, top to bottom (one call, `train_causal_arms`).

1. ELBO training of the conditional HVAE;
2. parent predictors on the real images;
3. `baseline`: counterfactual training (Lagrangian, no expert) from the ELBO model;
4. `expert`: the same with the differentiable expert term;
5. `expert_al_10/20/30`: recurrent active learning from `expert`: each round makes a pool of
   synthetic counterfactuals (one finding flipped per training image), trains the proxy on real +
   already-added + pool data while recording forgetting events, adds the pool's most forgotten
   examples (10 % of the training set per round) and fine-tunes with counterfactual training on
   the augmented set.
Every arm is saved as a `CausalModel` folder; `recipe.json` and the forgetting-rate plots beside them.
Two configurations: `tiny_recipe()` (64 px phantoms, a 2-core CPU) and `paper_recipe()` (192 px
real data, the paper's widths and optimiser, for accelerate on GPUs).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from cyclex.atomic_io import write_text_atomic
from cyclex.causal.active_learning import (
    ProxyTrainingConfig,
    forgetting_counts,
    forgetting_rates,
    select_most_forgotten,
    train_proxy_recording_forgetting,
    write_forgetting_report,
)
from cyclex.causal.counterfactual_training import CounterfactualTrainingConfig, train_counterfactual
from cyclex.causal.expert import DifferentiableExpert
from cyclex.causal.folder import CausalModel
from cyclex.causal.hvae import CausalHVAE, HVAEConfig
from cyclex.causal.parent_predictors import ParentPredictor, ParentPredictorConfig
from cyclex.causal.training import TrainingConfig, train_hvae, train_parent_predictor

logger = logging.getLogger(__name__)

ARMS = ("baseline", "expert", "expert_al_10", "expert_al_20", "expert_al_30")


@dataclass
class CausalRecipe:
    hvae: HVAEConfig = field(default_factory=HVAEConfig)
    predictor: ParentPredictorConfig = field(default_factory=ParentPredictorConfig)
    elbo_training: TrainingConfig = field(default_factory=TrainingConfig)
    predictor_training: TrainingConfig = field(default_factory=TrainingConfig)
    counterfactual: CounterfactualTrainingConfig = field(
        default_factory=lambda: CounterfactualTrainingConfig(training=TrainingConfig()))
    al_finetune_steps: int = 100  # counterfactual-training steps after each active-learning round
    al_round_fraction: float = 0.1  # synthetic examples added per round, as a share of the training set
    proxy: ProxyTrainingConfig = field(default_factory=ProxyTrainingConfig)
    # False (the default; the shipped tiny weights were trained with it): every active-learning round is
    # held to the ELBO model's bound, as the paper's constraint "the ELBO does not worsen" reads. True
    # re-estimates the bound from the model each round starts from, so the bound drifts up round after
    # round (a first run measured validation nelbo 3.77 -> 4.25 nats/dim); kept to reproduce that run.
    al_bound_from_start_model: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def tiny_recipe() -> CausalRecipe:
    """64 px phantoms on a 2-core CPU in about 30-40 minutes (all five arms, the ELBO model included).

    Learning rates are 20x the paper's and the step counts small so the tiny model trains in minutes;
    the clip / skip / EMA / AdamW settings are the paper's (predictors: no skip, their early age
    gradients are large and nothing deep needs guarding).
    """
    return CausalRecipe(
        hvae=HVAEConfig(),
        predictor=ParentPredictorConfig(),
        elbo_training=TrainingConfig(steps=900, batch_size=16, learning_rate=1e-3, warmup_steps=50, log_every=50),
        predictor_training=TrainingConfig(steps=600, batch_size=32, learning_rate=2e-3, warmup_steps=20,
                                          grad_skip=float("inf"), weight_decay=0.01, log_every=100),
        # damping 10 (causal-gen: 100) and a 0.05 nats/dim bound: with 100 the damped constraint's
        # gradient passed the skip threshold on most steps of a first run, which then barely trained
        # 400 counterfactual steps and 150 per active-learning round (first run: 100 and 60): on the
        # validation seeds every arm's effectiveness rose (expert 0.22 -> 0.46) and its nelbo fell,
        # while reversibility fell (expert 0.98 -> 0.77)
        counterfactual=CounterfactualTrainingConfig(
            training=TrainingConfig(steps=400, batch_size=16, learning_rate=2e-4, warmup_steps=10, log_every=20),
            expert_alpha=1.0, expert_beta=10.0, damping=10.0, elbo_margin=0.05),
        al_finetune_steps=150,
        proxy=ProxyTrainingConfig(epochs=6, batch_size=64),
    )


def paper_recipe() -> CausalRecipe:
    """The paper's 192 px configuration (seed 004 appendix B; Ribeiro et al. 2023) for real data on GPUs.

    Latents at 6 scales up to 96 px, 16 channels; AdamW lr 5e-5, 100 warm-up steps, betas (0.9, 0.9),
    weight decay 0.1, clip 350, skip 500, EMA 0.999, batch 32. Run under `accelerate launch`.
    """
    return CausalRecipe(
        # appendix B, smallest first: 1^2 (512 wide, 2 blocks), 6^2 (192, 4), 12^2 (160, 8), 24^2 (128, 12),
        # 48^2 (96, 8), 96^2 (64, 4), then the deterministic 192^2 block (32 wide)
        hvae=HVAEConfig(image_size=192, resolutions=(192, 96, 48, 24, 12, 6, 1), widths=(32, 64, 96, 128, 160, 192, 512),
                        blocks=(1, 4, 8, 12, 8, 4, 2), z_max_res=96, z_channels=16),
        predictor=ParentPredictorConfig(image_size=192, channels=(32, 64, 128, 256, 256)),
        elbo_training=TrainingConfig(steps=200_000, batch_size=32, learning_rate=5e-5, warmup_steps=100),
        predictor_training=TrainingConfig(steps=20_000, batch_size=32, learning_rate=1e-4, warmup_steps=100,
                                          grad_skip=float("inf")),
        counterfactual=CounterfactualTrainingConfig(
            training=TrainingConfig(steps=10_000, batch_size=32, learning_rate=1e-4, warmup_steps=100)),
        al_finetune_steps=5_000,
        proxy=ProxyTrainingConfig(epochs=20, batch_size=64),
    )


@torch.no_grad()
def synthetic_pool(model: CausalHVAE, images: torch.Tensor, parents: torch.Tensor, seed: int,
                   batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """One counterfactual per image with one random finding flipped: (images, their parents pa~)."""
    schema = model.config.schema
    generator = torch.Generator().manual_seed(seed)
    columns = torch.tensor(schema.finding_columns)[torch.randint(len(schema.finding_columns), (images.shape[0],),
                                                                  generator=generator)]
    pa_new = parents.clone()
    rows = torch.arange(parents.shape[0])
    pa_new[rows, columns] = 1.0 - parents[rows, columns]
    out = torch.cat([model.counterfactual(images[i:i + batch_size], parents[i:i + batch_size], pa_new[i:i + batch_size])
                     for i in range(0, images.shape[0], batch_size)])
    # quantise like every real image the model sees
    return torch.round(out * 255.0) / 255.0, pa_new


def _save(out_dir: Path, name: str, hvae, predictor, metadata: dict) -> Path:
    return CausalModel(hvae=hvae, predictor=predictor, metadata={"arm": name, **metadata}).save_pretrained(out_dir / name)


def train_causal_arms(images: torch.Tensor, parents: torch.Tensor, recipe: CausalRecipe, out_dir: str | Path, *,
                      expert: DifferentiableExpert | None = None, arms: Sequence[str] = ARMS, accelerator=None,
                      metadata: dict | None = None, reuse_elbo: bool = False) -> dict:
    """Train the requested arms on images (N, 1, S, S) in [0, 1] with parents (N, P); returns recipe.json's dict.

    expert: needed for every arm but `baseline`. metadata (data seeds, ...) goes into every folder.
    reuse_elbo: start from OUT/elbo (steps 1-2 of an earlier run with the same recipe) instead of
    training it again.
    """
    unknown = set(arms) - set(ARMS)
    if unknown:
        raise ValueError(f"arms: unknown {sorted(unknown)}; known: {list(ARMS)}")
    if expert is None and set(arms) - {"baseline"}:
        raise ValueError(f"arms {sorted(set(arms) - {'baseline'})} need an expert classifier (expert=)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metadata = dict(metadata or {})
    report: dict = {"recipe": recipe.to_dict(), "metadata": metadata, "arms": {}, "n_train": int(images.shape[0])}
    started = time.perf_counter()

    if reuse_elbo:
        earlier = CausalModel.from_pretrained(out / "elbo")
        hvae, predictor = earlier.hvae, earlier.predictor
        report["elbo"] = earlier.metadata.get("elbo_log", "reused from an earlier run")
        report["predictor"] = earlier.metadata.get("predictor_log", "reused from an earlier run")
    else:
        # 1. ELBO training
        hvae, elbo_log = train_hvae(CausalHVAE(copy.deepcopy(recipe.hvae)), images, parents, recipe.elbo_training,
                                    accelerator=accelerator)
        report["elbo"] = elbo_log.to_dict()
        # 2. Parent predictors on the real images
        predictor, predictor_log = train_parent_predictor(ParentPredictor(copy.deepcopy(recipe.predictor)), images,
                                                          parents, recipe.predictor_training, accelerator=accelerator)
        report["predictor"] = predictor_log.to_dict()
        _save(out, "elbo", hvae, predictor, {**metadata, "stage": "ELBO only, before counterfactual training",
                                             "elbo_log": report["elbo"], "predictor_log": report["predictor"]})

    def counterfactual_arm(name, start, train_images, train_parents, config):
        model, log, info = train_counterfactual(copy.deepcopy(start), predictor, train_images, train_parents, config,
                                                expert=expert if config.expert_alpha > 0 else None,
                                                accelerator=accelerator)
        report["arms"][name] = {"log": log.to_dict(), **info, "n_train": int(train_images.shape[0])}
        _save(out, name, model, predictor, {**metadata, **info, "counterfactual_training": config.to_dict()})
        logger.info("arm %s done after %.0f s", name, time.perf_counter() - started)
        return model

    # 3-4. Counterfactual training without and with the expert term
    if "baseline" in arms:
        counterfactual_arm("baseline", hvae, images, parents,
                           CounterfactualTrainingConfig(**{**asdict(recipe.counterfactual), "expert_alpha": 0.0,
                                                           "training": recipe.counterfactual.training}))
    needs_expert = [a for a in arms if a != "baseline"]
    if not needs_expert:
        return _finish(out, report, started)
    expert_model = counterfactual_arm("expert", hvae, images, parents, recipe.counterfactual)

    # 5. Recurrent forgetting-event active learning
    al_names = [a for a in ARMS if a.startswith("expert_al_")]
    wanted = [a for a in al_names if a in arms]
    rounds = al_names[:al_names.index(wanted[-1]) + 1] if wanted else []  # round i needs rounds before it
    current, added_images, added_parents = expert_model, images[:0], parents[:0]
    per_round = int(round(recipe.al_round_fraction * images.shape[0]))
    distributions = {}
    finetune = CounterfactualTrainingConfig(**{**asdict(recipe.counterfactual), "training": TrainingConfig(
        **{**asdict(recipe.counterfactual.training), "steps": recipe.al_finetune_steps})})
    if not recipe.al_bound_from_start_model and finetune.elbo_bound is None:
        finetune.elbo_bound = report["arms"]["expert"]["elbo_bound"]  # the ELBO model's bound, for every round
    finding_columns = list(hvae.config.schema.finding_columns)
    for round_index, name in enumerate(rounds):
        pool_images, pool_parents = synthetic_pool(current, images, parents, seed=recipe.proxy.seed + round_index)
        proxy_images = torch.cat([images, added_images, pool_images])
        proxy_labels = torch.cat([parents, added_parents, pool_parents])[:, finding_columns]
        matrix = train_proxy_recording_forgetting(proxy_images, proxy_labels, recipe.proxy)
        counts = forgetting_counts(matrix)
        pool_start = images.shape[0] + added_images.shape[0]
        chosen = select_most_forgotten(counts, range(pool_start, proxy_images.shape[0]), per_round) - pool_start
        added_images = torch.cat([added_images, pool_images[chosen]])
        added_parents = torch.cat([added_parents, pool_parents[chosen]])
        rates = forgetting_rates(matrix)
        distributions[f"round {round_index + 1}: real"] = rates[:images.shape[0]]
        distributions[f"round {round_index + 1}: synthetic pool"] = rates[pool_start:]
        np.save(out / f"forgetting_matrix_round{round_index + 1}.npy", matrix)
        report.setdefault("active_learning", []).append({
            "round": round_index + 1, "arm": name, "pool": int(pool_images.shape[0]), "added": int(len(chosen)),
            "total_added": int(added_images.shape[0]),
            "mean_forgetting_rate_real": float(rates[:images.shape[0]].mean()),
            "mean_forgetting_rate_pool": float(rates[pool_start:].mean()),
            "mean_forgetting_rate_added": float(rates[pool_start + chosen].mean()) if len(chosen) else None,
        })
        current = counterfactual_arm(name, current, torch.cat([images, added_images]),
                                     torch.cat([parents, added_parents]), finetune)
    if distributions:
        paths = write_forgetting_report(out, distributions)
        report["forgetting_report"] = {k: str(v) for k, v in paths.items()}
    return _finish(out, report, started)


def _finish(out: Path, report: dict, started: float) -> dict:
    report["seconds"] = round(time.perf_counter() - started, 1)
    write_text_atomic(out / "recipe.json", json.dumps(report, indent=2, default=str))
    return report
