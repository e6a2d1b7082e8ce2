"""A tiny CNN classifier for the 13 findings on 64 px phantom X-rays (the demo's stand-in classifier).

It plays two roles in the demo, where no real weights exist offline:
- the `Classifier` for CPG (seed 000's "strong classifier"), raw logits (B, 13) in `ABNORMALITIES` order;
- the `ImageEncoder` standing in for CLIP (penultimate features, `encode -> (B, 128)`), since neither
  CLIP nor LPIPS weights are available offline.

Trained by `scripts/train_phantom_classifier.py` (or `load_phantom_classifier(train_if_missing=True)`)
on phantoms from `cyclex.datasets.phantom`, cached under $CYCLEX_HOME/demo/classifier
(default ~/.cache/cyclex/demo/classifier) as `config.json` + `model.safetensors` + `metrics.json`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cyclex.atomic_io import write_text_atomic as _atomic_write_text
from cyclex.datasets.seed_registry import PHANTOM_CLASSIFIER_TRAINING, PHANTOM_CLASSIFIER_VALIDATION
from cyclex.explain.faithfulness import as_image_batch
from cyclex.findings import ABNORMALITIES

logger = logging.getLogger(__name__)

__all__ = [
    "PhantomClassifierConfig",
    "PhantomClassifierNet",
    "PhantomClassifier",
    "phantom_classifier_dir",
    "train_phantom_classifier",
    "load_phantom_classifier",
]


@dataclass
class PhantomClassifierConfig:
    image_size: int = 64  # phantoms are 64 px; other sizes are resized to this
    channels: tuple[int, ...] = (16, 32, 64)  # one strided 3x3 conv per entry
    class_names: tuple[str, ...] = field(default=ABNORMALITIES)


class PhantomClassifierNet(nn.Module):
    """(B, 1, S, S) in [0, 1] -> logits (B, K); `features` gives the pooled penultimate layer.

    Strided 3x3 convolutions (one per `channels` entry, each halving the size) then one more 3x3 at
    the last width: cheap enough to train on a shared CPU in a couple of minutes.
    """

    def __init__(self, config: PhantomClassifierConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = 1
        for width in config.channels:
            layers += [nn.Conv2d(previous, width, 3, stride=2, padding=1), nn.GroupNorm(4, width), nn.SiLU()]
            previous = width
        layers += [nn.Conv2d(previous, previous, 3, padding=1), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(2 * previous, len(config.class_names))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        # mean and max pooling: findings are often small local blobs or lines
        h = self.body(x * 2.0 - 1.0)
        return torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def phantom_classifier_dir() -> Path:
    """$CYCLEX_HOME/demo/classifier (CYCLEX_HOME defaults to ~/.cache/cyclex)."""
    from cyclex.demo.cache import demo_cache_dir

    return demo_cache_dir() / "classifier"


class PhantomClassifier:
    """The trained net behind the `Classifier` (`__call__` -> logits) and `ImageEncoder` (`encode`) protocols."""

    def __init__(self, net: PhantomClassifierNet, config: PhantomClassifierConfig,
                 device: str | torch.device | None = None) -> None:
        self.config = config
        self.class_names = tuple(config.class_names)
        self.device = torch.device(device or "cpu")
        self.net = net.eval().to(self.device)

    def _input(self, images: torch.Tensor) -> torch.Tensor:
        images = as_image_batch(images).to(self.device)
        size = self.config.image_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return images

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) in [0, 1] -> logits (B, 13)."""
        return self.net(self._input(images)).float().cpu()

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) in [0, 1] -> penultimate features (B, 2 * channels[-1]): mean and max pooled."""
        return self.net.features(self._input(images)).float().cpu()

    @property
    def num_features(self) -> int:
        return 2 * self.config.channels[-1]

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = asdict(self.config)
        _atomic_write_text(directory / "config.json", json.dumps(config, indent=2))
        handle, tmp = tempfile.mkstemp(dir=directory, suffix=".safetensors")
        os.close(handle)
        state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        save_file(state, tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, directory / "model.safetensors")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device | None = None) -> PhantomClassifier:
        from safetensors.torch import load_file

        directory = Path(directory)
        config_file, weights_file = directory / "config.json", directory / "model.safetensors"
        for file in (config_file, weights_file):
            if not file.is_file():
                raise FileNotFoundError(f"phantom classifier file missing: {file} "
                                        "(train it with `python scripts/train_phantom_classifier.py`)")
        raw = json.loads(config_file.read_text())
        config = PhantomClassifierConfig(image_size=int(raw["image_size"]), channels=tuple(raw["channels"]),
                                         class_names=tuple(raw["class_names"]))
        net = PhantomClassifierNet(config)
        net.load_state_dict(load_file(weights_file), strict=True)
        return cls(net, config, device)



def _phantom_arrays(n: int, seed: int, class_names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """n phantoms -> images (n, 1, 64, 64) in [0, 1] and multi-hot targets (n, K) of present findings."""
    from cyclex.datasets.phantom import make_phantoms

    phantoms = make_phantoms(n, seed)
    images = torch.from_numpy(np.stack([p.image for p in phantoms]).astype(np.float32))[:, None]
    present = [set(p.findings_meta) | set(p.masks) for p in phantoms]  # what is drawn in the image
    targets = torch.tensor([[float(name in found) for name in class_names] for found in present])
    return images.clamp(0, 1), targets


def train_phantom_classifier(out_dir: str | os.PathLike | None = None, n_train: int = PHANTOM_CLASSIFIER_TRAINING.n,
                             n_val: int = PHANTOM_CLASSIFIER_VALIDATION.n, steps: int = 600, batch_size: int = 32,
                             lr: float = 2e-3, seed: int = PHANTOM_CLASSIFIER_TRAINING.set_seed,
                             config: PhantomClassifierConfig | None = None,
                             val_seed: int = PHANTOM_CLASSIFIER_VALIDATION.set_seed) -> PhantomClassifier:
    """Train on phantoms (set seed `seed`, also the torch seed), validate on set `val_seed` (both from
    `cyclex.datasets.seed_registry`), save to `out_dir` (default `phantom_classifier_dir()`), write
    validation AUROC per finding into metrics.json."""
    if val_seed == seed:
        raise ValueError(f"train_phantom_classifier: val_seed {val_seed} equals the training set seed")
    from sklearn.metrics import roc_auc_score

    config = config or PhantomClassifierConfig()
    out_dir = Path(out_dir) if out_dir is not None else phantom_classifier_dir()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train_x, train_y = _phantom_arrays(n_train, seed, config.class_names)
    val_x, val_y = _phantom_arrays(n_val, val_seed, config.class_names)
    net = PhantomClassifierNet(config)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    # findings are rare: weight positives by their inverse frequency (capped) so rare ones are learnt
    prevalence = train_y.mean(0).clamp(min=1.0 / n_train)
    pos_weight = ((1 - prevalence) / prevalence).clamp(max=20.0)
    net.train()
    for step in range(steps):
        index = torch.randint(0, n_train, (batch_size,), generator=generator)
        logits = net(train_x[index])
        loss = F.binary_cross_entropy_with_logits(logits, train_y[index], pos_weight=pos_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            logger.info("phantom classifier step %d loss %.4f", step, loss.item())
    classifier = PhantomClassifier(net, config)
    with torch.no_grad():
        val_logits = classifier(val_x)
    aurocs: dict[str, float | None] = {}
    for k, name in enumerate(config.class_names):
        labels = val_y[:, k].numpy()
        aurocs[name] = float(roc_auc_score(labels, val_logits[:, k].numpy())) if 0 < labels.sum() < len(labels) else None
    classifier.save_pretrained(out_dir)
    metrics = {"val_auroc": aurocs, "n_train": n_train, "n_val": n_val, "steps": steps, "seed": seed, "val_seed": val_seed,
               "final_train_loss": loss.item()}
    _atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2))
    logger.info("phantom classifier saved to %s; val AUROC %s", out_dir, aurocs)
    return classifier


def load_phantom_classifier(path: str | os.PathLike | None = None, train_if_missing: bool = True,
                            device: str | torch.device | None = None) -> PhantomClassifier:
    """Load the cached demo classifier (training it first when missing and allowed)."""
    directory = Path(path) if path is not None else phantom_classifier_dir()
    if path is None:
        from cyclex.demo.packaged import install_packaged_assets

        install_packaged_assets()
    if not (directory / "model.safetensors").is_file():
        if not train_if_missing:
            raise FileNotFoundError(f"no phantom classifier at {directory}; run `python scripts/train_phantom_classifier.py`")
        logger.info("training the phantom classifier into %s", directory)
        train_phantom_classifier(directory)
    return PhantomClassifier.from_pretrained(directory, device)
