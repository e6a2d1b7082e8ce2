"""Which phantom seeds train, validate and query what: the one register of the phantom world's seeds.

A phantom is drawn from one integer seed (`make_phantom(seed)`); a set of them from a set seed:
`make_phantoms(n, set_seed)` draws the seeds `phantom_seed(set_seed, i) = set_seed * 1e6 + i`,
i < n. Every use below is a list of `[start, stop)` ranges in that unit, the integer
`make_phantom` takes.

Three purposes, which must never share a seed:
- `training`: the phantoms anything cyclex ships was trained or calibrated on (demo generators,
  phantom classifier, the demo SDs' VAE and tailored UNets, the demo CF thresholds);
- `validation`: phantoms a setting was chosen on (the demo's omega) or a shipped build was measured
  on while it was made, and retired benchmark sets that were looked at while settings were chosen;
- `query`: what benchmarks report and `cyclex demo` explains.

A use with a fixed size (`n`, what the shipped weights were built with) covers its first n seeds;
a use whose size is a command-line option (`n=None`) reserves its set's whole block of 1e6 seeds,
so any n stays inside. `tests/test_seed_registry.py` fails when two uses of different purposes
overlap and when a sampled query image is pixel-identical to a sampled training image; benchmarks
call `check_held_out` on the seeds they actually draw.

Moving a use: move queries, never training (shipped weights would no longer match the register).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cyclex.datasets.phantom import phantom_seed

__all__ = [
    "TRAINING",
    "VALIDATION",
    "QUERY",
    "PURPOSES",
    "SeedUse",
    "SEED_USES",
    "seed_use",
    "ranges_of",
    "merge_ranges",
    "cross_purpose_overlaps",
    "check_seed_registry",
    "check_held_out",
    "DEMO_GENERATORS_TRAINING",
    "PHANTOM_CLASSIFIER_TRAINING",
    "PHANTOM_CLASSIFIER_VALIDATION",
    "DEMO_VAE_TRAINING",
    "DEMO_VAE_HELDOUT",
    "TAILORED_SD_TRAINING",
    "TAILORED_SD_HELDOUT",
    "CF_THRESHOLD_CALIBRATION",
    "ANATOMICAL_PRIOR_FITTING",
    "DEMO_INSTRUCT_TRAINING",
    "ANATOMICAL_PRIOR_CHECK",
    "RSE_BENCHMARK_QUERIES",
    "AUDIT_BENCHMARK_QUERIES",
    "AUDIT_BENCHMARK_GENERATORS_TRAINING",
    "AUDIT_BENCHMARK_TAILORED_TRAINING",
    "RSE_VALIDATION",
    "DEMO_GUIDANCE_VALIDATION",
    "CYCLE_BENCHMARK_DEVELOPMENT",
    "SEARCH_BENCHMARK_DEVELOPMENT",
    "SEARCH_VALIDATION",
    "DEMO_QUERIES",
    "CYCLE_BENCHMARK_QUERIES",
    "SEARCH_BENCHMARK_QUERIES",
    "GENERATORS_BENCHMARK_QUERIES",
    "TAILORED_BENCHMARK_QUERIES",
    "TAILORED_BENCHMARK_THROUGHPUT",
    "CAUSAL_TRAINING",
    "CAUSAL_VALIDATION",
    "CAUSAL_BENCHMARK_QUERIES",
]

TRAINING, VALIDATION, QUERY = "training", "validation", "query"
PURPOSES = (TRAINING, VALIDATION, QUERY)

Range = list[int]  # [start, stop), phantom seeds


@dataclass(frozen=True)
class SeedUse:
    """One use of phantom seeds: `n` phantoms (None: any number) of each set seed in `set_seeds`."""

    name: str
    purpose: str
    set_seeds: tuple[int, ...]
    n: int | None  # None: the size is an option, the set's whole block is reserved
    used_by: str  # the code that draws these phantoms
    description: str

    def __post_init__(self) -> None:
        if self.purpose not in PURPOSES:
            raise ValueError(f"SeedUse {self.name!r}: purpose must be one of {PURPOSES}, got {self.purpose!r}")
        if not self.set_seeds or any(int(s) < 0 for s in self.set_seeds):
            raise ValueError(f"SeedUse {self.name!r}: set_seeds must be non-negative ints, got {self.set_seeds!r}")
        if self.n is not None and not 0 < self.n <= phantom_seed(1, 0):
            raise ValueError(f"SeedUse {self.name!r}: n must be in [1, 1e6] or None, got {self.n!r}")

    @property
    def set_seed(self) -> int:
        """The set seed of a one-set use (`make_phantoms(n, use.set_seed)`)."""
        if len(self.set_seeds) != 1:
            raise ValueError(f"SeedUse {self.name!r} has {len(self.set_seeds)} set seeds {self.set_seeds}; "
                             "index set_seeds instead")
        return self.set_seeds[0]

    @property
    def ranges(self) -> list[Range]:
        """The [start, stop) phantom-seed ranges this use reserves."""
        return [[phantom_seed(s, 0), phantom_seed(s, self.n) if self.n is not None else phantom_seed(s + 1, 0)]
                for s in self.set_seeds]

    def drawn(self, n: int, set_seed: int | None = None) -> list[Range]:
        """The range the first `n` phantoms of one of this use's sets occupy (default: its only set).

        Refuses an n that leaves the reserved range, so a benchmark cannot drift into other seeds.
        """
        seed = self.set_seed if set_seed is None else int(set_seed)
        if seed not in self.set_seeds:
            raise ValueError(f"SeedUse {self.name!r}: set seed {seed} is not one of {self.set_seeds}")
        if self.n is not None and n > self.n:
            raise ValueError(f"SeedUse {self.name!r} reserves {self.n} phantoms per set, asked for {n}")
        if not 0 <= n <= phantom_seed(1, 0):
            raise ValueError(f"SeedUse {self.name!r}: n must be in [0, 1e6], got {n}")
        return [[phantom_seed(seed, 0), phantom_seed(seed, n)]]

    def to_dict(self) -> dict:
        return {"name": self.name, "purpose": self.purpose, "ranges": self.ranges, "used_by": self.used_by,
                "description": self.description}


# --- training and calibration of what cyclex ships (cyclex/demo/weights) ---------------------------------
DEMO_GENERATORS_TRAINING = SeedUse(
    "demo_generators_training", TRAINING, (0,), 4000, "cyclex.demo.generators.train_demo_generator",
    "both demo generators (clean and shortcut worlds, DemoGeneratorConfig.n_train = 4000)")
PHANTOM_CLASSIFIER_TRAINING = SeedUse(
    "phantom_classifier_training", TRAINING, (0,), 1600, "cyclex.demo.phantom_classifier.train_phantom_classifier",
    "the phantom classifier: CPG classifier, stand-in CLIP encoder and stand-in LPIPS features of the demo")
DEMO_VAE_TRAINING = SeedUse(
    "demo_vae_training", TRAINING, (0,), 160, "cyclex.demo.base_sd.build_demo_base_sd",
    "the demo SDs' VAE and its latent scaling factor (160 phantoms of each generator's world)")
TAILORED_SD_TRAINING = SeedUse(
    "tailored_sd_training", TRAINING, (17,), 2000, "cyclex.demo.base_sd.build_demo_tailored",
    "both demo tailored SDs (audit world), checkpoint selection on their own validation split included")
CF_THRESHOLD_CALIBRATION = SeedUse(
    "cf_threshold_calibration", TRAINING, (7_000,), 3200, "cyclex.demo.cf_thresholds.calibration_values",
    "the demo CF_Score thresholds: the first 64 phantoms with a finding, at most 50 x 64 drawn")
ANATOMICAL_PRIOR_FITTING = SeedUse(
    "anatomical_prior_fitting", TRAINING, (424_242,), 600, "cyclex.explain.anatomical_priors (FINDING_PRIORS)",
    "the anatomical prior rectangles of region-specific editing were read off these phantoms' true masks")
CAUSAL_TRAINING = SeedUse(
    "causal_training", TRAINING, (20_260,), 2000, "scripts/train_demo_causal.py",
    "the causal HVAE arms, their parent predictors and the active-learning pools (phantoms with attributes)")
DEMO_INSTRUCT_TRAINING = SeedUse(
    "demo_instruct_training", TRAINING, (7_610,), 1500, "scripts/build_demo_instruct.py",
    "the demo instruction editor (cyclex/demo/weights/instruct): exact pairs, each phantom with and without a finding")
# not shipped: the throwaway models benchmarks/audit.py trains to measure shortcut detection
AUDIT_BENCHMARK_GENERATORS_TRAINING = SeedUse(
    "audit_benchmark_generators_training", TRAINING, tuple(range(7_710, 7_719)), None, "benchmarks/audit.py",
    "the audit benchmark's shortcut and clean generators (one set seed per design, fine-tuned from demo:clean)")
AUDIT_BENCHMARK_TAILORED_TRAINING = SeedUse(
    "audit_benchmark_tailored_training", TRAINING, (7_720,), None, "benchmarks/audit.py",
    "the tailored SDs of the audit benchmark's generators (their audit worlds, fine-tuned from the clean demo SD)")

# --- validation: settings chosen, builds measured, retired benchmark sets ----------------------------------
ANATOMICAL_PRIOR_CHECK = SeedUse(
    "anatomical_prior_check", VALIDATION, (515_151,), 150, "tests/test_anatomical_priors.py",
    "the test that true finding masks lie inside their anatomical prior")
PHANTOM_CLASSIFIER_VALIDATION = SeedUse(
    "phantom_classifier_validation", VALIDATION, (1_000_003,), 300,
    "cyclex.demo.phantom_classifier.train_phantom_classifier", "the classifier's validation AUROC (metrics.json)")
DEMO_VAE_HELDOUT = SeedUse(
    "demo_vae_heldout", VALIDATION, (1_000,), 16, "cyclex.demo.base_sd.build_demo_base_sd",
    "the VAE's held-out PSNR recorded in the base SD's metadata")
TAILORED_SD_HELDOUT = SeedUse(
    "tailored_sd_heldout", VALIDATION, (4_242,), 16, "cyclex.demo.base_sd.build_demo_tailored",
    "the tailored SDs' held-out reconstruction PSNR recorded in demo_build.json")
DEMO_GUIDANCE_VALIDATION = SeedUse(
    "demo_guidance_validation", VALIDATION, (7_200,), None, "benchmarks/demo_guidance.py",
    "the sweep that chose the demo's omega (DEMO_GUIDANCE)")
CYCLE_BENCHMARK_DEVELOPMENT = SeedUse(
    "cycle_benchmark_development", VALIDATION, (7_331,), None, "retired (benchmarks/cycle.py before issue 16)",
    "the cycle benchmark's queries until issue 16: the demo's difference reference and frame settings were "
    "compared on them, so they count as validation data and are never reported again")
RSE_VALIDATION = SeedUse(
    "rse_validation", VALIDATION, (7_601,), None, "benchmarks/rse.py",
    "the sweep that chooses region-specific editing's tau and pixel paste for rse.json")
CAUSAL_VALIDATION = SeedUse(
    "causal_validation", VALIDATION, (20_261,), 200, "scripts/train_demo_causal.py",
    "which causal arm ships (validation effectiveness) and the arms' validation ELBO and predictor accuracy")
SEARCH_BENCHMARK_DEVELOPMENT = SeedUse(
    "search_benchmark_development", VALIDATION, (7_500,), None, "retired (benchmarks/search.py before stop 27)",
    "the search benchmark's queries until stop 27: 98 of their findings were seen before the chosen-arm "
    "candidates were widened, so they count as validation data and are never reported again")
SEARCH_VALIDATION = SeedUse(
    "search_validation", VALIDATION, (7_501,), None, "benchmarks/search.py --fit-validation",
    "the search's early-stop rules, measured success shares and chosen arm (search_validation.json)")

# --- queries: what benchmarks report and the demo explains ------------------------------------------------
DEMO_QUERIES = SeedUse(
    "demo_queries", QUERY, (9_001,), None, "cyclex.demo.queries.demo_query_phantoms", "what `cyclex demo` explains")
CYCLE_BENCHMARK_QUERIES = SeedUse(
    "cycle_benchmark_queries", QUERY, (7_400,), None, "benchmarks/cycle.py", "the cycle benchmark (cycle.json)")
SEARCH_BENCHMARK_QUERIES = SeedUse(
    "search_benchmark_queries", QUERY, (7_502,), None, "benchmarks/search.py",
    "the search benchmark's findings (search.json)")
GENERATORS_BENCHMARK_QUERIES = SeedUse(
    "generators_benchmark_queries", QUERY, (777, 778), None, "benchmarks/generators.py",
    "demo generator F1 and shortcut rates (generators.json)")
TAILORED_BENCHMARK_QUERIES = SeedUse(
    "tailored_benchmark_queries", QUERY, (777,), None, "benchmarks/tailored.py",
    "the tailored SDs' reconstruction PSNR (tailored.json)")
TAILORED_BENCHMARK_THROUGHPUT = SeedUse(
    "tailored_benchmark_throughput", QUERY, (99,), None, "benchmarks/tailored.py",
    "throwaway UNets trained only to time the training loop (tailored.json); nothing shipped learns from them")
RSE_BENCHMARK_QUERIES = SeedUse(
    "rse_benchmark_queries", QUERY, (7_600,), None, "benchmarks/rse.py",
    "region-specific editing against plain DDIM (rse.json)")
AUDIT_BENCHMARK_QUERIES = SeedUse(
    "audit_benchmark_queries", QUERY, (7_700,), None, "benchmarks/audit.py",
    "shortcut detection and false flags of `cyclex audit` with the two demo generators (audit.json); stop 27 "
    "compared two other evidence maps on these runs (|I - CF| and R - CF), adopting neither: a method changed "
    "because of that comparison must be reported on a fresh set")
CAUSAL_BENCHMARK_QUERIES = SeedUse(
    "causal_benchmark_queries", QUERY, (7_840,), None, "benchmarks/causal.py",
    "the causal arms' axioms and distances to the true counterfactual (causal.json); its cycle part uses "
    "cycle_benchmark_queries, the items plain DDIM is measured on")

SEED_USES: tuple[SeedUse, ...] = (
    DEMO_GENERATORS_TRAINING, PHANTOM_CLASSIFIER_TRAINING, DEMO_VAE_TRAINING, TAILORED_SD_TRAINING,
    CF_THRESHOLD_CALIBRATION, ANATOMICAL_PRIOR_FITTING, DEMO_INSTRUCT_TRAINING, AUDIT_BENCHMARK_GENERATORS_TRAINING,
    AUDIT_BENCHMARK_TAILORED_TRAINING,
    PHANTOM_CLASSIFIER_VALIDATION, ANATOMICAL_PRIOR_CHECK, DEMO_VAE_HELDOUT, TAILORED_SD_HELDOUT, DEMO_GUIDANCE_VALIDATION,
    CYCLE_BENCHMARK_DEVELOPMENT, RSE_VALIDATION, SEARCH_BENCHMARK_DEVELOPMENT, SEARCH_VALIDATION,
    DEMO_QUERIES, CYCLE_BENCHMARK_QUERIES, SEARCH_BENCHMARK_QUERIES, GENERATORS_BENCHMARK_QUERIES,
    TAILORED_BENCHMARK_QUERIES, TAILORED_BENCHMARK_THROUGHPUT, RSE_BENCHMARK_QUERIES, AUDIT_BENCHMARK_QUERIES,
    CAUSAL_TRAINING, CAUSAL_VALIDATION, CAUSAL_BENCHMARK_QUERIES,
)


def seed_use(name: str) -> SeedUse:
    """The registered use called `name`."""
    for use in SEED_USES:
        if use.name == name:
            return use
    raise KeyError(f"no seed use {name!r}; registered: {[u.name for u in SEED_USES]}")


def merge_ranges(ranges: Iterable[Sequence[int]]) -> list[Range]:
    """Sorted, merged [start, stop) ranges (touching ranges join)."""
    merged: list[Range] = []
    for start, stop in sorted((int(a), int(b)) for a, b in ranges):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], stop)
        else:
            merged.append([start, stop])
    return merged


def ranges_of(purpose: str, uses: Sequence[SeedUse] = SEED_USES) -> list[Range]:
    """Merged ranges of every use of `purpose`."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}, got {purpose!r}")
    return merge_ranges(r for use in uses if use.purpose == purpose for r in use.ranges)


def _intersection(a: Sequence[int], b: Sequence[int]) -> Range | None:
    start, stop = max(a[0], b[0]), min(a[1], b[1])
    return [start, stop] if start < stop else None


def cross_purpose_overlaps(uses: Sequence[SeedUse] = SEED_USES) -> list[tuple[str, str, Range]]:
    """(use, other use, shared range) for every pair of uses of different purposes sharing seeds."""
    found = []
    for i, first in enumerate(uses):
        for second in uses[i + 1:]:
            if first.purpose == second.purpose:
                continue
            for a in first.ranges:
                for b in second.ranges:
                    shared = _intersection(a, b)
                    if shared is not None:
                        found.append((first.name, second.name, shared))
    return found


def check_seed_registry(uses: Sequence[SeedUse] = SEED_USES) -> None:
    """Raise ValueError when names repeat or uses of different purposes share seeds."""
    names = [use.name for use in uses]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"seed registry: names used twice: {repeated}")
    overlaps = cross_purpose_overlaps(uses)
    if overlaps:
        lines = "; ".join(f"{a} and {b} share seeds [{r[0]}, {r[1]})" for a, b, r in overlaps)
        raise ValueError(f"seed registry: uses of different purposes overlap: {lines}")


def check_held_out(ranges: Iterable[Sequence[int]], what: str = "queries",
                   against: Sequence[str] = (TRAINING, VALIDATION)) -> list[Range]:
    """Raise ValueError when `ranges` share a seed with a use of a purpose in `against`; returns them merged.

    Benchmarks call it on the seeds they draw (an overridden --seed cannot land on training data);
    a validation sweep passes against=(TRAINING,).
    """
    merged = merge_ranges(ranges)
    clashes = [(use.name, shared) for use in SEED_USES if use.purpose in against
               for r in use.ranges for q in merged if (shared := _intersection(q, r)) is not None]
    if clashes:
        listed = "; ".join(f"{name} [{r[0]}, {r[1]})" for name, r in clashes)
        raise ValueError(f"{what}: phantom seeds {merged} overlap seeds used for {' or '.join(against)}: {listed}")
    return merged
