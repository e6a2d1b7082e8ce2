"""CheXbert (Smit et al. 2020) re-implemented on transformers, loading the official `chexbert.pth`.

The network is CheXbert's `bert_labeler`: a `BertModel` (bert-base-uncased), dropout on the [CLS]
hidden state, and 14 linear heads in CheXbert's finding order (= `cyclex.findings.FINDINGS`): 13 heads
with 4 classes and the "No Finding" head with 2. Class indices are CheXbert's:

    0 blank, 1 positive, 2 negative, 3 uncertain        (No Finding: 0 blank, 1 positive)

The official checkpoint was saved from `nn.DataParallel`, so its layout is
``{"model_state_dict": {"module.bert.embeddings...": ..., "module.linear_heads.N.weight": ...}}``;
`load_chexbert_state` reads exactly that with ``torch.load(..., weights_only=True)`` and
`save_chexbert_checkpoint` writes it. Reports are pre-processed as CheXbert does (strip, collapse
whitespace), tokenized with bert-base-uncased's WordPiece and truncated to 512 tokens
(the first 511 then [SEP]). The `f1chexbert` package downloads from a hub at construction; here
every file is local unless a hub id is given on purpose: the checkpoint is read and checked first,
then the tokenizer comes from the folder given, else from beside the checkpoint, else from
bert-base-uncased in the local Hugging Face cache (`from_checkpoint(tokenizer=None)`), each read with
``local_files_only=True``; only a hub id the user names (``chexbert:PATH::bert-base-uncased``) is
looked up on the hub.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import BertConfig, BertModel, BertTokenizer

from cyclex.findings import ABNORMALITIES, FINDINGS, NO_FINDING, FindingLabels, LabelState
from cyclex.labelers.base import check_report_texts
from cyclex.labelers.report_text import strip_invisible_controls

logger = logging.getLogger(__name__)

DEFAULT_TOKENIZER = "bert-base-uncased"
MAX_TOKENS = 512  # BERT's position limit; CheXbert keeps the first 511 tokens + [SEP]
STATE_DICT_KEY = "model_state_dict"
DATA_PARALLEL_PREFIX = "module."
# Head output index -> state, as in CheXbert's label.py (0 -> NaN, 1 -> 1, 2 -> 0, 3 -> -1).
ABNORMALITY_CLASSES = (LabelState.BLANK, LabelState.POSITIVE, LabelState.NEGATIVE, LabelState.UNCERTAIN)
NO_FINDING_CLASSES = (LabelState.BLANK, LabelState.POSITIVE)
# Buffers that older transformers saved in the state dict and newer ones rebuild themselves.
_REBUILT_BUFFERS = ("bert.embeddings.position_ids", "bert.embeddings.token_type_ids")


class CheXbertModel(nn.Module):
    """BERT + dropout + 14 linear heads on the [CLS] state (CheXbert's `bert_labeler`)."""

    def __init__(self, config: BertConfig, dropout: float = 0.1) -> None:
        super().__init__()
        self.bert = BertModel(config)  # keeps the pooler: the official checkpoint holds its weights
        self.dropout = nn.Dropout(dropout)
        hidden = config.hidden_size
        heads = [nn.Linear(hidden, len(ABNORMALITY_CLASSES)) for _ in ABNORMALITIES]
        self.linear_heads = nn.ModuleList([*heads, nn.Linear(hidden, len(NO_FINDING_CLASSES))])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """input_ids, attention_mask: (B, L) -> 14 logit tensors, (B, 4) x 13 then (B, 2)."""
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        cls_state = self.dropout(hidden[:, 0, :])
        return [head(cls_state) for head in self.linear_heads]


def preprocess_report(report: str) -> str:
    """CheXbert's cleaning: strip and collapse every whitespace run (newlines too) to one space, after
    removing the invisible bidi / zero-width characters that could hide a finding from the reader."""
    return re.sub(r"\s+", " ", strip_invisible_controls(report)).strip()


def save_chexbert_checkpoint(model: CheXbertModel, path: str | os.PathLike) -> Path:
    """Write `model` in the official layout (`model_state_dict` with `module.` keys), atomically."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {DATA_PARALLEL_PREFIX + k: v.detach().cpu() for k, v in model.state_dict().items()}
    handle = tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp", delete=False)
    handle.close()
    try:
        torch.save({STATE_DICT_KEY: state}, handle.name)
        os.replace(handle.name, out)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    return out


def read_chexbert_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of an official-layout checkpoint, `module.` prefixes removed (no model needed).

    Raises `FileNotFoundError` when the file is missing and `ValueError` naming the file when it is
    not a `torch.load(weights_only=True)` file with a `model_state_dict` entry.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CheXbert checkpoint {str(path)!r} does not exist "
                                "(expected the official chexbert.pth)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors come in many types; name the file whichever it is
        raise ValueError(f"CheXbert checkpoint {str(path)!r} could not be read with "
                         f"torch.load(weights_only=True): {error}") from error
    if not isinstance(checkpoint, dict) or STATE_DICT_KEY not in checkpoint:
        found = sorted(checkpoint)[:10] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"CheXbert checkpoint {str(path)!r} has no {STATE_DICT_KEY!r} entry "
                         f"(found: {found}); expected the official chexbert.pth layout")
    if not isinstance(checkpoint[STATE_DICT_KEY], dict):
        raise ValueError(f"CheXbert checkpoint {str(path)!r}: {STATE_DICT_KEY!r} is a "
                         f"{type(checkpoint[STATE_DICT_KEY]).__name__}, expected a dict of tensors")
    state = {(k[len(DATA_PARALLEL_PREFIX):] if k.startswith(DATA_PARALLEL_PREFIX) else k): v
             for k, v in checkpoint[STATE_DICT_KEY].items()}
    for key in _REBUILT_BUFFERS:
        state.pop(key, None)
    return state


def load_chexbert_state(model: CheXbertModel, path: str | os.PathLike,
                        state: dict[str, torch.Tensor] | None = None) -> CheXbertModel:
    """Load an official-layout checkpoint into `model` (strictly: every key and shape must match).

    state: the file's `read_chexbert_state`, when already read. Raises `FileNotFoundError` when the
    file is missing and `ValueError` naming the file and the missing / unexpected keys or mismatched
    shapes otherwise.
    """
    path = Path(path)
    state = read_chexbert_state(path) if state is None else state
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"CheXbert checkpoint {str(path)!r} does not match the CheXbert layout: "
                         f"missing keys {[DATA_PARALLEL_PREFIX + k for k in missing]}, "
                         f"unexpected keys {[DATA_PARALLEL_PREFIX + k for k in unexpected]}")
    wrong_shapes = [f"{DATA_PARALLEL_PREFIX}{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
                    for k, v in expected.items() if tuple(state[k].shape) != tuple(v.shape)]
    if wrong_shapes:
        raise ValueError(f"CheXbert checkpoint {str(path)!r} has tensors of other shapes than the BERT "
                         f"config (checkpoint vs model): {wrong_shapes[:5]}; pass the config it was "
                         "trained with (bert-base-uncased for the official file)")
    model.load_state_dict(state, strict=True)
    return model


def _is_local_path(name: str) -> bool:
    return os.sep in name or name.startswith((".", "~")) or Path(name).exists()


def _has_tokenizer_files(folder: Path) -> bool:
    return (folder / "vocab.txt").is_file() or (folder / "tokenizer.json").is_file()


def cached_hub_folder(repo_id: str = DEFAULT_TOKENIZER) -> Path | None:
    """The snapshot folder of `repo_id` in the local Hugging Face cache when it holds a tokenizer, else None.

    Reads the cache's files only (`try_to_load_from_cache`); never contacts the hub.
    """
    from huggingface_hub import try_to_load_from_cache

    for filename in ("vocab.txt", "tokenizer.json"):
        found = try_to_load_from_cache(repo_id, filename)
        if isinstance(found, str):
            return Path(found).parent
    return None


def local_tokenizer_folder(checkpoint: str | os.PathLike) -> Path:
    """Where the tokenizer is when none is named: beside the checkpoint, else bert-base-uncased in the
    local Hugging Face cache. Raises `FileNotFoundError` saying what to pass otherwise (no download)."""
    beside = Path(checkpoint).expanduser().parent
    if _has_tokenizer_files(beside):
        return beside
    cached = cached_hub_folder(DEFAULT_TOKENIZER)
    if cached is not None:
        return cached
    raise FileNotFoundError(
        f"no tokenizer for the CheXbert checkpoint {str(checkpoint)!r}: no vocab.txt or tokenizer.json beside it "
        f"in {str(beside)!r} and no {DEFAULT_TOKENIZER} in the local Hugging Face cache; pass a local "
        f"{DEFAULT_TOKENIZER} folder ('chexbert:PATH.pth::TOKENIZER_DIR'), or the hub id on purpose "
        f"('chexbert:PATH.pth::{DEFAULT_TOKENIZER}', downloads it)")


def load_bert_tokenizer(name_or_path: str | os.PathLike) -> BertTokenizer:
    """bert-base-uncased's WordPiece tokenizer from a local folder (with vocab.txt) or a hub id.

    A local folder is read with local_files_only=True (no hub request); only a hub id goes online.
    """
    name = str(name_or_path)
    if _is_local_path(name):
        folder = Path(name).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder {name!r} does not exist (expected a folder with "
                                    "vocab.txt, e.g. bert-base-uncased saved with save_pretrained)")
        if not _has_tokenizer_files(folder):
            raise FileNotFoundError(f"tokenizer folder {name!r} has neither vocab.txt nor tokenizer.json")
        return BertTokenizer.from_pretrained(str(folder), local_files_only=True)
    try:
        return BertTokenizer.from_pretrained(name)
    except OSError as error:
        raise OSError(f"could not load the tokenizer {name!r} from the hub (offline?); pass a local "
                      f"bert-base-uncased folder instead: {error}") from error


def resolve_bert_config(tokenizer: str | os.PathLike, config: BertConfig | str | os.PathLike | None) -> BertConfig:
    """The BERT config: `config` if given (object, config.json or folder), else the tokenizer folder's
    config.json, else bert-base-uncased's (which `BertConfig()` defaults to). Local files are read
    with local_files_only=True; only a hub id other than bert-base-uncased is looked up online."""
    if isinstance(config, BertConfig):
        return config
    if config is not None:
        path = Path(config)
        if not path.exists():
            raise FileNotFoundError(f"BERT config {str(path)!r} does not exist")
        return (BertConfig.from_json_file(str(path)) if path.is_file()
                else BertConfig.from_pretrained(str(path), local_files_only=True))
    name = str(tokenizer)
    if _is_local_path(name):
        if (Path(name) / "config.json").is_file():
            return BertConfig.from_pretrained(name, local_files_only=True)
        logger.info("no config.json in %s: using bert-base-uncased's BERT config", name)
        return BertConfig()
    if name == DEFAULT_TOKENIZER:
        return BertConfig()  # identical to bert-base-uncased's config.json; no download needed
    return BertConfig.from_pretrained(name)


class CheXbertLabeler:
    """The CheXbert labeler: `label(reports)` -> one `FindingLabels` per report.

    Build it from files with `CheXbertLabeler.from_checkpoint(path, tokenizer=...)`, or from a ready
    `CheXbertModel` and tokenizer. Empty or whitespace-only reports get all-blank labels without
    running the model; other reports are batched (`batch_size`) and padded per batch.
    """

    def __init__(self, model: CheXbertModel, tokenizer: BertTokenizer, *, device: str | torch.device | None = None,
                 batch_size: int = 16) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    @classmethod
    def from_checkpoint(cls, checkpoint: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None,
                        config: BertConfig | str | os.PathLike | None = None,
                        device: str | torch.device | None = None, batch_size: int = 16) -> CheXbertLabeler:
        """Load the official `chexbert.pth` with the tokenizer (and BERT config) of `tokenizer`.

        tokenizer: a local folder or a hub id (only then is the hub contacted); None: the folder
        beside the checkpoint, else bert-base-uncased from the local Hugging Face cache
        (`local_tokenizer_folder`). The checkpoint is read and checked before any tokenizer is looked for.
        """
        # 1. the local checkpoint first: a missing or broken file fails at once, before any lookup
        state = read_chexbert_state(checkpoint)
        # 2. the tokenizer: local unless a hub id was named
        source = local_tokenizer_folder(checkpoint) if tokenizer is None else tokenizer
        bert_tokenizer = load_bert_tokenizer(source)
        # 3. the model, strictly matched to the checkpoint
        model = CheXbertModel(resolve_bert_config(source, config))
        load_chexbert_state(model, checkpoint, state)
        return cls(model, bert_tokenizer, device=device, batch_size=batch_size)

    def encode(self, report: str) -> list[int]:
        """Token ids of one report as CheXbert builds them: [CLS] ... [SEP], at most 512 ids."""
        tokens = self.tokenizer.tokenize(preprocess_report(report))
        ids = self.tokenizer.convert_tokens_to_ids(tokens)[: MAX_TOKENS - 2]
        return [self.tokenizer.cls_token_id, *ids, self.tokenizer.sep_token_id]

    @torch.no_grad()
    def logits(self, reports: Sequence[str]) -> list[torch.Tensor]:
        """14 logit tensors on the CPU, (N, 4) x 13 then (N, 2), N = len(reports)."""
        texts = check_report_texts(reports, labeler="CheXbertLabeler")
        outputs: list[list[torch.Tensor]] = [[] for _ in FINDINGS]
        for first in range(0, len(texts), self.batch_size):
            encoded = [self.encode(t) for t in texts[first:first + self.batch_size]]
            length = max(len(ids) for ids in encoded)
            input_ids = torch.full((len(encoded), length), self.tokenizer.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(encoded), length), dtype=torch.long)
            for row, ids in enumerate(encoded):
                input_ids[row, :len(ids)] = torch.tensor(ids)
                attention_mask[row, :len(ids)] = 1
            heads = self.model(input_ids.to(self.device), attention_mask.to(self.device))
            for store, head in zip(outputs, heads, strict=True):
                store.append(head.float().cpu())
        if not texts:
            return [torch.zeros((0, head.out_features)) for head in self.model.linear_heads]
        return [torch.cat(store) for store in outputs]

    def label(self, reports: Sequence[str]) -> list[FindingLabels]:
        texts = check_report_texts(reports, labeler="CheXbertLabeler")
        labels = [FindingLabels.blank() for _ in texts]
        to_run = [i for i, t in enumerate(texts) if t.strip()]
        if not to_run:
            return labels
        heads = self.logits([texts[i] for i in to_run])
        classes = [h.argmax(dim=1).tolist() for h in heads]
        for row, index in enumerate(to_run):
            states = {f: ABNORMALITY_CLASSES[classes[k][row]] for k, f in enumerate(ABNORMALITIES)}
            states[NO_FINDING] = NO_FINDING_CLASSES[classes[-1][row]]
            labels[index] = FindingLabels(states)
        return labels
