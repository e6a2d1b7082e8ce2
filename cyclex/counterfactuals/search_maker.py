"""The metric-guided search as a counterfactual maker: `cyclex explain --variant nti --search`.

`SearchingMaker` wraps a `MetricGuidedSearch` (seed 000 Algorithm 1, made cheap; see
`cyclex.counterfactuals.search`) behind the one `CounterfactualMaker` interface, so the cyclic engine
calls it like any other maker and never branches on the variant. For every request it derives the
finding being removed (source prompt minus target prompt), searches (null setting x checkpoint x
strength x guidance) until a counterfactual reaches the required CF_Score and its cycle is verified,
and returns that counterfactual (or the best one found) with what the search did in `details`.

Two optional hooks connect it to the engine and the run folder (makers without them are untouched):
- `bind_cycle(generator, labeler, uncertain_as_present)`: `CyclicExplainer` passes its generator and
  labeler; the search's cycle check regenerates and relabels candidates with them;
- `start_run(run_dir)` / `finish_run(run_dir)`: `run_explainer` names its folder; every search is
  logged to RUN/search_attempts.jsonl (one line per request, resumable) and RUN/search_ablation.json
  holds seed 000's ablation tables over the whole run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from cyclex.atomic_io import write_json_atomic, write_text_atomic
from cyclex.counterfactuals.base import CounterfactualMaker, CounterfactualOutput
from cyclex.counterfactuals.inversion_cache import InversionCache, image_hash
from cyclex.counterfactuals.search import (
    DEFAULT_CHECKPOINTS,
    DEFAULT_GUIDANCES,
    DEFAULT_NULL_SETTINGS,
    DEFAULT_STRENGTHS,
    CycleCheck,
    EarlyStopRule,
    MetricGuidedSearch,
    SearchResult,
)
from cyclex.counterfactuals.search_statistics import ablation_tables
from cyclex.findings import StructuredPrompt
from cyclex.jsonl import to_json_safe

logger = logging.getLogger(__name__)

ATTEMPTS_NAME = "search_attempts.jsonl"
ABLATION_NAME = "search_ablation.json"
RANK_ATTEMPTS_GLOB = "search_attempts.rank-*.jsonl"  # RUN/shards/: each rank's log in a distributed run


def rank_attempts_path(run_dir: str | Path, rank: int) -> Path:
    """RUN/shards/search_attempts.rank-R.jsonl: the searches rank R logged (merged by rank 0)."""
    return Path(run_dir) / "shards" / f"search_attempts.rank-{int(rank)}.jsonl"


def read_attempts(path: Path) -> dict[str, dict[str, Any]]:
    """{request key: log line} of a search attempts file ({} when absent); a bad line is an error naming it."""
    lines: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return lines
    for number, text in enumerate(path.read_text().splitlines(), 1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
            lines[line["request"]] = line
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}:{number}: not a search attempts line ({err})") from err
    return lines


def generator_cycle_check(generator, labeler, uncertain_as_present: bool = True) -> CycleCheck:
    """cycle_check(images (N, 1, H, W) in [0, 1], findings) -> N bools: the regenerated report no
    longer holds the finding (not positive; nor uncertain when uncertain counts as present)."""

    def check(images: torch.Tensor, findings: Sequence[str]) -> list[bool]:
        labels = list(labeler.label(list(generator.generate(images))))
        if len(labels) != len(findings):
            raise RuntimeError(f"generator/labeler answered {len(labels)} items for {len(findings)} images")
        return [f not in lab.present(uncertain_as_present) for lab, f in zip(labels, findings, strict=True)]

    return check


def removed_finding(source_prompt: str, target_prompt: str) -> str:
    """The one finding the target prompt drops from the source prompt (`StructuredPrompt.parse`)."""
    source = StructuredPrompt.parse(source_prompt).findings
    target = set(StructuredPrompt.parse(target_prompt).findings)
    removed = [f for f in source if f not in target]
    if len(removed) != 1:
        raise ValueError(f"the search removes exactly one finding per request; {source_prompt!r} -> "
                         f"{target_prompt!r} removes {removed or 'none'}")
    return removed[0]


class SearchingMaker(CounterfactualMaker):
    """A `CounterfactualMaker` running `MetricGuidedSearch` per request.

    makers: {checkpoint name: maker with invert()/edit()} (`NullTextInversionMaker`, the fast
        inversions), one per checkpoint searched; they should share one `InversionCache`.
    scorer: a `CounterfactualScorer` (thresholds included) or a callable (factual, cf, finding) -> results;
        the caller builds it (from text specs: `cyclex.specs.scorers.search_scorer_from_specs`).
    cycle_check: explicit `cycle_check(images, findings) -> bools`; when None, the engine's generator and
        labeler provide it through `bind_cycle` (an explicit one is kept).
    null_settings / strengths / guidances / required_score / order_by_paper_shares /
        fit_null_per_guidance: the search grid, its order and acceptance (`MetricGuidedSearch`);
        checkpoints default to the keys of `makers`.
    log_path: JSONL of every search (one line per request with its attempts); `start_run` sets it to
        RUN/search_attempts.jsonl.
    """

    name = "search"
    reconstructs_with_fixed_settings = False  # settings are searched per finding: no single reconstruction

    def __init__(
        self,
        makers: Mapping[str, Any],
        scorer: Any,
        *,
        cycle_check: CycleCheck | None = None,
        null_settings: Sequence = DEFAULT_NULL_SETTINGS,
        checkpoints: Sequence[str] | None = None,
        strengths: Sequence[float] = DEFAULT_STRENGTHS,
        guidances: Sequence[float] = DEFAULT_GUIDANCES,
        required_score: int = 5,
        order_by_paper_shares: bool = True,
        log_path: str | Path | None = None,
        guidance_batch_size: int | None = None,
        fit_null_per_guidance: bool = False,
        early_stop: EarlyStopRule | Sequence[int] | None = None,
    ) -> None:
        if early_stop is not None and not isinstance(early_stop, EarlyStopRule):
            after_attempts, below_score = early_stop  # (after_attempts, below_score), as SearchGrid keeps it
            early_stop = EarlyStopRule(int(after_attempts), int(below_score))
        if not isinstance(makers, Mapping) or not makers:
            raise ValueError("SearchingMaker needs {checkpoint: maker}, at least one")
        for checkpoint, maker in makers.items():
            missing = [m for m in ("invert", "edit") if not callable(getattr(maker, m, None))]
            if missing:
                raise TypeError(f"the maker for checkpoint {checkpoint!r} ({type(maker).__name__}) cannot be searched: "
                                f"it has no {'/'.join(missing)}(); use variant nti, negative-prompt or direct")
        self.makers = dict(makers)
        self.scorer = scorer
        self._explicit_cycle_check = cycle_check
        self._cycle_check = cycle_check
        self.search = MetricGuidedSearch(
            self.makers, scorer, self._check_cycle, null_settings=null_settings,
            checkpoints=tuple(checkpoints) if checkpoints is not None else tuple(self.makers),
            strengths=strengths, guidances=guidances, required_score=required_score,
            order_by_paper_shares=order_by_paper_shares, log_path=None, guidance_batch_size=guidance_batch_size,
            fit_null_per_guidance=fit_null_per_guidance, early_stop=early_stop,
        )
        self.order_by_paper_shares = bool(order_by_paper_shares)
        self.log_path = Path(log_path) if log_path is not None else None
        self._log: dict[str, dict[str, Any]] = {}  # request key -> log line (a resumed request replaces its line)
        self.results: list[SearchResult] = []  # this process's searches, in order

    # -- construction from a tailored SD folder ------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        tailored_dir: str | Path,
        *,
        scorer: Any,
        variant: str = "nti",
        checkpoints: Sequence[str] = DEFAULT_CHECKPOINTS,
        device=None,
        dtype=None,
        cache: InversionCache | None = None,
        maker_kwargs: Mapping[str, Any] | None = None,
        **search_kwargs: Any,
    ) -> SearchingMaker:
        """One `variant` maker per checkpoint of the tailored folder (`load_tailored_pipeline`), one shared
        inversion cache; search_kwargs: null_settings, strengths, guidances, required_score, ...

        Makers fitting an inversion for one guidance (NTI's `inversion_guidance`) fit it at the
        smallest searched guidance (omega 7 carries 84 % of seed 000's successes), unless
        maker_kwargs set it.
        """
        from cyclex.counterfactuals import get_maker_factory
        from cyclex.tailored_training import load_tailored_pipeline
        from cyclex.tailored_training.output import resolve_checkpoint

        factory = get_maker_factory(variant)
        kwargs = dict(maker_kwargs or {})
        cache = cache if cache is not None else InversionCache()
        guidances = search_kwargs.get("guidances", DEFAULT_GUIDANCES)
        folder = Path(tailored_dir).resolve()
        makers, pipes = {}, {}
        for checkpoint in checkpoints:
            # names selecting the same UNet (best_l2 == best_l1 happens) share one pipeline and its inversions
            source = resolve_checkpoint(folder, checkpoint)
            unet_id = "unet" if source is None else str(Path(source).resolve())
            unet_id = unet_id.removeprefix(f"{folder}/")
            if unet_id not in pipes:
                pipes[unet_id] = load_tailored_pipeline(folder, checkpoint=checkpoint, device=device, dtype=dtype)
            maker = factory(pipes[unet_id], **kwargs)
            maker.set_checkpoint_id(f"{folder}::{unet_id}")  # caches key on the UNet, not only the folder
            if hasattr(maker, "cache"):
                maker.cache = cache
            if hasattr(maker, "inversion_guidance") and "inversion_guidance" not in kwargs and len(guidances):
                maker.inversion_guidance = float(min(guidances))
            makers[checkpoint] = maker
        return cls(makers, scorer, checkpoints=checkpoints, **search_kwargs)

    # -- hooks the engine and the run folder call --------------------------------------------------
    def bind_cycle(self, generator, labeler, uncertain_as_present: bool = True) -> None:
        """Verify candidates with the engine's generator + labeler (unless an explicit check was given)."""
        if self._explicit_cycle_check is None:
            self._cycle_check = generator_cycle_check(generator, labeler, uncertain_as_present)

    def start_run(self, run_dir: str | Path, rank: int | None = None) -> None:
        """Log into RUN/search_attempts.jsonl (rank R of a distributed run: its own
        RUN/shards/search_attempts.rank-R.jsonl), keeping the lines of an earlier (interrupted) run."""
        self.log_path = Path(run_dir) / ATTEMPTS_NAME if rank is None else rank_attempts_path(run_dir, rank)
        self._log = read_attempts(self.log_path)

    def merge_ranks(self, run_dir: str | Path) -> None:
        """Fold every rank's attempts (and those already in RUN/search_attempts.jsonl) into that file."""
        main = Path(run_dir) / ATTEMPTS_NAME
        parts = sorted((Path(run_dir) / "shards").glob(RANK_ATTEMPTS_GLOB))
        merged = read_attempts(main)
        for part in parts:
            merged.update(read_attempts(part))
        write_text_atomic(main, "".join(json.dumps(line, default=str) + "\n" for line in merged.values()))
        for part in parts:  # folded into the run's own file first, so a kill here loses nothing
            part.unlink()
        self.log_path, self._log = main, merged

    def finish_run(self, run_dir: str | Path) -> Path:
        """Write RUN/search_ablation.json (seed 000's tables over every search of the run)."""
        path = Path(run_dir) / ABLATION_NAME
        write_json_atomic(path, self.ablation())
        return path

    def ablation(self) -> dict[str, Any]:
        """`ablation_tables` over the logged searches (this run folder's, else this process's)."""
        logs = [line["attempts"] for line in self._log.values()] or [r.attempts for r in self.results]
        return {**ablation_tables(logs, self.search.required_score), "grid": self._grid()}

    def _check_cycle(self, images: torch.Tensor, findings: Sequence[str]) -> Sequence[bool]:
        if self._cycle_check is None:
            raise RuntimeError("SearchingMaker has no cycle check: pass cycle_check=... or use it inside a "
                               "CyclicExplainer (which calls bind_cycle(generator, labeler))")
        return self._cycle_check(images, findings)

    # -- settings ------------------------------------------------------------------------------
    def _grid(self) -> dict[str, Any]:
        return to_json_safe({
            "null_settings": self.search.null_settings,
            "checkpoints": self.search.checkpoints,
            "strengths": self.search.strengths,
            "guidances": self.search.guidances,
            "required_score": self.search.required_score,
            "order_by_paper_shares": self.order_by_paper_shares,
            "guidance_batch_size": self.search.guidance_batch_size,
            "fit_null_per_guidance": self.search.fit_null_per_guidance,
            # only when set, so the settings of runs made without one (and before it existed) stay the same
            **({"early_stop": [self.search.early_stop.after_attempts, self.search.early_stop.below_score]}
               if self.search.early_stop is not None else {}),
        })

    def settings(self) -> dict[str, Any]:
        first = self.makers[self.search.checkpoints[0]]
        base = dict(first.settings()) if callable(getattr(first, "settings", None)) else {}
        base_variant = base.pop("variant", type(first).__name__)
        for key in ("checkpoint", "strength", "guidance_scale", "null_setting", "inner_steps", "early_stop_eps"):
            base.pop(key, None)  # chosen per request by the search
        thresholds = getattr(self.scorer, "thresholds", None)
        return to_json_safe({
            **base,
            "variant": f"{base_variant}+search",
            "search": self._grid(),
            "thresholds": thresholds,
        })

    # -- the maker interface -------------------------------------------------------------------
    def make(
        self,
        images: torch.Tensor,
        source_prompts: Sequence[str],
        target_prompts: Sequence[str],
        *,
        masks: torch.Tensor | None = None,
        seed: int = 0,
    ) -> CounterfactualOutput:
        """One search per request; images (B, 1, H, W) in [0, 1] -> the accepted (or best) counterfactuals."""
        self.check_request(images, source_prompts, target_prompts)
        if masks is not None:
            raise ValueError("SearchingMaker does not take masks: the search scores whole-image counterfactuals")
        outputs, details = [], []
        for i in range(images.shape[0]):
            finding = removed_finding(source_prompts[i], target_prompts[i])
            result = self.search.search(images[i], source_prompts[i], target_prompts[i], finding)
            self.results.append(result)
            outputs.append(result.image.reshape(1, *images.shape[-2:]).float().clamp(0, 1))
            summary = result.summary()
            details.append(to_json_safe({
                **self.settings(),
                "seed": seed,
                "finding": finding,
                "accepted": result.accepted,
                "score": summary["score"],
                "failed": list(getattr(result.score, "failed", [])),
                "score_values": {k: float(v) for k, v in (getattr(result.score, "values", None) or {}).items()},
                "setting": result.setting,
                "n_attempts": summary["n_attempts"],
                "unet_calls": result.unet_calls,
                "unet_passes": result.unet_passes,
                "seconds": result.seconds,
            }))
            self._record(images[i], source_prompts[i], target_prompts[i], result)
        return CounterfactualOutput(images=torch.stack(outputs), details=details)

    def _record(self, image: torch.Tensor, source_prompt: str, target_prompt: str, result: SearchResult) -> None:
        if self.log_path is None:
            return
        image_sha = image_hash(image)
        key = f"{image_sha}|{source_prompt}|{result.finding}"
        self._log[key] = to_json_safe({
            "request": key, "image_sha256": image_sha, "source_prompt": source_prompt,
            "target_prompt": target_prompt, **result.summary(), "attempts": result.attempts,
        })
        text = "".join(json.dumps(line, default=str) + "\n" for line in self._log.values())
        write_text_atomic(self.log_path, text)
