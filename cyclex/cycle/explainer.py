"""The cyclic engine (SPEC section 1, CVLM, seed 003).

`CyclicExplainer(generator, labeler, maker).explain(images)` runs, for a batch of queries:
1. generate each query's report, label it, build its structured prompt;
2. for each present finding (or each finding the caller names) drop it from the prompt;
3. make every counterfactual of the batch with one maker call (findings of one image share one
   inversion; all requests go through the UNet together);
4. regenerate + relabel all counterfactuals with one generator call; the cycle is verified when the
   removed finding is no longer present; findings that appeared or vanished otherwise are recorded
   as collateral changes;
5. compute the difference maps and the feature identification frame: against the query I (default, the
   paper's definition) or, with difference_reference="reconstruction", against R, the query as the
   maker redraws it with its own prompt (one extra maker call per image), so that what the
   autoencoder / sampler cannot reproduce does not light up the maps.
The engine never branches on the maker's variant: any `CounterfactualMaker` plugs in.

Inputs: paths, PIL images, numpy arrays or tensors (`cyclex.adapters.inputs`), of any size: each
query is fitted to the tailored SD's side (`image_size`, from the folder's `sample_size`) keeping its
aspect ratio, by padding (default) or cropping (`cyclex.cycle.image_fit`); each result carries that
`ImageFit` and the original query, so maps and frames can be drawn on the image as it came.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cyclex.adapters.inputs import as_image_list
from cyclex.counterfactuals.base import CounterfactualMaker
from cyclex.cycle.image_fit import DEFAULT_FIT, ImageFit, check_fit_mode, fit_image
from cyclex.explain.frames import (
    DEFAULT_BLUR,
    DEFAULT_K,
    DEFAULT_THRESHOLD_CANDIDATES,
    FeatureFrame,
    check_kernel,
    difference_maps,
    estimate_chest_box,
    feature_frame,
    resolve_threshold,
)
from cyclex.findings import ABNORMALITIES, FindingLabels, LabelState, StructuredPrompt, canonical_finding
from cyclex.image_checks import check_image_batch

logger = logging.getLogger(__name__)

DIFFERENCE_REFERENCES = ("query", "reconstruction")


@dataclass
class CycleResult:
    """One manipulation: one finding removed from one query.

    query / counterfactual: (H, W) float32 in [0, 1]. difference: signed I - CF (H, W);
    positive: max(I - CF, 0) masked to the chest box when one is used (seed 000's map), smoothed by
    the explainer's `map_blur` kernel.
    reference: None when the maps difference against the query; with difference_reference=
    "reconstruction", R (H, W), the query redrawn by the maker with its source prompt, and then
    difference = R - CF, positive = max(R - CF, 0) and the frame come from R and CF.
    verified: the regenerated report no longer has the finding (the cycle holds).
    collateral_added / collateral_lost: other findings that appeared / disappeared.
    fit: how the query as given became `query` (pad / crop / stretch to the SD's side); original: the
    query as given (H0, W0), only when the fit changed it (None otherwise). `fit.to_original(map)` and
    `fit.frame_to_original(frame)` bring maps and frames onto it.
    """

    image_index: int
    image_id: str
    finding: str
    report_before: str
    report_after: str
    labels_before: FindingLabels
    labels_after: FindingLabels
    source_prompt: str
    target_prompt: str
    verified: bool
    collateral_added: tuple[str, ...]
    collateral_lost: tuple[str, ...]
    query: np.ndarray = field(repr=False)
    counterfactual: np.ndarray = field(repr=False)
    difference: np.ndarray = field(repr=False)
    positive: np.ndarray = field(repr=False)
    frame: FeatureFrame = field(repr=False)
    chest_box: tuple[int, int, int, int] | None = None
    maker_details: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    reference: np.ndarray | None = field(default=None, repr=False)
    fit: ImageFit | None = None
    original: np.ndarray | None = field(default=None, repr=False)

    def to_record(self) -> dict[str, Any]:
        """JSON-serialisable summary (no arrays)."""
        return {
            "image_id": self.image_id,
            "finding": self.finding,
            "report_before": self.report_before,
            "report_after": self.report_after,
            "labels_before": self.labels_before.to_dict(),
            "labels_after": self.labels_after.to_dict(),
            "source_prompt": self.source_prompt,
            "target_prompt": self.target_prompt,
            "verified": self.verified,
            "collateral_added": list(self.collateral_added),
            "collateral_lost": list(self.collateral_lost),
            "chest_box": list(self.chest_box) if self.chest_box is not None else None,
            "frame": self.frame.to_dict(),
            "difference_reference": "query" if self.reference is None else "reconstruction",
            "fit": self.fit.to_dict() if self.fit is not None else None,
            "maker": self.maker_details,
        }


def cyclic_rate(results: Sequence[CycleResult | Mapping[str, Any]]) -> dict[str, Any]:
    """Cyclic Rate = verified manipulations / manipulations (seed 003), overall and per finding.

    Accepts CycleResults or result records (dicts with "finding" and "verified").
    Returns {"cyclic_rate": float | None, "n": int, "n_verified": int, "per_finding": {finding:
    {"cyclic_rate", "n", "n_verified"}}}; rates are None when there is nothing to count.
    """
    counts: dict[str, list[int]] = {}
    for item in results:
        finding = item.finding if isinstance(item, CycleResult) else item["finding"]
        verified = item.verified if isinstance(item, CycleResult) else item["verified"]
        entry = counts.setdefault(finding, [0, 0])
        entry[0] += 1
        entry[1] += int(bool(verified))
    total = sum(n for n, _ in counts.values())
    hits = sum(v for _, v in counts.values())
    per_finding = {
        f: {"cyclic_rate": counts[f][1] / counts[f][0], "n": counts[f][0], "n_verified": counts[f][1]}
        for f in ABNORMALITIES if f in counts
    }
    return {"cyclic_rate": hits / total if total else None, "n": total, "n_verified": hits, "per_finding": per_finding}


def load_xray(path: str | Path) -> np.ndarray:
    """An X-ray file (PNG/JPEG/TIFF 8 or 16 bit, DICOM) as (H, W) float32 in [0, 1] (datasets loader)."""
    from cyclex.datasets.images import read_image

    return read_image(path)


def fit_images(images, image_size: int | None = None, resize: str = DEFAULT_FIT) -> tuple[torch.Tensor, list[ImageFit]]:
    """Queries of any accepted kind and size -> ((B, 1, S, S) float32 in [0, 1], one `ImageFit` each).

    image_size: the side S (None: as they come); resize: "pad", "crop", "stretch" or "none"
    (`cyclex.cycle.image_fit`). With "none" (or no side) every query must have the same size.
    """
    check_fit_mode(resize)
    fitted = [fit_image(item, image_size, resize) for item in as_image_list(images)]
    shapes = sorted({tuple(t.shape[-2:]) for t, _ in fitted})
    if len(shapes) > 1:
        raise ValueError(f"images of one batch differ in size {shapes[:6]}; fit them to one side: "
                         "resize='pad' or 'crop' with image_size (--resize / --image-size)")
    return check_image_batch(torch.cat([t for t, _ in fitted])), [fit for _, fit in fitted]


def images_to_batch(images, image_size: int | None = None, resize: str = "stretch") -> torch.Tensor:
    """A (B, 1, H, W) float32 tensor in [0, 1] from paths, PIL images, arrays or tensors.

    image_size: resize to this square side, by `resize` ("stretch": both sides, as before fits existed).
    """
    return fit_images(images, image_size, resize)[0]


class CyclicExplainer:
    """Explains a report generator's findings with verified counterfactuals.

    generator: a `ReportGenerator` (images (B, 1, H, W) -> reports).
    labeler: a `Labeler` (reports -> FindingLabels).
    maker: any `CounterfactualMaker`.
    uncertain_as_present: uncertain findings count as present, both in prompts and in the cycle check.
    template: structured prompt template ("cvlm" or "prism"), as the tailored SD was trained.
    frame_threshold: L on 0-255: a number, "stable" (see `cyclex.explain.frames`) or {finding: L}.
    frame_k / frame_blur: components kept / Gaussian kernel. map_blur: Gaussian kernel for the positive
    difference map (default the frame's 5; 1 keeps seed 000's raw max(I - CF, 0)). frame_normalize: stretch |I - CF| to a
    maximum of 255 before thresholding (choice, on by default: the paper's absolute L = 95 of 255 leaves
    the frame of a faint verified edit empty; off reproduces the paper's scale). estimate_chest_boxes: when no chest box
    is given, estimate one per image (Otsu) and mask the maps to it.
    difference_reference: "query" (default, the paper's I - CF) or "reconstruction": difference and
    frame against R, the query redrawn by the maker with its source prompt under the same settings and
    seed (R - CF), which isolates the prompt edit from what the VAE / sampler cannot reproduce. Needs a
    maker with `reconstructs_with_fixed_settings` (not the search, which picks settings per finding).
    image_size: the side S every query is fitted to (`from_pretrained`: the tailored SD's sample_size;
    None: queries go in as they come). resize: how ("pad" keeps the whole image, "crop" the centre,
    "stretch" changes the aspect ratio, "none" refuses queries of another size than the first's).
    """

    def __init__(
        self,
        generator,
        labeler,
        maker: CounterfactualMaker,
        *,
        uncertain_as_present: bool = True,
        template: str = "cvlm",
        frame_threshold: float | str | Mapping[str, float] = "stable",
        frame_k: int = DEFAULT_K,
        frame_blur: int = DEFAULT_BLUR,
        frame_candidates: Sequence[float] = DEFAULT_THRESHOLD_CANDIDATES,
        frame_normalize: bool = True,
        map_blur: int = DEFAULT_BLUR,
        estimate_chest_boxes: bool = False,
        seed: int = 0,
        difference_reference: str = "query",
        image_size: int | None = None,
        resize: str = DEFAULT_FIT,
    ) -> None:
        if not isinstance(maker, CounterfactualMaker):
            raise TypeError(f"maker must be a CounterfactualMaker, got {type(maker).__name__}")
        if not hasattr(generator, "generate"):
            raise TypeError(f"generator must be a ReportGenerator with .generate(images), got {type(generator).__name__}")
        if not hasattr(labeler, "label"):
            raise TypeError(f"labeler must have .label(reports), got {type(labeler).__name__}")
        StructuredPrompt((), template=template)  # validates the template name
        if difference_reference not in DIFFERENCE_REFERENCES:
            raise ValueError(f"difference_reference must be one of {', '.join(map(repr, DIFFERENCE_REFERENCES))}, "
                             f"got {difference_reference!r}")
        if difference_reference == "reconstruction" and not maker.reconstructs_with_fixed_settings:
            raise ValueError(
                f"difference_reference='reconstruction' needs a maker that uses the same settings for every "
                f"request; {type(maker).__name__} picks settings per finding, so no single reconstruction "
                f"matches its counterfactuals (use difference_reference='query')"
            )
        self.generator = generator
        self.labeler = labeler
        self.maker = maker
        self.uncertain_as_present = bool(uncertain_as_present)
        self.template = template
        self.frame_threshold = frame_threshold
        self.frame_k = int(frame_k)
        self.frame_blur = int(frame_blur)
        self.frame_candidates = tuple(float(c) for c in frame_candidates)
        self.frame_normalize = bool(frame_normalize)
        self.map_blur = check_kernel("map_blur", map_blur)
        self.estimate_chest_boxes = bool(estimate_chest_boxes)
        self.seed = int(seed)
        self.difference_reference = difference_reference
        if image_size is not None and int(image_size) < 1:
            raise ValueError(f"image_size must be a positive side in pixels or None, got {image_size}")
        self.image_size = None if image_size is None else int(image_size)
        self.resize = check_fit_mode(resize)
        # makers that verify candidates themselves (the search) use our cycle; a no-op for the others
        maker.bind_cycle(generator, labeler, self.uncertain_as_present)

    # -- construction from a tailored SD folder ---------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, tailored_dir: str | Path, *, generator, labeler=None, variant: str = "ddim",
        checkpoint: str = "best_psnr", device=None, dtype=None, explainer_kwargs: Mapping[str, Any] | None = None,
        search: bool = False, search_kwargs: Mapping[str, Any] | None = None, scorer=None,
        **maker_kwargs,
    ) -> CyclicExplainer:
        """Load the tailored SD (contract C4) and its metadata, build the `variant` maker.

        labeler None: the offline `RuleLabeler`. maker_kwargs go to the variant's factory
        (DDIM: num_inference_steps, guidance_scale, strength).
        search: wrap `variant` makers (one per search checkpoint, default best_l2 and best_l1; `checkpoint`
        is then unused) in a `SearchingMaker` (seed 000 Algorithm 1, made cheap). search_kwargs:
        checkpoints, null_settings, strengths, guidances, required_score, order_by_paper_shares.
        scorer: the search's `CounterfactualScorer` (thresholds included), required with search=True;
        from text specs: `cyclex.specs.scorers.search_scorer_from_specs`.
        """
        from cyclex.counterfactuals import get_maker_factory
        from cyclex.tailored_training import load_tailored_pipeline, read_tailored_metadata

        metadata = read_tailored_metadata(tailored_dir)
        if search:
            from cyclex.counterfactuals.search_maker import SearchingMaker

            if scorer is None:
                raise ValueError("search=True needs scorer=: the CounterfactualScorer (with its CF_Score thresholds) "
                                 "that accepts the searched counterfactuals; build one from text specs with "
                                 "cyclex.specs.scorers.search_scorer_from_specs(classifier, encoder, lpips, "
                                 "thresholds)")
            maker = SearchingMaker.from_pretrained(
                tailored_dir, scorer=scorer,
                variant=variant, device=device, dtype=dtype, maker_kwargs=maker_kwargs, **dict(search_kwargs or {}),
            )
        else:
            if search_kwargs or scorer is not None:
                raise ValueError("search_kwargs / scorer are settings of the search; pass search=True")
            pipe = load_tailored_pipeline(tailored_dir, checkpoint=checkpoint, device=device, dtype=dtype)
            maker = get_maker_factory(variant)(pipe, **maker_kwargs)
            # the pipeline's path names the folder, not which UNet was loaded: caches key on both
            maker.set_checkpoint_id(f"{Path(tailored_dir).resolve()}::{checkpoint}")
        if labeler is None:
            from cyclex.labelers import RuleLabeler

            labeler = RuleLabeler()
        kwargs = {
            "template": metadata.get("prompt_template", "cvlm"),
            "uncertain_as_present": bool(metadata.get("uncertain_as_present", True)),
            **dict(explainer_kwargs or {}),
        }
        if kwargs.get("image_size") is None:  # queries are fitted to the side the tailored SD was trained at
            kwargs["image_size"] = int(metadata["sample_size"])
        return cls(generator, labeler, maker, **kwargs)

    def settings(self) -> dict[str, Any]:
        threshold = self.frame_threshold
        if isinstance(threshold, Mapping):
            threshold = {str(k): float(v) for k, v in threshold.items()}
        return {
            **self.maker.settings(),
            "uncertain_as_present": self.uncertain_as_present,
            "template": self.template,
            "frame_threshold": threshold,
            "frame_k": self.frame_k,
            "frame_blur": self.frame_blur,
            "frame_candidates": list(self.frame_candidates),
            "frame_normalize": self.frame_normalize,
            "map_blur": self.map_blur,
            "estimate_chest_boxes": self.estimate_chest_boxes,
            "seed": self.seed,
            "difference_reference": self.difference_reference,
            "image_size": self.image_size,
            "resize": self.resize,
        }

    # -- the cycle -------------------------------------------------------------------------------
    def present(self, labels: FindingLabels) -> tuple[str, ...]:
        return labels.present(uncertain_as_present=self.uncertain_as_present)

    def _plan(self, labels: Sequence[FindingLabels], findings) -> list[tuple[int, str]]:
        """(image index, finding) pairs to remove: present findings, restricted to `findings`."""
        per_image: list[Sequence[str] | None]
        if findings is None:
            per_image = [None] * len(labels)
        elif isinstance(findings, str):
            raise TypeError("findings must be a list of finding names (or one list per image), not a string")
        elif findings and not isinstance(findings[0], str):
            if len(findings) != len(labels):
                raise ValueError(f"findings has {len(findings)} lists for {len(labels)} images")
            per_image = list(findings)
        else:
            per_image = [findings] * len(labels)
        plan = []
        for i, (item, wanted) in enumerate(zip(labels, per_image, strict=True)):
            present = self.present(item)
            if wanted is None:
                chosen = present
            else:
                names = {canonical_finding(n) for n in wanted}
                chosen = tuple(f for f in present if f in names)
                absent = sorted(names - set(present))
                if absent:
                    logger.debug("image %d: %s not in the generated report; nothing to remove", i, ", ".join(absent))
            plan.extend((i, f) for f in chosen)
        return plan

    def is_removed(self, labels_after: FindingLabels, finding: str) -> bool:
        """The cycle holds when the finding is not positive (nor uncertain, if that counts as present)."""
        state = labels_after[finding]
        if state is LabelState.POSITIVE:
            return False
        return not (self.uncertain_as_present and state is LabelState.UNCERTAIN)

    @torch.no_grad()
    def explain(
        self,
        images,
        findings: Sequence[str] | Sequence[Sequence[str]] | None = None,
        chest_boxes: Sequence[Sequence[int] | None] | None = None,
        image_ids: Sequence[str] | None = None,
        image_size: int | None = None,
    ) -> list[CycleResult]:
        """B queries -> one CycleResult per removed finding.

        images: paths, PIL images, numpy arrays, (B, 1, H, W) tensors in [0, 1] or a list of them
        (`cyclex.adapters.inputs`), any size: each is fitted to `image_size` (default: the
        explainer's, the tailored SD's side) by the explainer's `resize` rule.
        findings: None = every present finding; a list = those names (where present) for every
        image; a list of lists = per image. chest_boxes: (x0, y0, x1, y1) or None per image, in the
        pixels of the query as given (results record them on the fitted S x S image).
        """
        timings: dict[str, float] = {}
        # 1. Fit the queries to the SD's side; generate, label, prompt
        tick = time.perf_counter()
        originals = as_image_list(images)
        side = image_size if image_size is not None else self.image_size
        batch, fits = fit_images(originals, side, self.resize)
        b = batch.shape[0]
        ids = [str(x) for x in image_ids] if image_ids is not None else [str(i) for i in range(b)]
        if len(ids) != b:
            raise ValueError(f"image_ids has {len(ids)} entries for {b} images")
        if chest_boxes is not None and len(chest_boxes) != b:
            raise ValueError(f"chest_boxes has {len(chest_boxes)} entries for {b} images")
        reports_before = list(self.generator.generate(batch))
        labels_before = list(self.labeler.label(reports_before))
        if len(reports_before) != b or len(labels_before) != b:
            raise RuntimeError(f"generator/labeler answered {len(reports_before)}/{len(labels_before)} items for {b} images")
        prompts = [StructuredPrompt.from_labels(lab, uncertain_as_present=self.uncertain_as_present,
                                                template=self.template) for lab in labels_before]
        timings["generate_before"] = time.perf_counter() - tick
        # 2. Remove each finding from its prompt
        plan = self._plan(labels_before, findings)
        if not plan:
            return []
        rows = [i for i, _ in plan]
        sources = [prompts[i].text for i in rows]
        targets = [prompts[i].remove(f).text for i, f in plan]
        # 3. All counterfactuals of the batch in one maker call
        tick = time.perf_counter()
        made = self.maker.make(batch[rows], sources, targets, seed=self.seed)
        counterfactuals = made.images.float().clamp(0, 1)
        if counterfactuals.shape != batch[rows].shape:
            raise RuntimeError(f"maker returned images {tuple(counterfactuals.shape)}, expected {tuple(batch[rows].shape)}")
        timings["counterfactuals"] = time.perf_counter() - tick
        # 4. Close the cycle: regenerate and relabel in one call
        tick = time.perf_counter()
        reports_after = list(self.generator.generate(counterfactuals))
        labels_after = list(self.labeler.label(reports_after))
        timings["generate_after"] = time.perf_counter() - tick
        # 4b. The reference the maps difference against: the query, or its reconstruction (one per image)
        references: dict[int, np.ndarray] = {}
        if self.difference_reference == "reconstruction":
            tick = time.perf_counter()
            unique = list(dict.fromkeys(rows))
            redrawn = self.maker.reconstruct(batch[unique], [prompts[i].text for i in unique], seed=self.seed)
            redrawn = redrawn.float().clamp(0, 1)
            if redrawn.shape != batch[unique].shape:
                raise RuntimeError(f"maker reconstructed images {tuple(redrawn.shape)}, "
                                   f"expected {tuple(batch[unique].shape)}")
            references = {i: redrawn[n, 0].cpu().numpy() for n, i in enumerate(unique)}
            timings["reconstructions"] = time.perf_counter() - tick
        # 5. Difference maps and frames
        tick = time.perf_counter()
        results = []
        for j, (i, finding) in enumerate(plan):
            query = batch[i, 0].cpu().numpy()
            cf = counterfactuals[j, 0].cpu().numpy()
            box = None
            if chest_boxes is not None and chest_boxes[i] is not None:
                box = fits[i].box_to_fitted(chest_boxes[i])
            elif self.estimate_chest_boxes:
                box = estimate_chest_box(query)
            reference = references.get(i)
            base = query if reference is None else reference
            _, signed, positive = difference_maps(base, cf, chest_box=box, positive_blur=self.map_blur)
            level = resolve_threshold(self.frame_threshold, finding, base, cf, k=self.frame_k, blur=self.frame_blur,
                                      chest_box=box, candidates=self.frame_candidates, normalize=self.frame_normalize)
            frame = feature_frame(base, cf, threshold=level, k=self.frame_k, blur=self.frame_blur, chest_box=box,
                                  normalize=self.frame_normalize)
            before, after = set(self.present(labels_before[i])), set(self.present(labels_after[j]))
            details = dict(made.details[j]) if j < len(made.details) else {}
            results.append(CycleResult(
                image_index=i, image_id=ids[i], finding=finding,
                report_before=reports_before[i], report_after=reports_after[j],
                labels_before=labels_before[i], labels_after=labels_after[j],
                source_prompt=sources[j], target_prompt=targets[j],
                verified=self.is_removed(labels_after[j], finding),
                collateral_added=tuple(f for f in ABNORMALITIES if f in after - before),
                collateral_lost=tuple(f for f in ABNORMALITIES if f in before - after - {finding}),
                query=query, counterfactual=cf, difference=signed, positive=positive, frame=frame,
                chest_box=box, maker_details=details,
                extras={k: v[j].detach().cpu().numpy() for k, v in made.extras.items()},
                reference=reference, fit=fits[i],
                original=None if fits[i].identity else originals[i][0, 0].numpy(),
            ))
        timings["frames"] = time.perf_counter() - tick
        share = {k: round(v / len(plan), 4) for k, v in timings.items()}
        for result in results:
            result.maker_details.setdefault("seconds_per_item", share)
        return results

