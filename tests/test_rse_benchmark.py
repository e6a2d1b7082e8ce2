"""benchmarks/rse.py's rules: which setting the validation sweep chooses, and the population block."""

from __future__ import annotations

import numpy as np
import torch

from benchmarks.rse import choose_instruct_setting, choose_setting, paired_difference, population_measures


def test_lowest_outside_energy_among_settings_that_keep_the_cyclic_rate():
    sweep = [{"tau": 0.1, "paste_query_outside_mask": True, "cyclic_rate": 0.95, "outside_energy": 0.6},
             {"tau": 0.3, "paste_query_outside_mask": True, "cyclic_rate": 0.94, "outside_energy": 0.5},
             {"tau": 0.5, "paste_query_outside_mask": True, "cyclic_rate": 0.90, "outside_energy": 0.3}]
    assert choose_setting(sweep, 0.95) == {"tau": 0.3, "paste_query_outside_mask": True}
    assert choose_setting(sweep, 0.99) == {"tau": 0.1, "paste_query_outside_mask": False}  # none eligible: the paper's


def test_the_editors_setting_is_the_closest_to_the_truth_among_the_best_cyclic_rates():
    grid = [{"guidance": 7.5, "strength": 1.0, "cyclic_rate": 0.50, "true_cf_l1": 0.02},
            {"guidance": 1.5, "strength": 0.6, "cyclic_rate": 0.80, "true_cf_l1": 0.04},
            {"guidance": 7.5, "strength": 0.6, "cyclic_rate": 0.79, "true_cf_l1": 0.03}]
    assert choose_instruct_setting(grid) == {"guidance": 7.5, "strength": 0.6}


class _MeanClassifier:
    """Two 'findings': the mean brightness of the left and the right half; features are the same two numbers."""

    num_features = 2

    def __call__(self, images):
        return self.encode(images) * 8 - 4

    def encode(self, images):
        half = images.shape[-1] // 2
        return torch.stack([images[..., :half].mean(dim=(1, 2, 3)), images[..., half:].mean(dim=(1, 2, 3))], dim=1)


def test_population_block_scores_each_makers_set_against_the_true_counterfactuals():
    rng = np.random.default_rng(0)
    truth = {("a", "Edema"): rng.random((8, 8)).astype(np.float32), ("b", "Edema"): rng.random((8, 8)).astype(np.float32),
             ("c", "Edema"): rng.random((8, 8)).astype(np.float32)}
    exact = {k: (v, v) for k, v in truth.items()}
    darker = {k: (v * 0.2, v) for k, v in truth.items()}
    out = population_measures({"exact": exact, "darker": darker}, _MeanClassifier())
    assert out["n_items"] == 3 and out["cmig"] is None and "stand-in" in out["scorer"]
    assert abs(out["makers"]["exact"]["kl_true_vs_maker"]) < 1e-9
    assert out["makers"]["darker"]["fid_vs_true_cf"] > out["makers"]["exact"]["fid_vs_true_cf"]


def test_paired_difference_uses_the_same_items():
    a = [{"image_id": "x", "finding": "Edema", "true_cf_l1": 0.2}, {"image_id": "y", "finding": "Edema", "true_cf_l1": 0.4}]
    b = [{"image_id": "y", "finding": "Edema", "true_cf_l1": 0.1}]
    difference = paired_difference(a, b, "true_cf_l1")
    assert difference["n"] == 1 and abs(difference["mean"] + 0.3) < 1e-12
