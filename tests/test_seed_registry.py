"""The seed registry keeps training, validation and query phantoms apart (issue 16, item 1)."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from cyclex.datasets import seed_registry as registry
from cyclex.datasets.phantom import PhantomConfig, make_phantom, phantom_seed, to_uint8
from cyclex.datasets.seed_registry import QUERY, TRAINING, VALIDATION, SeedUse

WEIGHTS = Path(__file__).resolve().parents[1] / "cyclex" / "demo" / "weights"


def _inside(ranges, reserved) -> bool:
    return all(any(r[0] <= a and b <= r[1] for r in reserved) for a, b in ranges)


def test_registered_uses_of_different_purposes_never_overlap():
    registry.check_seed_registry()
    assert registry.cross_purpose_overlaps() == []
    assert {use.purpose for use in registry.SEED_USES} == {TRAINING, VALIDATION, QUERY}


def test_an_overlap_between_a_query_and_training_fails_naming_both():
    # the search benchmark before issue 16: queries of set 0, the demo generators' training set
    old_search = SeedUse("old_search_queries", QUERY, (0,), None, "benchmarks/search.py", "seed=0")
    uses = (*registry.SEED_USES, old_search)
    with pytest.raises(ValueError, match="demo_generators_training and old_search_queries share seeds"):
        registry.check_seed_registry(uses)
    with pytest.raises(ValueError, match="phantom_classifier_training"):
        registry.check_held_out(old_search.drawn(40))
    # same purpose may share (two benchmarks on one held-out set), repeated names may not
    assert registry.cross_purpose_overlaps((registry.DEMO_GENERATORS_TRAINING, registry.PHANTOM_CLASSIFIER_TRAINING)) == []
    with pytest.raises(ValueError, match="names used twice"):
        registry.check_seed_registry((registry.DEMO_QUERIES, registry.DEMO_QUERIES))


def test_ranges_are_in_make_phantom_seeds():
    assert registry.DEMO_GENERATORS_TRAINING.ranges == [[0, 4000]]
    assert registry.TAILORED_SD_TRAINING.ranges == [[17_000_000, 17_002_000]]
    assert registry.CYCLE_BENCHMARK_QUERIES.ranges == [[phantom_seed(7_400, 0), phantom_seed(7_401, 0)]]
    assert registry.CYCLE_BENCHMARK_QUERIES.drawn(200) == [[7_400_000_000, 7_400_000_200]]
    with pytest.raises(ValueError, match="reserves 4000"):
        registry.DEMO_GENERATORS_TRAINING.drawn(4001)
    assert registry.merge_ranges([[5, 9], [0, 3], [3, 4]]) == [[0, 4], [5, 9]]
    assert registry.ranges_of(TRAINING)[0] == [0, 4000]


def test_the_code_draws_its_phantoms_from_the_registry():
    from benchmarks import cycle, demo_guidance, generators
    from cyclex.demo import cf_thresholds, queries
    from cyclex.demo.base_sd import DemoBaseSDConfig, DemoTailoredConfig
    from cyclex.demo.generators import DemoGeneratorConfig

    assert (DemoGeneratorConfig().seed, DemoGeneratorConfig().n_train) == (0, registry.DEMO_GENERATORS_TRAINING.n)
    base, tailored = DemoBaseSDConfig(), DemoTailoredConfig()
    assert (base.phantom_seed, base.n_phantoms // 2) == (0, registry.DEMO_VAE_TRAINING.n)
    assert base.heldout_phantom_seed == registry.DEMO_VAE_HELDOUT.set_seed
    assert (tailored.phantom_seed, tailored.n_images) == (17, registry.TAILORED_SD_TRAINING.n)
    assert tailored.heldout_phantom_seed == registry.TAILORED_SD_HELDOUT.set_seed
    assert cf_thresholds.CALIBRATION_SEED == registry.CF_THRESHOLD_CALIBRATION.set_seed
    assert cf_thresholds.CALIBRATION_DRAWS_PER_PAIR * cf_thresholds.CALIBRATION_PAIRS == registry.CF_THRESHOLD_CALIBRATION.n
    assert queries.DEMO_QUERY_SEED == registry.DEMO_QUERIES.set_seed
    assert cycle.BENCH_SEED == registry.CYCLE_BENCHMARK_QUERIES.set_seed
    assert demo_guidance.VALIDATION_SEED == registry.DEMO_GUIDANCE_VALIDATION.set_seed
    assert generators.HELD_OUT_SEED == registry.GENERATORS_BENCHMARK_QUERIES.set_seeds[0]


def test_shipped_weights_were_trained_inside_the_registered_training_ranges():
    for name in ("clean", "shortcut"):
        config = json.loads((WEIGHTS / "generators" / name / "cyclex_demo.json").read_text())["config"]
        used = [[phantom_seed(config["seed"], 0), phantom_seed(config["seed"], config["n_train"])]]
        assert _inside(used, registry.DEMO_GENERATORS_TRAINING.ranges), name
    metrics = json.loads((WEIGHTS / "classifier" / "metrics.json").read_text())
    used = [[phantom_seed(metrics["seed"], 0), phantom_seed(metrics["seed"], metrics["n_train"])]]
    assert _inside(used, registry.PHANTOM_CLASSIFIER_TRAINING.ranges)
    seeds = json.loads((WEIGHTS / "cf_thresholds.json").read_text())["provenance"]["seeds"]
    assert _inside([[s, s + 1] for s in seeds], registry.CF_THRESHOLD_CALIBRATION.ranges)
    for name in ("clean", "shortcut"):
        build = json.loads((WEIGHTS / "tailored" / name / "demo_build.json").read_text())["config"]
        start = build.get("phantom_seed", build["seed"] + 17)  # builds before the registry: seed + 17
        used = [[phantom_seed(start, 0), phantom_seed(start, build["n_images"])]]
        assert _inside(used, registry.TAILORED_SD_TRAINING.ranges), name


def _worlds() -> list[PhantomConfig]:
    """Every phantom world cyclex draws from: the same seed gives different pixels in each."""
    from cyclex.demo.generators import DemoGeneratorConfig, phantom_config_for
    from cyclex.demo.queries import demo_query_config

    return [PhantomConfig(), PhantomConfig(report_style="canonical"),
            phantom_config_for(DemoGeneratorConfig(name="clean")), phantom_config_for(DemoGeneratorConfig(name="shortcut")),
            demo_query_config()]


def _sampled_seeds(use: SeedUse, rng: np.random.Generator, k: int = 3) -> list[int]:
    """The first seed, the last drawn one and k random ones of each range (queries: their first 1000)."""
    seeds = []
    for start, stop in use.ranges:
        stop = min(stop, start + 1000)
        seeds += [start, stop - 1, *rng.integers(start, stop, size=k).tolist()]
    return seeds


def _hashes(seeds, worlds) -> dict[str, int]:
    return {hashlib.sha256(to_uint8(make_phantom(s, world).image).tobytes()).hexdigest(): s
            for s in seeds for world in worlds}


def test_no_sampled_query_is_pixel_identical_to_a_sampled_training_image():
    rng = np.random.default_rng(16)
    worlds = _worlds()
    training = _hashes([s for use in registry.SEED_USES if use.purpose == TRAINING
                        for s in _sampled_seeds(use, rng)], worlds)
    queries = _hashes([s for use in registry.SEED_USES if use.purpose == QUERY
                       for s in _sampled_seeds(use, rng)], worlds)
    # many worlds draw the same pixels for a seed (the report style changes only the report): count seeds
    assert len(set(training.values())) >= 20 and len(set(queries.values())) >= 30
    assert not set(training) & set(queries)
    # the check does catch an identical image: the search benchmark's first query before issue 16
    # (make_phantom(phantom_seed(0, 0)), default world) is a training image of the demo generators
    old_first_query = _hashes([phantom_seed(0, 0)], [PhantomConfig()])
    assert set(old_first_query) & set(training)
