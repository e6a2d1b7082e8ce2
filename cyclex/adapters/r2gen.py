"""R2Gen and R2GenCMN, loaded from the user's own checkout of the official code.

Expected layout (the official repositories, cuhksz-nlp/R2Gen and zhjohnchan/R2GenCMN)::

    REPO/
      main.py                 R2Gen: parse_agrs() with the argparse defaults (never imported:
                              it imports the pycocoevalcap metrics, which need Java)
      main_train.py           R2GenCMN: same, also main_test.py
      models/r2gen.py         R2Gen:    class R2GenModel(args, tokenizer)
      models/models.py        R2GenCMN: class BaseCMNModel(args, tokenizer)  (uses modules/base_cmn.py)
      modules/tokenizers.py   class Tokenizer(args): reads args.ann_path; vocabulary = words of the
                              'train' split reports with frequency >= args.threshold
      modules/visual_extractor.py  torchvision backbone, built with args.visual_extractor_pretrained

plus `annotation.json` ({"train": [{"id", "report", "image_path": [...]}, ...], "val": ..., "test": ...})
and a checkpoint written by the repo's trainer: `torch.save({"state_dict": ..., ...})`.

What the adapter does, and why:

* args: the repo's own argparse defaults, read by parsing the `add_argument` calls of its main script
  with `ast` (falls back to the documented official defaults below), then `ann_path`, `dataset_name`
  (inferred from the annotation: two image paths per study = iu_xray) and the user's overrides.
* `visual_extractor_pretrained` is forced to False in the namespace: it is `type=bool` in argparse
  (so "False" parses as True) and True would make torchvision download ImageNet weights that the
  checkpoint overwrites anyway.
* the repo goes on `sys.path` only while importing, and its top-level packages (`models`, `modules`)
  are removed from `sys.modules` afterwards, so R2Gen and R2GenCMN (same package names) coexist.
* the checkpoint is read with `torch.load(..., weights_only=True)["state_dict"]`; its vocabulary
  size (rows of `encoder_decoder.logit.weight`) is compared with the tokenizer's: a checkpoint
  trained with another `--threshold` is loaded with the threshold that reproduces its size from the
  annotation file (a warning says which), or, when `threshold=` was given, refused with the exact
  `threshold=` to pass.
* images: (B, 1, H, W) in [0, 1] -> RGB, 224 x 224, ImageNet mean/std, as the repo's test
  transform (Resize((224, 224)), ToTensor, Normalize); iu_xray gets (B, 2, 3, 224, 224), a single
  view being repeated.
* generation: `model(images, mode='sample')` (R2GenCMN returns `(ids, probs)`), then
  `model.tokenizer.decode_batch(ids.cpu().numpy())`. The beam search calls `.cuda()` on new
  tensors; during generation only, `torch.Tensor.cuda` moves tensors to the model's device instead,
  so the model runs on CPU (the patch is process-wide while it lasts: do not generate from two
  threads at once).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import json
import logging
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cyclex.adapters.base import GeneratorError, GeneratorInfo
from cyclex.adapters.callable import generate_in_batches

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_SIZE = (224, 224)

# The model-relevant defaults of the official main scripts (R2Gen main.py, R2GenCMN main_train.py),
# used only when the repo's main script cannot be found or parsed.
_COMMON_DEFAULTS: dict[str, Any] = {
    "image_dir": "data/iu_xray/images/", "ann_path": "data/iu_xray/annotation.json",
    "dataset_name": "iu_xray", "max_seq_length": 60, "threshold": 3, "num_workers": 2, "batch_size": 16,
    "visual_extractor": "resnet101", "visual_extractor_pretrained": True,
    "d_model": 512, "d_ff": 512, "d_vf": 2048, "num_heads": 8, "num_layers": 3, "dropout": 0.1,
    "logit_layers": 1, "bos_idx": 0, "eos_idx": 0, "pad_idx": 0, "use_bn": 0, "drop_prob_lm": 0.5,
    "sample_method": "beam_search", "beam_size": 3, "temperature": 1.0, "sample_n": 1, "group_size": 1,
    "output_logsoftmax": 1, "decoding_constraint": 0, "block_trigrams": 1, "n_gpu": 1, "seed": 9233,
}
R2GEN_DEFAULTS: dict[str, Any] = {**_COMMON_DEFAULTS, "rm_num_slots": 3, "rm_num_heads": 8, "rm_d_model": 512}
R2GENCMN_DEFAULTS: dict[str, Any] = {**_COMMON_DEFAULTS, "topk": 32, "cmm_size": 2048, "cmm_dim": 512}


@dataclass(frozen=True)
class R2GenFamily:
    """Where one official repository keeps its parts."""

    spec_prefix: str
    model_module: str
    model_class: str
    main_scripts: tuple[str, ...]
    fallback_defaults: Mapping[str, Any]


R2GEN = R2GenFamily("r2gen", "models.r2gen", "R2GenModel", ("main.py", "main_train.py", "main_test.py"),
                    R2GEN_DEFAULTS)
R2GENCMN = R2GenFamily("r2gencmn", "models.models", "BaseCMNModel", ("main_train.py", "main_test.py", "main.py"),
                       R2GENCMN_DEFAULTS)


# ---------------------------------------------------------------------- argparse defaults without importing
def _literal(node: ast.AST | None) -> Any:
    if node is None:
        return None
    try:
        return ast.literal_eval(node)
    except ValueError:
        return None


_TYPE_NAMES = {"int": int, "float": float, "str": str, "bool": bool}


def read_argparse_defaults(script: str | Path) -> tuple[dict[str, Any], dict[str, type]]:
    """Parse `parser.add_argument(...)` calls of a script with `ast`; the script is never run.

    Returns (defaults by dest, types by dest). Options without `default` get None (argparse's
    default), `store_true` gets False, `store_false` True.
    """
    tree = ast.parse(Path(script).read_text(encoding="utf-8"), filename=str(script))
    defaults: dict[str, Any] = {}
    types: dict[str, type] = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "add_argument"):
            continue
        flags = [_literal(arg) for arg in node.args]
        keywords = {kw.arg: kw.value for kw in node.keywords if kw.arg}
        dest = _literal(keywords.get("dest"))
        if dest is None:
            long_flags = [f for f in flags if isinstance(f, str) and f.startswith("--")]
            names = long_flags or [f for f in flags if isinstance(f, str)]
            if not names:
                continue
            dest = names[0].lstrip("-").replace("-", "_")
        action = _literal(keywords.get("action"))
        if action == "store_true":
            defaults[dest], types[dest] = False, bool
            continue
        if action == "store_false":
            defaults[dest], types[dest] = True, bool
            continue
        defaults[dest] = _literal(keywords.get("default"))
        type_node = keywords.get("type")
        if isinstance(type_node, ast.Name) and type_node.id in _TYPE_NAMES:
            types[dest] = _TYPE_NAMES[type_node.id]
    return defaults, types


def _convert_override(key: str, value: Any, expected: type | None) -> Any:
    """Convert string overrides ("3", "false") to the option's type; bools are parsed by meaning."""
    if not isinstance(value, str) or expected in (None, str):
        return value
    if expected is bool:
        lowered = value.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"override {key}={value!r}: expected a boolean (true/false)")
    try:
        return expected(value)
    except ValueError:
        raise ValueError(f"override {key}={value!r}: expected {expected.__name__}") from None


def infer_dataset_name(ann_path: str | Path) -> str:
    """iu_xray studies list two image paths, mimic_cxr studies one (R2Gen's annotation.json)."""
    annotation = read_annotation(ann_path)
    for split in ("train", "val", "test"):
        for example in annotation.get(split, []):
            paths = example.get("image_path") if isinstance(example, Mapping) else None
            if isinstance(paths, list):
                return "iu_xray" if len(paths) >= 2 else "mimic_cxr"
    raise ValueError(f"{ann_path}: cannot infer the dataset (no entry with an 'image_path' list); "
                     "pass dataset_name=iu_xray or dataset_name=mimic_cxr")


def read_annotation(ann_path: str | Path) -> dict:
    path = Path(ann_path)
    if not path.is_file():
        raise FileNotFoundError(f"R2Gen annotation file not found: {path}")
    try:
        annotation = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a valid R2Gen annotation.json ({error})") from error
    if not isinstance(annotation, dict) or not isinstance(annotation.get("train"), list):
        raise ValueError(f"{path}: expected a JSON object with a 'train' list of {{'report': ...}} entries")
    return annotation


def build_args(repo: Path, family: R2GenFamily, ann_path: Path,
               overrides: Mapping[str, Any] | None = None) -> argparse.Namespace:
    """The repo's argparse defaults + ann_path + dataset_name + overrides, pretrained forced False."""
    defaults: dict[str, Any] | None = None
    types: dict[str, type] = {}
    for script_name in family.main_scripts:
        script = repo / script_name
        if script.is_file():
            try:
                defaults, types = read_argparse_defaults(script)
            except SyntaxError as error:
                logger.warning("cannot parse %s (%s); using the documented official defaults", script, error)
                continue
            if defaults:
                logger.debug("read %d argparse defaults from %s", len(defaults), script)
                break
    if not defaults:
        logger.warning("no argparse defaults found in %s (%s); using the documented official defaults",
                       repo, ", ".join(family.main_scripts))
        defaults = dict(family.fallback_defaults)
        types = {key: type(value) for key, value in defaults.items() if value is not None}
    values = dict(defaults)
    values["ann_path"] = str(ann_path)
    overrides = dict(overrides or {})
    values["dataset_name"] = overrides.pop("dataset_name", None) or infer_dataset_name(ann_path)
    if values["dataset_name"] not in ("iu_xray", "mimic_cxr"):
        logger.warning("dataset_name %r is neither iu_xray nor mimic_cxr: the model will take one view",
                       values["dataset_name"])
    for key, value in overrides.items():
        if key not in values:
            logger.warning("override %s is not an option of %s's main script; setting it anyway", key, repo)
        values[key] = _convert_override(key, value, types.get(key))
    if values.get("visual_extractor_pretrained"):
        logger.info("visual_extractor_pretrained set to False: the checkpoint holds the backbone weights")
    values["visual_extractor_pretrained"] = False
    return argparse.Namespace(**values)


# ---------------------------------------------------------------------- isolated import of the repo
def _top_level_names(repo: Path) -> set[str]:
    names = {p.name for p in repo.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))}
    names |= {p.stem for p in repo.glob("*.py")}
    return names


@contextlib.contextmanager
def isolated_repo_import(repo: str | Path) -> Iterator[None]:
    """Import from `repo` (put first on sys.path) without leaking its top-level modules.

    Modules of the same names already loaded (another checkout's `models`, `modules`) are set aside
    during the import and restored afterwards; the repo's own modules are removed from sys.modules
    once imported (the classes keep their module globals, so they keep working).
    """
    repo = Path(repo).resolve()
    names = _top_level_names(repo)

    def owned(module_name: str) -> bool:
        return module_name.split(".")[0] in names

    set_aside = {key: sys.modules.pop(key) for key in list(sys.modules) if owned(key)}
    sys.path.insert(0, str(repo))
    importlib.invalidate_caches()
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(str(repo))
        for key in [key for key in list(sys.modules) if owned(key)]:
            del sys.modules[key]
        sys.modules.update(set_aside)
        importlib.invalidate_caches()


@contextlib.contextmanager
def tensor_cuda_calls_to(device: torch.device) -> Iterator[None]:
    """While active, `tensor.cuda(...)` returns `tensor.to(device)` (the official beam search
    creates helper tensors with `.cuda()`); the original method is restored on exit."""
    original = torch.Tensor.cuda

    def to_model_device(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.to(device, non_blocking=bool(kwargs.get("non_blocking", False)))

    torch.Tensor.cuda = to_model_device
    try:
        yield
    finally:
        torch.Tensor.cuda = original


# ---------------------------------------------------------------------- the generator
def imagenet_views(images: torch.Tensor, views: int) -> torch.Tensor:
    """(B, 1, H, W) or (B, V, 1, H, W) in [0, 1] -> (B, 3, 224, 224) (views == 1) or (B, views, 3, 224, 224).

    A single view is repeated to fill `views`; bilinear antialiased resize, ImageNet mean/std.
    """
    if images.ndim == 4:
        images = images[:, None]
    batch, given = images.shape[:2]
    if views == 1:
        images = images[:, :1]
    elif given == 1:
        images = images.expand(-1, views, -1, -1, -1)
    elif given != views:
        raise ValueError(f"the model takes {views} views per study, got {given}")
    flat = images.reshape(-1, 1, *images.shape[-2:])
    flat = F.interpolate(flat, size=INPUT_SIZE, mode="bilinear", align_corners=False, antialias=True)
    flat = flat.clamp(0, 1).expand(-1, 3, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN, dtype=flat.dtype, device=flat.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=flat.dtype, device=flat.device).view(1, 3, 1, 1)
    flat = (flat - mean) / std
    out = flat.reshape(batch, -1, 3, *INPUT_SIZE)
    return out[:, 0] if views == 1 else out


class R2GenGenerator:
    """R2Gen (Chen et al. 2020) from a checkout of cuhksz-nlp/R2Gen; see the module docstring.

    repo: path of the checkout; checkpoint: a `model_best.pth` written by its trainer;
    ann_path: its `annotation.json` (the tokenizer is rebuilt from it exactly as the repo does);
    overrides: argparse options to change (dataset_name, max_seq_length, beam_size, threshold, ...),
    strings are converted to the option's type.
    """

    family: R2GenFamily = R2GEN

    def __init__(self, repo: str | Path, checkpoint: str | Path, ann_path: str | Path, *,
                 overrides: Mapping[str, Any] | None = None, device: str | torch.device | None = None,
                 batch_size: int = 16):
        self.repo = Path(repo).expanduser().resolve()
        self.checkpoint = Path(checkpoint).expanduser()
        self.ann_path = Path(ann_path).expanduser()
        name = f"{self.family.spec_prefix}:{self.repo}::{self.checkpoint}::{self.ann_path}"
        for label, path, is_dir in (("repository", self.repo, True), ("checkpoint", self.checkpoint, False)):
            if not (path.is_dir() if is_dir else path.is_file()):
                raise FileNotFoundError(f"{self.family.spec_prefix} {label} not found: {path}")
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = batch_size
        self.args = build_args(self.repo, self.family, self.ann_path, overrides)
        self.views = 2 if self.args.dataset_name == "iu_xray" else 1

        # 1. Import the repo's tokenizer and model classes without leaking its packages
        module_path = self.repo / (self.family.model_module.replace(".", "/") + ".py")
        if not module_path.is_file():
            raise FileNotFoundError(f"{self.repo} does not look like {self.family.spec_prefix}: "
                                    f"missing {module_path.relative_to(self.repo)}")
        with isolated_repo_import(self.repo):
            tokenizer_cls = importlib.import_module("modules.tokenizers").Tokenizer
            model_cls = getattr(importlib.import_module(self.family.model_module), self.family.model_class)
            # 2. Tokenizer from the annotation, model from args (inside: lazy imports may still run)
            self.tokenizer = tokenizer_cls(self.args)
            model = model_cls(self.args, self.tokenizer)
            # 3. Weights; a checkpoint trained with another vocabulary threshold names the one it needs
            state_dict = load_state_dict(self.checkpoint)
            threshold = self._threshold_for(model, state_dict, explicit="threshold" in dict(overrides or {}))
            if threshold is not None:
                self.args.threshold = threshold
                self.tokenizer = tokenizer_cls(self.args)
                model = model_cls(self.args, self.tokenizer)
        try:
            model.load_state_dict(state_dict)
        except RuntimeError as error:
            raise GeneratorError(f"checkpoint {self.checkpoint} does not fit {self.family.model_class} built "
                                 f"with these args (vocabulary from {self.ann_path}, threshold "
                                 f"{self.args.threshold}): {error}") from error
        self.model = model.to(self.device).eval()
        self.info = GeneratorInfo(name=name, input_size=INPUT_SIZE, channels=3, mean=IMAGENET_MEAN,
                                  std=IMAGENET_STD, views_per_study=self.views)

    def _threshold_for(self, model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *,
                       explicit: bool) -> int | None:
        """The vocabulary threshold the checkpoint was trained with, when it is not the current one.

        Returns None when the checkpoint's vocabulary size matches; the threshold that reproduces it
        from the annotation file when the user did not set one (with a warning); raises GeneratorError
        naming the exact `threshold=` to pass (or saying none reproduces it) otherwise.
        """
        current = len(self.tokenizer.idx2token)
        trained, where = checkpoint_vocabulary_size(model.state_dict(), state_dict, current)
        if trained is None or trained == current:
            return None
        sizes = vocabulary_sizes(self.tokenizer)
        matching = [t for t, size in sizes.items() if size == trained]
        spec = f"{self.family.spec_prefix}:{self.repo}::{self.checkpoint}::{self.ann_path}"
        told = (f"checkpoint {self.checkpoint} was trained with a vocabulary of {trained} tokens ({where}), but "
                f"threshold={self.args.threshold} on {self.ann_path} gives {current}")
        if not matching:
            known = ", ".join(f"threshold={t}: {n}" for t, n in list(sizes.items())[:8])
            raise GeneratorError(f"{told}, and no threshold reproduces {trained} from this annotation file ({known}); "
                                 "pass the annotation.json the model was trained on")
        if explicit:
            raise GeneratorError(f"{told}; threshold={matching[0]} reproduces it: pass {spec}::threshold={matching[0]}")
        logger.warning("%s; using threshold=%d, which reproduces it (add ::threshold=%d to the spec to say so)",
                       told, matching[0], matching[0])
        return matching[0]

    def generate(self, images) -> list[str]:
        """images: paths, PIL images, arrays, (B, 1, H, W) or (B, V, 1, H, W) tensors in [0, 1]
        (`cyclex.adapters.inputs`) -> B reports (the repo's cleaned lower-case text, e.g. "the heart
        is normal in size .")."""
        return generate_in_batches(self.info.name, images, self.batch_size, self._generate_batch,
                                   mixed_sizes_to=self.info.input_size)

    @torch.no_grad()
    def _generate_batch(self, images: torch.Tensor) -> list[str]:
        inputs = imagenet_views(images, self.views).to(self.device)
        with tensor_cuda_calls_to(self.device):
            output = self.model(inputs, mode="sample")
        ids = output[0] if isinstance(output, (tuple, list)) else output
        return list(self.model.tokenizer.decode_batch(ids.cpu().numpy()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.info.name!r}, device={self.device})"


class R2GenCMNGenerator(R2GenGenerator):
    """R2GenCMN (Chen et al. 2021) from a checkout of zhjohnchan/R2GenCMN: `models/models.py`
    `BaseCMNModel(args, tokenizer)`, defaults from `main_train.py`; otherwise as `R2GenGenerator`."""

    family = R2GENCMN


def checkpoint_vocabulary_size(model_state: Mapping[str, torch.Tensor], checkpoint_state: Mapping[str, torch.Tensor],
                               vocabulary: int) -> tuple[int | None, str]:
    """(the vocabulary size a checkpoint was trained with, the tensor that shows it), or (None, "").

    R2Gen / R2GenCMN size their output layer and target embedding `vocabulary + 1` (index 0 is
    <bos>/<eos>/<pad>); a tensor whose shapes differ only where the model has `vocabulary + 1`
    (encoder_decoder.logit.weight first) gives the checkpoint's size.
    """
    found: list[tuple[str, int]] = []
    for key, tensor in checkpoint_state.items():
        mine = model_state.get(key)
        if mine is None or tuple(mine.shape) == tuple(tensor.shape) or mine.ndim != tensor.ndim:
            continue
        for a, b in zip(mine.shape, tensor.shape, strict=True):
            if a != b and a == vocabulary + 1:
                found.append((key, int(b) - 1))
    if not found:
        return None, ""
    found.sort(key=lambda item: (not item[0].endswith("logit.weight"), item[0]))
    key, size = found[0]
    return size, f"{key} has {size + 1} rows"


def vocabulary_sizes(tokenizer) -> dict[int, int]:
    """{threshold: vocabulary size} the repo's Tokenizer would build from its annotation's train split.

    Uses the tokenizer's own `clean_report` and `ann` (the official Tokenizer keeps both), so the
    counts are exactly those its `create_vocabulary` thresholds; the size counts <unk>.
    """
    from collections import Counter

    annotation = getattr(tokenizer, "ann", None)
    clean = getattr(tokenizer, "clean_report", None)
    if not isinstance(annotation, Mapping) or not callable(clean):
        return {}
    counts = Counter(token for example in annotation.get("train", []) for token in clean(example["report"]).split())
    if not counts:
        return {}
    sizes: dict[int, int] = {}
    for threshold in range(1, max(counts.values()) + 1):
        sizes[threshold] = sum(n >= threshold for n in counts.values()) + 1
    return sizes


def load_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """`torch.load(weights_only=True)['state_dict']`; a bare state dict is accepted too."""
    try:
        loaded = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle/zip errors come in many types; all mean "not a usable checkpoint"
        raise GeneratorError(f"cannot read checkpoint {checkpoint} with torch.load(weights_only=True): "
                             f"{type(error).__name__}: {error}") from error
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        return dict(loaded["state_dict"])
    if isinstance(loaded, Mapping) and loaded and all(isinstance(v, torch.Tensor) for v in loaded.values()):
        return dict(loaded)
    keys = list(loaded)[:8] if isinstance(loaded, Mapping) else type(loaded).__name__
    raise GeneratorError(f"checkpoint {checkpoint}: expected a dict with 'state_dict' (as the repo's trainer "
                         f"saves), found {keys}")
