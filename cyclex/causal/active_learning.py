"""Forgetting-event active learning (seed 004 sec. 2.2 and Algorithm 1; Toneva et al. 2019; SVP).

A small proxy classifier of the findings is trained on the real training images plus a pool of
synthetic counterfactuals (whose labels are known: they are the interventions). Every example's
correctness is recorded at every presentation from the training forward pass, before the update,
into a uint8 matrix examples x epochs (1 correct, 0 wrong, NOT_PRESENTED where the example was not
in that epoch). A forgetting event is correct at one presentation and wrong at the next; an example
never learned counts as forgotten at every presentation. The synthetic counterfactuals with the most
forgetting events join the DSCM's training set at 10 / 20 / 30 % of its size.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

NOT_PRESENTED = 255
CORRECT, WRONG = 1, 0


class ForgettingRecorder:
    """The examples x epochs correctness matrix (uint8, NOT_PRESENTED where an example was not seen)."""

    def __init__(self, n_examples: int, n_epochs: int) -> None:
        if n_examples < 1 or n_epochs < 1:
            raise ValueError(f"ForgettingRecorder needs n_examples, n_epochs >= 1, got {n_examples}, {n_epochs}")
        self.matrix = np.full((n_examples, n_epochs), NOT_PRESENTED, dtype=np.uint8)

    def record(self, indices, epoch: int, correct) -> None:
        """indices (B,) examples presented in `epoch`, correct (B,) bools from the forward pass before the update."""
        indices = np.asarray(indices, dtype=np.int64)
        correct = np.asarray(correct, dtype=bool)
        if indices.shape != correct.shape:
            raise ValueError(f"record: indices {indices.shape} and correct {correct.shape} must match")
        self.matrix[indices, epoch] = np.where(correct, CORRECT, WRONG).astype(np.uint8)


def forgetting_counts(matrix: np.ndarray) -> np.ndarray:
    """Forgetting events per example (N,) from an examples x presentations uint8 matrix.

    Events are counted over the presented entries in order (NOT_PRESENTED skipped): each correct ->
    wrong transition is one. An example presented but never correct counts as forgotten at every
    presentation (Toneva et al.: unlearned examples rank as the most forgettable).
    """
    matrix = np.asarray(matrix)
    if matrix.ndim != 2 or matrix.dtype != np.uint8:
        raise ValueError(f"matrix must be a 2-D uint8 examples x epochs array, got {matrix.dtype} {matrix.shape}")
    bad = ~np.isin(matrix, (CORRECT, WRONG, NOT_PRESENTED))
    if bad.any():
        raise ValueError(f"matrix holds values other than {CORRECT}, {WRONG} and {NOT_PRESENTED} (not presented)")
    counts = np.zeros(matrix.shape[0], dtype=np.int64)
    for i, row in enumerate(matrix):
        seen = row[row != NOT_PRESENTED]
        if seen.size and not (seen == CORRECT).any():
            counts[i] = seen.size
        else:
            counts[i] = int(np.sum((seen[:-1] == CORRECT) & (seen[1:] == WRONG)))
    return counts


def forgetting_rates(matrix: np.ndarray) -> np.ndarray:
    """Forgetting events per presentation (N,) in [0, 1]; 0 for examples never presented."""
    presented = (np.asarray(matrix) != NOT_PRESENTED).sum(1)
    return forgetting_counts(matrix) / np.maximum(presented, 1)


def select_most_forgotten(counts: np.ndarray, candidates: Sequence[int], n: int) -> np.ndarray:
    """The n candidate indices with the highest counts (ties: lower index first, deterministic)."""
    candidates = np.asarray(candidates, dtype=np.int64)
    order = np.lexsort((candidates, -counts[candidates]))
    return candidates[order[:n]]


class ProxyClassifier(nn.Module):
    """The cheap proxy of selection via proxy: a 3-layer CNN, (B, 1, S, S) in [0, 1] -> K finding logits."""

    def __init__(self, n_classes: int, width: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
        )
        self.head = nn.Linear(4 * width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x * 2.0 - 1.0)
        return self.head(torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], 1))


@dataclass
class ProxyTrainingConfig:
    epochs: int = 8
    batch_size: int = 64
    learning_rate: float = 2e-3
    seed: int = 0


def train_proxy_recording_forgetting(images: torch.Tensor, labels: torch.Tensor, config: ProxyTrainingConfig) -> np.ndarray:
    """Train a `ProxyClassifier` on (images (N, 1, S, S), binary labels (N, K)); returns the correctness matrix.

    An example is correct when every one of its K labels is predicted on the right side of 0.5,
    judged on the training forward pass of its mini-batch, before that batch's update.
    """
    torch.manual_seed(config.seed)
    proxy = ProxyClassifier(labels.shape[1])
    optimizer = torch.optim.AdamW(proxy.parameters(), lr=config.learning_rate)
    recorder = ForgettingRecorder(images.shape[0], config.epochs)
    generator = torch.Generator().manual_seed(config.seed)
    for epoch in range(config.epochs):
        order = torch.randperm(images.shape[0], generator=generator)
        for start in range(0, images.shape[0], config.batch_size):
            index = order[start:start + config.batch_size]
            logits = proxy(images[index])
            correct = ((logits.detach() > 0).float() == labels[index]).all(1)
            recorder.record(index.numpy(), epoch, correct.numpy())
            loss = F.binary_cross_entropy_with_logits(logits, labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return recorder.matrix


def forgetting_histogram(rates: np.ndarray, bins: int = 10) -> dict:
    """Share of examples per forgetting-rate bin on [0, 1] (the paper's Figure 4a)."""
    counts, edges = np.histogram(np.asarray(rates, dtype=float), bins=bins, range=(0.0, 1.0))
    total = max(int(counts.sum()), 1)
    return {"edges": [round(float(e), 3) for e in edges], "share": [float(c) / total for c in counts]}


def write_forgetting_report(out_dir: str | Path, distributions: dict[str, np.ndarray]) -> dict[str, Path]:
    """Save each named forgetting-rate distribution (JSON histogram) and one plot of them all (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    histograms = {name: forgetting_histogram(rates) for name, rates in distributions.items()}
    (out / "forgetting_rates.json").write_text(json.dumps(histograms, indent=2))
    figure, axis = plt.subplots(figsize=(5, 3.2))
    for name, hist in histograms.items():
        centres = [(a + b) / 2 for a, b in zip(hist["edges"][:-1], hist["edges"][1:], strict=True)]
        axis.plot(centres, [100 * s for s in hist["share"]], marker="o", label=name)
    axis.set_xlabel("forgetting rate (events per presentation)")
    axis.set_ylabel("% of examples")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "forgetting_rates.png", dpi=120)
    plt.close(figure)
    return {"json": out / "forgetting_rates.json", "png": out / "forgetting_rates.png"}


def config_dict(config: ProxyTrainingConfig) -> dict:
    return asdict(config)
