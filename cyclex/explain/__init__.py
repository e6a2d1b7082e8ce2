"""The shared counterfactual-metric and alignment core (SPEC sections 2-5).

Pure functions over tensors / arrays, classes only where a model is held:
- `faithfulness`: pixel L1 / L2 (RMSE), SSIM, PSNR, LPIPS, image encoders (CLIP), embedding distances,
  CLIP directional similarity;
- `effectiveness`: the `Classifier` protocol (torch modules, callables, torchxrayvision) and CPG;
- `scores`: FET, CF_Score, `CounterfactualScorer`, PRISM's directional filter;
- `alignment`: NCC, hit rate, pixel ROC-AUC, threshold-IoU, boundaries;
- `chest_box`: the (x0, y0, x1, y1) chest boxes every map and metric can be restricted to;
- `frames`: difference maps and seed 003's feature frames (arrays); `overlays` draws them;
- `annotations`: masks, MS-CXR boxes, REFLACX ellipses, eye-tracking heatmaps;
- `population`: CMIG, KL of mean probabilities, FID, causal axioms;
- `figures`: the seed-000 plots (PNG writers); `evaluate_run`: `cyclex evaluate RUN`.
"""

from cyclex.explain.alignment import (
    alignment_summary,
    annotation_target,
    area_under_iou_curve,
    dilated_boundary,
    hit_rate_curve,
    mask_boundary,
    mean_threshold_iou_curve,
    ncc,
    pixel_roc_auc,
    pooled_roc_curve,
    threshold_iou_curve,
    top_k_hit,
)
from cyclex.explain.annotations import (
    AnnotationSet,
    boxes_to_mask,
    ellipses_to_mask,
    load_annotation_set,
    read_box_csv,
    read_chest_box_csv,
    read_ellipse_csv,
    read_heatmap,
    read_mask_png,
)
from cyclex.explain.chest_box import crop_to_box
from cyclex.explain.effectiveness import (
    CallableClassifier,
    Classifier,
    TorchClassifier,
    XRVClassifier,
    counterfactual_probability_gain,
)
from cyclex.explain.evaluate_run import EvaluationConfig, evaluate_run
from cyclex.explain.faithfulness import (
    CLIPImageEncoder,
    ImageEncoder,
    LPIPSMetric,
    clip_directional_similarity,
    embedding_distances,
    pixel_l1,
    pixel_l2,
    psnr,
    ssim,
)
from cyclex.explain.population import (
    axiom_composition,
    axiom_effectiveness,
    axiom_reversibility,
    cmig,
    frechet_distance,
    mean_probability_kl,
)
from cyclex.explain.scores import (
    CFScoreResult,
    CFThresholds,
    CounterfactualScorer,
    cf_score,
    fet_score,
    passes_directional_filter,
)

__all__ = [
    "pixel_l1",
    "pixel_l2",
    "ssim",
    "psnr",
    "LPIPSMetric",
    "ImageEncoder",
    "CLIPImageEncoder",
    "embedding_distances",
    "clip_directional_similarity",
    "Classifier",
    "TorchClassifier",
    "CallableClassifier",
    "XRVClassifier",
    "counterfactual_probability_gain",
    "fet_score",
    "CFThresholds",
    "CFScoreResult",
    "cf_score",
    "CounterfactualScorer",
    "passes_directional_filter",
    "ncc",
    "top_k_hit",
    "hit_rate_curve",
    "pixel_roc_auc",
    "pooled_roc_curve",
    "threshold_iou_curve",
    "area_under_iou_curve",
    "mean_threshold_iou_curve",
    "mask_boundary",
    "dilated_boundary",
    "annotation_target",
    "crop_to_box",
    "alignment_summary",
    "AnnotationSet",
    "load_annotation_set",
    "read_mask_png",
    "read_box_csv",
    "boxes_to_mask",
    "read_ellipse_csv",
    "ellipses_to_mask",
    "read_chest_box_csv",
    "read_heatmap",
    "cmig",
    "mean_probability_kl",
    "frechet_distance",
    "axiom_effectiveness",
    "axiom_composition",
    "axiom_reversibility",
    "EvaluationConfig",
    "evaluate_run",
]
