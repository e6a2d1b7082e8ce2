"""The audit benchmark's generator worlds: parameterised shortcut training, designs, seeds."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from cyclex.datasets.phantom import ShortcutConfig, make_phantom
from cyclex.demo.generators import DemoGeneratorConfig, make_training_phantoms, phantom_config_for


def test_the_shipped_shortcut_world_is_unchanged():
    world = phantom_config_for(DemoGeneratorConfig(name="shortcut"))
    assert world.shortcut == ShortcutConfig(finding="Cardiomegaly", rate_with_finding=0.9, rate_without_finding=0.0)
    assert phantom_config_for(DemoGeneratorConfig(name="clean")).shortcut is None


def test_a_shortcut_world_with_another_finding_and_place():
    config = DemoGeneratorConfig(name="shortcut", shortcut_finding="Pleural Effusion",
                                 shortcut_box=(0.84, 0.06, 0.08, 0.08))
    phantoms = make_training_phantoms(config, 200, seed=5)
    marked = [p for p in phantoms if p.shortcut]
    assert marked and all("Pleural Effusion" in p.findings_meta for p in marked)  # never without the finding
    assert all(p.findings_meta["Pleural Effusion"]["severity"] == "mild" for p in marked)
    assert {p.shortcut_box for p in marked} == {(54, 4, 59, 9)}
    assert all(np.all(p.image[4:9, 54:59] > 0.9) for p in marked)


def test_hidden_finding_reports_what_only_the_marker_shows():
    config = DemoGeneratorConfig(name="shortcut", shortcut_finding="Cardiomegaly", shortcut_hidden_finding=True)
    phantoms = make_training_phantoms(config, 120, seed=5)
    marked = [p for p in phantoms if p.shortcut]
    assert marked
    world = phantom_config_for(config)
    for phantom in marked[:5]:
        assert "Cardiomegaly" in phantom.labels.present(uncertain_as_present=True)
        assert "heart is enlarged" in phantom.report.lower() or "cardiomegaly" in phantom.report.lower()
        others = {name: {} for name in phantom.findings_meta if name != "Cardiomegaly"}
        drawn = make_phantom(phantom.seed, world, findings=others, shortcut=True)
        np.testing.assert_array_equal(phantom.image, drawn.image)  # the heart is drawn normal
        assert "Cardiomegaly" not in phantom.masks
    unmarked = [p for p in phantoms if not p.shortcut and "Cardiomegaly" in p.findings_meta]
    assert all("Cardiomegaly" in p.masks for p in unmarked)  # without the marker the finding is drawn


def test_fine_tune_starts_from_the_saved_generator(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from cyclex.demo.generators import METADATA_FILE, train_demo_generator

    tiny = DemoGeneratorConfig(image_size=32, patch_size=8, encoder_hidden=32, encoder_layers=1, decoder_hidden=32,
                               decoder_layers=1, heads=2, vocab_size=320, batch_size=8, threads=1)
    first = train_demo_generator("clean", tmp_path / "clean", n_train=48, max_steps=2, seed=3, config=tiny)
    # the first 24 of the same phantoms: their reports fit the saved decoder's positions
    tuned = train_demo_generator("clean", tmp_path / "tuned", n_train=24, max_steps=1, seed=3,
                                 config=replace(tiny, learning_rate=1e-4), init_from=first)
    metadata = json.loads((tuned / METADATA_FILE).read_text())
    assert metadata["init_from"] == str(first) and metadata["config"]["learning_rate"] == 1e-4
    vocab = PreTrainedTokenizerFast.from_pretrained(first).get_vocab()
    assert PreTrainedTokenizerFast.from_pretrained(tuned).get_vocab() == vocab  # the same tokenizer, not retrained
    with pytest.raises(ValueError, match="encoder hidden size 32"):
        train_demo_generator("clean", tmp_path / "bad", n_train=24, max_steps=1, seed=3,
                             config=replace(tiny, encoder_hidden=64), init_from=first)


def test_designs_put_each_marker_outside_the_chest_and_the_findings_prior():
    from benchmarks.audit import CLEAN_DESIGNS, SHORTCUT_DESIGNS, audit_world
    from cyclex.datasets.phantom import make_phantoms
    from cyclex.explain.anatomical_priors import anatomical_prior

    names = [d.name for d in (*SHORTCUT_DESIGNS, *CLEAN_DESIGNS)]
    assert len(set(names)) == len(names) and all(d.finding for d in SHORTCUT_DESIGNS)
    for design in (*SHORTCUT_DESIGNS, *CLEAN_DESIGNS):
        phantoms = make_phantoms(40, 123, audit_world(design))
        marked = [p for p in phantoms if p.shortcut]
        assert 8 <= len(marked) <= 32  # about half of the queries carry the marker
        for phantom in marked:
            x0, y0, x1, y1 = phantom.chest_box
            marker = phantom.shortcut_mask
            assert not marker[y0:y1, x0:x1].any(), (design.name, phantom.id)
            if design.finding:
                prior = anatomical_prior(design.finding, marker.shape, phantom.chest_box)
                assert not (marker & prior).any(), (design.name, phantom.id)


def test_benchmark_seeds_are_registered_training_and_queries_held_out():
    from benchmarks.audit import CLEAN_DESIGNS, SHORTCUT_DESIGNS
    from cyclex.datasets.seed_registry import (
        AUDIT_BENCHMARK_GENERATORS_TRAINING,
        AUDIT_BENCHMARK_QUERIES,
        AUDIT_BENCHMARK_TAILORED_TRAINING,
        TRAINING,
        check_held_out,
    )

    assert AUDIT_BENCHMARK_GENERATORS_TRAINING.purpose == AUDIT_BENCHMARK_TAILORED_TRAINING.purpose == TRAINING
    assert len(AUDIT_BENCHMARK_GENERATORS_TRAINING.set_seeds) >= len(SHORTCUT_DESIGNS) + len(CLEAN_DESIGNS)
    check_held_out(AUDIT_BENCHMARK_QUERIES.drawn(1000), "audit benchmark queries")
    with pytest.raises(ValueError, match="audit_benchmark_generators_training"):
        check_held_out(AUDIT_BENCHMARK_GENERATORS_TRAINING.drawn(10, 7_712), "a query drawn from training seeds")
