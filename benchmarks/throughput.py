"""Explain throughput on the demo world (issue 23): the batched engine vs a naive per-item loop.

    python -m benchmarks.throughput [--images 4] [--steps 50] [--threads 1 2] [--out benchmarks/results/throughput.json]

One process measures, at each torch thread count, the same `CyclicExplainer` (the clean demo
generator, its tailored SD, the demo's DDIM maker: checkpoint "final", omega 1.0, strength 1.0, as
`cyclex demo`) on the same held-out demo query phantoms (the seed registry's DEMO_QUERIES):
- batched: one `explain` call on all images (one generator call before, every counterfactual of the
  batch in one maker call, one generator call after);
- naive: one `explain` call per (image, finding) item, the way a per-item loop over the same maker
  would run (the report before is regenerated for every finding of an image).
Items per second are counted both as images and as counterfactuals; `batched_vs_naive` is the ratio
of the two wall times at each thread count. Each arm starts with an empty inversion cache, and one
warm-up item runs before the timed arms. Every run starts fresh and replaces the results file;
provenance (versions, commit, date, load average before and after) is written beside the figures,
because on a shared CPU the load changes what a second is worth.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from cyclex.atomic_io import write_text_atomic

logger = logging.getLogger("benchmarks.throughput")

RESULTS = Path(__file__).parent / "results" / "throughput.json"


def demo_explainer(steps: int):
    """The demo's explainer for the clean generator (as `cyclex demo` builds it through run_explain)."""
    from cyclex.cycle.explainer import CyclicExplainer
    from cyclex.demo.cache import demo_cache_dir
    from cyclex.demo.packaged import install_packaged_assets
    from cyclex.demo.run_demo import DEMO_CHECKPOINT, DEMO_GUIDANCE, DEMO_STRENGTH
    from cyclex.specs.generators import load_generator

    install_packaged_assets()
    tailored = demo_cache_dir() / "tailored" / "clean"
    generator = load_generator("demo:clean")
    explainer = CyclicExplainer.from_pretrained(
        tailored, generator=generator, variant="ddim", checkpoint=DEMO_CHECKPOINT, num_inference_steps=steps,
        guidance_scale=DEMO_GUIDANCE, strength=DEMO_STRENGTH)
    settings = {"generator": "demo:clean", "tailored": str(tailored), "variant": "ddim", "checkpoint": DEMO_CHECKPOINT,
                "guidance": DEMO_GUIDANCE, "strength": DEMO_STRENGTH, "steps": steps}
    return explainer, settings


def query_images(n: int) -> tuple[torch.Tensor, list[list[int]]]:
    """(n, 1, H, W) demo query phantoms and the seed ranges they come from (checked held out)."""
    from cyclex.datasets.seed_registry import DEMO_QUERIES, check_held_out
    from cyclex.demo.queries import demo_query_phantoms

    phantoms = demo_query_phantoms(n)
    images = torch.stack([torch.from_numpy(p.image).float()[None] for p in phantoms])
    return images, check_held_out(DEMO_QUERIES.drawn(n), "throughput queries")


def clear_caches(explainer) -> None:
    clear = getattr(explainer.maker, "clear_cache", None)
    if callable(clear):
        clear()


def batched(explainer, images: torch.Tensor) -> int:
    """All images in one explain call; returns the number of counterfactuals made."""
    return len(explainer.explain(images))


def naive(explainer, images: torch.Tensor, findings_per_image: list[list[str]]) -> int:
    """One explain call per (image, finding); returns the number of counterfactuals made."""
    made = 0
    for i, findings in enumerate(findings_per_image):
        for finding in findings:
            made += len(explainer.explain(images[i:i + 1], findings=[finding]))
    return made


def present_findings(explainer, images: torch.Tensor) -> list[list[str]]:
    reports = explainer.generator.generate(images)
    return [list(explainer.present(labels)) for labels in explainer.labeler.label(list(reports))]


def measure(explainer, images: torch.Tensor, threads: list[int]) -> dict[str, Any]:
    findings = present_findings(explainer, images)
    n_items = sum(len(f) for f in findings)
    if n_items == 0:
        raise RuntimeError("the demo generator reports no finding on these queries; nothing to explain")
    first = next(i for i, f in enumerate(findings) if f)
    clear_caches(explainer)
    explainer.explain(images[first:first + 1], findings=[findings[first][0]])  # warm-up
    out: dict[str, Any] = {"n_images": int(images.shape[0]), "n_counterfactuals": n_items, "by_threads": {}}
    for n_threads in threads:
        torch.set_num_threads(int(n_threads))
        row: dict[str, Any] = {}
        for arm, run in (("batched", lambda: batched(explainer, images)),
                         ("naive", lambda: naive(explainer, images, findings))):
            clear_caches(explainer)
            start = time.perf_counter()
            made = run()
            seconds = time.perf_counter() - start
            if made != n_items:
                raise RuntimeError(f"{arm} made {made} counterfactuals, expected {n_items}")
            row[arm] = {"seconds": seconds, "images_per_second": images.shape[0] / seconds,
                        "counterfactuals_per_second": n_items / seconds}
            logger.info("threads %d, %s: %.1f s", n_threads, arm, seconds)
        row["batched_vs_naive"] = row["naive"]["seconds"] / row["batched"]["seconds"]
        out["by_threads"][str(n_threads)] = row
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (the demo's 50)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.images < 1 or any(t < 1 for t in args.threads):
        parser.error("--images and --threads must be positive")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from cyclex.provenance import environment

    started = environment("cpu")
    load_before = os.getloadavg()
    explainer, settings = demo_explainer(args.steps)
    images, seeds = query_images(args.images)
    with torch.no_grad():
        figures = measure(explainer, images, args.threads)
    document = {
        "benchmark": "throughput",
        "world": "demo (clean generator)",
        "settings": settings,
        "query_seeds": seeds,
        "what": "explain = report before, counterfactuals, report after, difference maps and frames; batched: one "
                "explain call on all images; naive: one explain call per (image, finding)",
        **figures,
        "provenance": {**started, "cpu_count": os.cpu_count(), "load_average_before": list(load_before),
                       "load_average_after": list(os.getloadavg()),
                       "note": "shared CPU: other processes ran beside this one (load averages above)"},
    }
    write_text_atomic(args.out, json.dumps(document, indent=2))
    logger.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
