"""The demo's phantom classifier: trains in seconds, round-trips through its folder, serves both protocols."""

import json

import pytest
import torch

from cyclex.demo.phantom_classifier import (
    PhantomClassifier,
    PhantomClassifierConfig,
    load_phantom_classifier,
    phantom_classifier_dir,
    train_phantom_classifier,
)
from cyclex.explain.effectiveness import Classifier, counterfactual_probability_gain
from cyclex.explain.faithfulness import ImageEncoder
from cyclex.findings import ABNORMALITIES


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("classifier")
    config = PhantomClassifierConfig(channels=(8, 16))
    classifier = train_phantom_classifier(out, n_train=64, n_val=48, steps=6, batch_size=16, config=config)
    return out, classifier


def test_training_writes_a_loadable_folder(trained):
    out, classifier = trained
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "metrics.json"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["val_auroc"]) == set(ABNORMALITIES) and metrics["steps"] == 6
    loaded = load_phantom_classifier(out, train_if_missing=False)
    x = torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded(x), classifier(x))
    assert loaded(x).shape == (3, 13) and loaded.encode(x).shape == (3, 32)
    assert loaded.class_names == ABNORMALITIES


def test_protocols_and_other_image_sizes(trained):
    _, classifier = trained
    assert isinstance(classifier, Classifier) and isinstance(classifier, ImageEncoder)
    x = torch.rand(2, 1, 128, 128, generator=torch.Generator().manual_seed(1))
    small = torch.nn.functional.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False, antialias=True)
    assert torch.allclose(classifier(x), classifier(small), atol=1e-5)  # resized to 64 px inside
    cpg = counterfactual_probability_gain(classifier, x, x, "Cardiomegaly")
    assert cpg.tolist() == [0.0, 0.0]


def test_missing_folder_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CYCLEX_HOME", str(tmp_path))
    monkeypatch.setattr("cyclex.demo.packaged.PACKAGED_DIR", tmp_path / "nothing_shipped")
    assert phantom_classifier_dir() == tmp_path / "demo" / "classifier"
    with pytest.raises(FileNotFoundError, match="train_phantom_classifier"):
        load_phantom_classifier(train_if_missing=False)
    with pytest.raises(FileNotFoundError, match="config.json"):
        PhantomClassifier.from_pretrained(tmp_path)
