"""Train the tiny causal HVAE arms on 64 px phantoms with attributes and ship one (issue 20).

    OMP_NUM_THREADS=1 nice -n 5 python scripts/train_demo_causal.py            # all five arms, ~20-40 min on 2 cores
    python scripts/train_demo_causal.py --arms baseline expert --no-ship         # a subset, nothing shipped

Data: the seed registry's `causal_training` phantoms (attributes on); the arm that ships is the one
with the highest removal effectiveness for findings on `causal_validation` (ties: the earlier arm),
never on benchmark queries. The expert is the demo's phantom classifier (a stand-in for
torchxrayvision's DenseNet, which needs weights this offline demo does not have), handed in here, in
the application layer. Arms go to --out (benchmarks/.work/causal/arms by default; benchmarks/causal.py
reads them); the shipped one is copied to cyclex/demo/weights/causal.

The 192 px configuration for real data is `cyclex.causal.recipe.paper_recipe()`; run it with
`accelerate launch -m cyclex train-causal --images FOLDER --recipe paper --out DIR` (see README).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHIPPED = ROOT / "cyclex" / "demo" / "weights" / "causal"
DEFAULT_OUT = ROOT / "benchmarks" / ".work" / "causal" / "arms"


def phantom_expert():
    """The demo's phantom classifier as a differentiable expert (a stand-in for torchxrayvision)."""
    from cyclex.causal.expert import DifferentiableExpert
    from cyclex.demo.phantom_classifier import PhantomClassifier

    classifier = PhantomClassifier.from_pretrained(ROOT / "cyclex" / "demo" / "weights" / "classifier")
    return DifferentiableExpert(classifier.net, classifier.class_names,
                                name="phantom classifier (stand-in for torchxrayvision DenseNet)")


def main(argv: list[str] | None = None) -> dict:
    import torch

    from cyclex.causal.axioms import evaluate_axioms
    from cyclex.causal.counterfactual_training import mean_nelbo
    from cyclex.causal.data import causal_phantoms, phantom_tensors
    from cyclex.causal.folder import CausalModel
    from cyclex.causal.recipe import ARMS, tiny_recipe, train_causal_arms
    from cyclex.datasets.seed_registry import CAUSAL_TRAINING, CAUSAL_VALIDATION

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--arms", nargs="*", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--n-train", type=int, default=CAUSAL_TRAINING.n)
    parser.add_argument("--n-validation", type=int, default=CAUSAL_VALIDATION.n)
    parser.add_argument("--ship", action=argparse.BooleanOptionalAction, default=True,
                        help="copy the arm chosen on validation seeds to cyclex/demo/weights/causal")
    parser.add_argument("--reuse-elbo", action="store_true",
                        help="start the arms from --out/elbo (an earlier run's ELBO model and predictors)")
    parser.add_argument("--counterfactual-steps", type=int, default=None,
                        help="counterfactual-training steps of the baseline and expert arms (default: tiny_recipe's)")
    parser.add_argument("--al-finetune-steps", type=int, default=None,
                        help="counterfactual-training steps after each active-learning round (default: tiny_recipe's)")
    parser.add_argument("--skip-training", action="store_true",
                        help="reuse the arms already in --out (validate and ship only)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.manual_seed(0)

    recipe = tiny_recipe()
    if args.counterfactual_steps is not None:
        recipe.counterfactual.training.steps = args.counterfactual_steps
    if args.al_finetune_steps is not None:
        recipe.al_finetune_steps = args.al_finetune_steps
    schema = recipe.hvae.schema
    train_images, train_parents = phantom_tensors(causal_phantoms(args.n_train, CAUSAL_TRAINING.set_seed), schema)
    val_images, val_parents = phantom_tensors(causal_phantoms(args.n_validation, CAUSAL_VALIDATION.set_seed), schema)
    metadata = {
        "data": "phantoms with attributes (cyclex.causal.data.causal_phantom_config), 64 px, 8-bit",
        "training_seeds": CAUSAL_TRAINING.drawn(args.n_train), "validation_seeds": CAUSAL_VALIDATION.drawn(args.n_validation),
        "expert": "phantom classifier (cyclex/demo/weights/classifier), a stand-in for torchxrayvision DenseNet",
        "script": "scripts/train_demo_causal.py",
    }
    if args.skip_training:
        report = json.loads((args.out / "recipe.json").read_text())
    else:
        report = train_causal_arms(train_images, train_parents, recipe, args.out, expert=phantom_expert(),
                                   arms=args.arms, metadata=metadata, reuse_elbo=args.reuse_elbo)

    # validation: the ELBO, the predictors' accuracy on real images, the axioms; choose the shipped arm
    validation = {}
    for arm in ["elbo", *[a for a in ARMS if (args.out / a).is_dir()]]:
        model = CausalModel.from_pretrained(args.out / arm)
        predicted = model.predictor.predict(val_images)
        accuracy = ((predicted[:, 1:] >= 0.5).float() == val_parents[:, 1:]).float().mean(0)
        axioms = evaluate_axioms(model.hvae, model.predictor, val_images[:100], val_parents[:100])
        validation[arm] = {"nelbo": mean_nelbo(model.hvae, val_images, val_parents),
                           "predictor_accuracy_binary_parents": [float(a) for a in accuracy],
                           "effectiveness_findings": axioms["effectiveness_findings"],
                           "effectiveness_findings_removal": axioms["effectiveness_findings_removal"],
                           "composition_ssim_decoder_mean": axioms["composition_ssim_decoder_mean"],
                           "reversibility_ssim": axioms["reversibility_ssim"]}
        logging.info("validation %s: %s", arm, validation[arm])
    report["validation"] = validation
    candidates = [a for a in ARMS if a in validation]
    chosen = max(candidates, key=lambda a: (validation[a]["effectiveness_findings_removal"] or 0.0,
                                           -candidates.index(a)))
    report["shipped_arm"] = chosen if args.ship else None
    (args.out / "recipe.json").write_text(json.dumps(report, indent=2, default=str))
    if args.ship:
        shutil.rmtree(SHIPPED, ignore_errors=True)
        SHIPPED.mkdir(parents=True)
        for file in (args.out / chosen).iterdir():
            shutil.copy2(file, SHIPPED / file.name)
        meta = json.loads((SHIPPED / "causal_model.json").read_text())
        meta["chosen_on_validation"] = {"rule": "highest validation effectiveness_findings_removal",
                                        "validation": validation}
        (SHIPPED / "causal_model.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        logging.info("shipped arm %s to %s", chosen, SHIPPED)
    return report


if __name__ == "__main__":
    main()
