"""The causal HVAE, its training, active learning and the causal maker (issue 20), on tiny models in seconds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cyclex.causal.active_learning import (
    NOT_PRESENTED,
    ForgettingRecorder,
    forgetting_counts,
    select_most_forgotten,
    write_forgetting_report,
)
from cyclex.causal.counterfactual_training import (
    CounterfactualTrainingConfig,
    LagrangeMultiplier,
    intervene,
    train_counterfactual,
)
from cyclex.causal.data import causal_phantoms, phantom_tensors
from cyclex.causal.expert import DifferentiableExpert, expert_term
from cyclex.causal.folder import CausalModel
from cyclex.causal.hvae import CausalHVAE, HVAEConfig
from cyclex.causal.parent_predictors import ParentPredictor, ParentPredictorConfig
from cyclex.causal.training import TrainingConfig, clip_or_skip, optimise, train_hvae, train_parent_predictor
from cyclex.counterfactuals import create_maker
from cyclex.counterfactuals.causal import CausalCounterfactualMaker
from cyclex.explain.faithfulness import ssim
from cyclex.findings import ABNORMALITIES, StructuredPrompt

SIZE = 32
TINY = dict(image_size=SIZE, resolutions=(32, 16, 8, 1), widths=(8, 16, 16, 16), blocks=(1, 1, 1, 1), z_max_res=8)


def _quick(steps=8, **kw):
    return TrainingConfig(**{"steps": steps, "batch_size": 8, "learning_rate": 1e-3, "warmup_steps": 2, "log_every": 4, **kw})


@pytest.fixture(scope="module")
def data():
    schema = HVAEConfig(**TINY).schema
    images, parents = phantom_tensors(causal_phantoms(24, 20_998), schema)
    return F.interpolate(images, size=(SIZE, SIZE), mode="area"), parents


@pytest.fixture(scope="module")
def trained(data):
    torch.manual_seed(0)
    images, parents = data
    hvae, log = train_hvae(CausalHVAE(HVAEConfig(**TINY)), images, parents, _quick(12))
    predictor, _ = train_parent_predictor(ParentPredictor(ParentPredictorConfig(image_size=SIZE, channels=(8, 16))),
                                          images, parents, _quick(8, grad_skip=float("inf")))
    assert log.history[-1]["loss"] < log.history[0]["loss"] + 1.0  # it trained without blowing up
    return CausalModel(hvae=hvae, predictor=predictor, metadata={"arm": "test"})


def _expert():
    torch.manual_seed(1)
    return DifferentiableExpert(nn.Sequential(nn.Flatten(), nn.Linear(SIZE * SIZE, len(ABNORMALITIES))), ABNORMALITIES)


def test_composition_abduction_then_prediction_with_the_same_parents_reconstructs_x(trained, data):
    images, parents = data
    with torch.no_grad():
        same = trained.hvae.counterfactual(images, parents, parents)
        flipped = parents.clone()
        flipped[:, 2:] = 1.0 - flipped[:, 2:]
        other = trained.hvae.counterfactual(images, parents, flipped)
    assert float(ssim(images, same).mean()) >= 0.99
    assert float((other - images).abs().mean()) > 1e-4  # new parents do change the image


def test_counterfactual_checks_shapes(trained, data):
    images, parents = data
    with pytest.raises(ValueError, match=r"parents must be \(B=24, P=13\)"):
        trained.hvae.counterfactual(images, parents, parents[:, :5])


def test_lagrange_multiplier_rises_while_the_elbo_constraint_is_violated_and_stays_clamped_at_zero():
    multiplier = LagrangeMultiplier(init=0.0, lr=0.5)
    values = [multiplier.step(torch.tensor(-0.2)) for _ in range(3)]  # c = eps - nelbo < 0: violated
    assert values == sorted(values) and values[-1] == pytest.approx(0.3)
    for _ in range(5):
        multiplier.step(torch.tensor(1.0))  # satisfied: lambda goes down, never below 0
    assert float(multiplier.value.detach()) == 0.0


def test_counterfactual_training_raises_lambda_when_the_bound_is_unreachable(trained, data):
    images, parents = data
    config = CounterfactualTrainingConfig(training=_quick(4), elbo_bound=0.0, lagrange_lr=0.1)  # nelbo > 0 always
    _, log, info = train_counterfactual(trained.hvae, trained.predictor, images, parents, config, expert=_expert())
    assert info["lambda"] > 0.0 and log.history[-1]["constraint"] < 0


def test_expert_term_has_a_gradient_into_the_image_mechanism(trained, data):
    images, parents = data
    hvae = CausalHVAE(trained.hvae.config)
    hvae.load_state_dict(trained.hvae.state_dict())
    hvae.requires_grad_(True)
    expert = _expert()
    pa_new = intervene(parents, torch.full((parents.shape[0],), 3), torch.Generator().manual_seed(0))
    x_cf = hvae.counterfactual(images, parents, pa_new)
    column = expert.column(hvae.config.schema.names[3])
    with torch.no_grad():
        p_factual = expert.probabilities(images)[:, column]
    term = expert_term(p_factual, expert.probabilities(x_cf)[:, column], alpha=1.0, beta=10.0)
    term.backward()
    decoder_grads = [p.grad.abs().sum() for p in hvae.decoder_blocks.parameters() if p.grad is not None]
    assert decoder_grads and float(sum(decoder_grads)) > 0
    assert all(p.grad is None for p in expert.module.parameters())  # the expert itself stays frozen


def test_expert_term_value_and_mask():
    p, q = torch.tensor([0.9, 0.9]), torch.tensor([0.4, 0.9])
    assert float(expert_term(p, q, 2.0, 10.0)) == pytest.approx(2.0 * np.log1p(5.0) / 2)
    assert float(expert_term(p, q, 2.0, 10.0, changed=torch.tensor([True, False]))) == pytest.approx(2.0 * np.log1p(5.0))


def test_forgetting_counts_on_a_hand_made_matrix():
    n = NOT_PRESENTED
    matrix = np.array([
        [1, 0, 1, 0],  # forgotten twice
        [1, 1, 1, 1],  # never forgotten
        [0, 0, 0, 0],  # never learned: forgotten at every presentation
        [1, n, 0, n],  # correct, (absent), wrong: one event across the gap
        [0, 1, n, 1],  # learned, never forgotten
        [n, n, n, n],  # never presented
        [0, n, 0, n],  # never learned, presented twice
    ], dtype=np.uint8)
    assert forgetting_counts(matrix).tolist() == [2, 0, 4, 1, 0, 0, 2]
    assert select_most_forgotten(forgetting_counts(matrix), [0, 1, 3, 6], 2).tolist() == [0, 6]
    with pytest.raises(ValueError, match="uint8"):
        forgetting_counts(matrix.astype(np.int64))


def test_recorder_writes_correctness_per_presentation(tmp_path):
    recorder = ForgettingRecorder(4, 2)
    recorder.record([0, 2], 0, [True, False])
    recorder.record([2], 1, [True])
    assert recorder.matrix.tolist() == [[1, 255], [255, 255], [0, 1], [255, 255]]
    paths = write_forgetting_report(tmp_path, {"real": np.array([0.0, 0.5, 1.0])})
    assert paths["png"].stat().st_size > 0 and paths["json"].is_file()


def test_gradient_skipping_on_a_huge_gradient():
    layer = nn.Linear(2, 1)
    layer.weight.grad = torch.full_like(layer.weight, 1e6)
    layer.bias.grad = torch.zeros_like(layer.bias)
    norm, skip = clip_or_skip(layer.parameters(), 350.0, 500.0)
    assert skip and norm > 500
    layer.weight.grad = torch.full_like(layer.weight, float("nan"))
    assert clip_or_skip(layer.parameters(), 350.0, 500.0)[1]
    layer.weight.grad = torch.full_like(layer.weight, 300.0)  # norm 424: clipped to 350, not skipped
    layer.bias.grad = torch.zeros_like(layer.bias)  # the NaN clip above spread NaN into it
    norm, skip = clip_or_skip(layer.parameters(), 350.0, 500.0)
    assert not skip and float(torch.cat([layer.weight.grad.flatten(), layer.bias.grad]).norm()) == pytest.approx(350.0, rel=1e-4)


def test_training_loop_skips_every_update_whose_gradient_is_huge():
    model = nn.Linear(2, 1)
    before = [p.detach().clone() for p in model.parameters()]
    data = torch.utils.data.TensorDataset(torch.ones(8, 2))
    log = optimise(model, lambda net, x: {"loss": 1e6 * net(x).sum()}, data, _quick(3, warmup_steps=0))
    assert log.skipped_updates == 3
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_maker_round_trips_its_folder_and_serves_prompts(trained, data, tmp_path):
    images, _ = data
    trained.save_pretrained(tmp_path / "model")
    maker = create_maker("causal", None, causal_model=str(tmp_path / "model"), num_inference_steps=50,
                         guidance_scale=1.0, strength=1.0)
    assert isinstance(maker, CausalCounterfactualMaker) and maker.settings()["arm"] == "test"
    source = StructuredPrompt(("Cardiomegaly", "Pleural Effusion")).text
    target = StructuredPrompt(("Pleural Effusion",)).text
    out = maker.make(images[:2], [source, source], [target, source])
    assert out.images.shape == (2, 1, SIZE, SIZE) and out.details[0]["variant"] == "causal"
    assert float(ssim(images[1:2], out.images[1:2]).mean()) >= 0.99  # unchanged prompt: the query back
    again = maker.make(images[:2], [source, source], [target, source])
    assert torch.equal(again.images, out.images)  # deterministic
    masks = torch.zeros(2, 1, SIZE, SIZE)
    masked = maker.make(images[:2], [source, source], [target, target], masks=masks)
    assert torch.equal(masked.images, images[:2])  # nothing may change outside the (empty) mask
    with pytest.raises(ValueError, match="causal_model=DIR"):
        create_maker("causal", None)


def test_causal_maker_runs_in_the_cycle(trained):
    from cycle_fakes import KeywordLabeler, brightness_generator, query

    from cyclex.cycle.explainer import CyclicExplainer

    explainer = CyclicExplainer(brightness_generator(), KeywordLabeler(), CausalCounterfactualMaker(trained),
                                image_size=SIZE)
    results = explainer.explain(torch.stack([query(), query(effusion=0.9)]))
    assert results and all(r.counterfactual.shape == (SIZE, SIZE) for r in results)
    assert {r.maker_details["variant"] for r in results} == {"causal"}


def test_paper_recipe_builds_the_192_px_model_and_its_elbo_runs():
    from cyclex.causal.recipe import paper_recipe

    recipe = paper_recipe()
    model = CausalHVAE(recipe.hvae)
    assert recipe.elbo_training.learning_rate == 5e-5 and recipe.elbo_training.grad_clip == 350
    assert recipe.elbo_training.grad_skip == 500 and recipe.elbo_training.ema_rate == 0.999
    with torch.no_grad():
        out = model.elbo(torch.zeros(1, 1, 192, 192), torch.zeros(1, model.n_parents))
    assert torch.isfinite(out["nelbo"])


@pytest.mark.parametrize("from_start_model", [False, True])
def test_active_learning_rounds_keep_the_elbo_models_bound_unless_asked_to_re_estimate_it(data, tmp_path,
                                                                                         from_start_model):
    from cyclex.causal.active_learning import ProxyTrainingConfig
    from cyclex.causal.recipe import CausalRecipe, train_causal_arms

    torch.manual_seed(0)
    images, parents = data
    recipe = CausalRecipe(
        hvae=HVAEConfig(**TINY), predictor=ParentPredictorConfig(image_size=SIZE, channels=(8, 16)),
        elbo_training=_quick(6), predictor_training=_quick(4, grad_skip=float("inf")),
        counterfactual=CounterfactualTrainingConfig(training=_quick(3), damping=10.0, elbo_margin=0.05),
        al_finetune_steps=3, proxy=ProxyTrainingConfig(epochs=2, batch_size=8),
        al_bound_from_start_model=from_start_model)
    report = train_causal_arms(images, parents, recipe, tmp_path, expert=_expert(),
                               arms=["expert", "expert_al_10", "expert_al_20"])
    bounds = [report["arms"][name]["elbo_bound"] for name in ("expert", "expert_al_10", "expert_al_20")]
    if from_start_model:  # each round measures its own start model, which counterfactual training moved
        assert bounds[1] != bounds[0] and bounds[2] != bounds[1]
    else:
        assert bounds[1] == bounds[0] and bounds[2] == bounds[0]
    assert [r["total_added"] for r in report["active_learning"]] == [2, 4]  # 10 % of 24 per round, rounded
