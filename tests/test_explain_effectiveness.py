"""CPG with hand-set classifiers; the classifier wrappers, including torchxrayvision without downloads."""

import pytest
import torch
from torch import nn

from cyclex.explain.effectiveness import (
    XRV_PATHOLOGY_FOR_FINDING,
    CallableClassifier,
    TorchClassifier,
    XRVClassifier,
    XRVWeightsMissingError,
    class_index,
    counterfactual_probability_gain,
)


def linear_classifier() -> TorchClassifier:
    """logit_0 = 4 * mean(x) - 1, logit_1 = -2 * mean(x): set by hand so CPG is known on paper."""
    linear = nn.Linear(4, 2)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0] * 4, [-0.5] * 4]))
        linear.bias.copy_(torch.tensor([-1.0, 0.0]))
    return TorchClassifier(nn.Sequential(nn.Flatten(), linear), class_names=["Cardiomegaly", "Pleural Effusion"])


def test_cpg_by_hand_with_a_linear_classifier():
    classifier = linear_classifier()
    factual = torch.full((2, 1, 2, 2), 0.75)
    counterfactual = torch.stack([torch.full((1, 2, 2), 0.25), torch.full((1, 2, 2), 0.75)])
    # logit_0(F) = 4 * 0.75 - 1 = 2; logit_0(CF) = 0 and 2 -> CPG 2 and 0
    assert counterfactual_probability_gain(classifier, factual, counterfactual, "Cardiomegaly").tolist() == [2.0, 0.0]
    # logit_1 = -2 * mean: CPG = -2 * 0.75 - (-2 * 0.25) = -1 (finding strengthened)
    assert counterfactual_probability_gain(classifier, factual, counterfactual, "Effusion").tolist() == [-1.0, 0.0]
    per_item = counterfactual_probability_gain(classifier, factual, counterfactual, ["Cardiomegaly", 1])
    assert per_item.tolist() == [2.0, 0.0]


def test_callable_classifier_and_errors():
    classifier = CallableClassifier(lambda x: x.flatten(1).sum(1, keepdim=True).numpy(), ["Edema"])
    factual, counterfactual = torch.ones(1, 1, 3, 3), torch.zeros(1, 1, 3, 3)
    assert counterfactual_probability_gain(classifier, factual, counterfactual, "Edema").tolist() == [9.0]
    with pytest.raises(KeyError, match="no class for 'Cardiomegaly'"):
        counterfactual_probability_gain(classifier, factual, counterfactual, "Cardiomegaly")
    wrong = CallableClassifier(lambda x: torch.zeros(len(x), 3), ["Edema"])
    with pytest.raises(ValueError, match=r"expected \(1, 1\)"):
        wrong(factual)
    with pytest.raises(ValueError, match="2 targets for a batch of 1"):
        counterfactual_probability_gain(classifier, factual, counterfactual, ["Edema", "Edema"])


def test_class_index_resolves_aliases_and_indices():
    names = ["Cardiomegaly", "Pleural Effusion", "Nodule"]
    assert class_index(names, "effusion") == 1
    assert class_index(names, "Nodule") == 2  # exact name wins over the alias Nodule -> Lung Lesion
    assert class_index(names, 0) == 0
    with pytest.raises(IndexError):
        class_index(names, 5)


def default_xrv_densenet():
    import torchxrayvision as xrv

    torch.manual_seed(0)
    labels = xrv.models.model_urls["densenet121-res224-all"]["labels"]
    return xrv.models.DenseNet(weights=None, num_classes=len(labels)), labels


def test_xrv_input_convention_and_logits_match_a_manual_forward():
    import torchxrayvision as xrv

    torch.manual_seed(0)
    labels = xrv.models.model_urls["densenet121-res224-all"]["labels"]
    # a small DenseNet of xrv's own class keeps the test fast; the conversion code is the same
    model = xrv.models.DenseNet(growth_rate=4, block_config=(1, 1), num_init_features=8, num_classes=len(labels))
    classifier = XRVClassifier.from_module(model, labels, resolution=32)
    x = torch.rand(2, 1, 48, 48, generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        xrv_input = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False) * 2048 - 1024
        expected = model(xrv_input)  # weights=None: raw logits, no op_threshs
    assert float(classifier.to_xrv_input(torch.ones(1, 1, 32, 32)).max()) == 1024.0
    assert float(classifier.to_xrv_input(torch.zeros(1, 1, 32, 32)).min()) == -1024.0
    assert torch.allclose(classifier(x), expected, atol=1e-4)
    assert classifier.encode(x).shape == (2, model.classifier.in_features)
    column = labels.index("Cardiomegaly")
    cpg = counterfactual_probability_gain(classifier, x, x.flip(0), "Cardiomegaly")
    assert torch.allclose(cpg, expected[:, column] - expected.flip(0)[:, column], atol=1e-4)


def test_xrv_classifier_loads_a_state_dict_file(tmp_path):
    model, labels = default_xrv_densenet()
    path = tmp_path / "state.pt"
    torch.save(model.state_dict(), path)
    classifier = XRVClassifier("densenet121-res224-all", weights_path=path)
    assert classifier.class_names[labels.index("Effusion")] == "Pleural Effusion"
    assert classifier.class_names[labels.index("Pleural_Thickening")] == "Pleural Other"
    assert classifier.class_names[labels.index("Nodule")] == "Nodule"
    loaded = classifier.model.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded[name], tensor), name


def test_xrv_classifier_reads_a_pickled_model_with_weights_only(tmp_path):
    model, _ = default_xrv_densenet()
    path = tmp_path / "pickled.pt"
    torch.save(model, path)  # the official DenseNet release files are whole pickled models
    classifier = XRVClassifier("densenet121-res224-all", weights_path=path)
    loaded = classifier.model.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded[name], tensor), name


def test_xrv_missing_weights_is_a_clear_offline_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(XRVWeightsMissingError, match="models_data.*never downloads"):
        XRVClassifier("densenet121-res224-all")
    assert not (tmp_path / ".torchxrayvision").exists() or not any((tmp_path / ".torchxrayvision").rglob("*.pt"))
    with pytest.raises(ValueError, match="unknown torchxrayvision weights"):
        XRVClassifier("densenet-does-not-exist")


def test_xrv_mapping_covers_our_findings_except_support_devices():
    from cyclex.findings import ABNORMALITIES

    assert set(ABNORMALITIES) - set(XRV_PATHOLOGY_FOR_FINDING) == {"Support Devices"}
