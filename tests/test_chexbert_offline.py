"""`chexbert:` never contacts the hub unless a hub id is named (issue 18, defect 9).

HF_HUB_OFFLINE is unset in these tests, so a hub request would really be tried: every hub download
function and socket connection is patched to fail the test instead.
"""

from __future__ import annotations

import socket
import time

import huggingface_hub
import huggingface_hub.constants
import huggingface_hub.file_download
import pytest
import transformers.utils.hub
from test_labelers_chexbert import REPORTS, WORDS, save_official_layout, tiny_config, tiny_model

from cyclex.labelers import CheXbertLabeler, load_labeler
from cyclex.labelers.chexbert import DEFAULT_TOKENIZER


class HubContacted(AssertionError):
    """Raised by the patched hub functions."""


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """Online mode with every way to the hub failing the test; an empty Hugging Face cache."""
    calls: list[str] = []

    def refuse(name):
        def fail(*args, **kwargs):
            calls.append(name)
            raise HubContacted(f"{name} called with {args!r:.200} {kwargs!r:.200}")
        return fail

    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    for module in (huggingface_hub, huggingface_hub.file_download, transformers.utils.hub):
        for name in ("hf_hub_download", "snapshot_download", "get_hf_file_metadata"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, refuse(f"{module.__name__}.{name}"))
    monkeypatch.setattr(socket.socket, "connect", refuse("socket.connect"))
    return calls


def _tokenizer_files(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tiny_config().save_pretrained(folder)
    return folder


def test_tokenizer_beside_the_checkpoint_is_used_without_the_hub(tmp_path, no_hub):
    folder = _tokenizer_files(tmp_path / "chexbert")
    checkpoint = save_official_layout(tiny_model(), folder / "chexbert.pth")
    labeler = load_labeler(f"chexbert:{checkpoint}")
    assert isinstance(labeler, CheXbertLabeler)
    assert labeler.model.bert.config.hidden_size == 32
    assert len(labeler.label(REPORTS)) == 3
    assert no_hub == []


def test_a_named_local_tokenizer_folder_is_read_local_only(tmp_path, no_hub):
    tokenizer = _tokenizer_files(tmp_path / "tokenizer")
    checkpoint = save_official_layout(tiny_model(), tmp_path / "chexbert.pth")
    labeler = load_labeler(f"chexbert:{checkpoint}::{tokenizer}")
    assert len(labeler.label(REPORTS)) == 3
    assert no_hub == []


def test_bert_base_uncased_from_the_local_cache(tmp_path, no_hub):
    repo = tmp_path / "hf-cache" / "models--bert-base-uncased"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123456789abcdef0123456789abcdef01234567")
    _tokenizer_files(repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567")
    (tmp_path / "elsewhere").mkdir()
    checkpoint = save_official_layout(tiny_model(), tmp_path / "elsewhere" / "chexbert.pth")
    labeler = CheXbertLabeler.from_checkpoint(checkpoint)
    assert labeler.model.bert.config.hidden_size == 32
    assert no_hub == []


def test_no_tokenizer_anywhere_fails_at_once_saying_what_to_pass(tmp_path, no_hub):
    (tmp_path / "ckpt").mkdir()
    checkpoint = save_official_layout(tiny_model(), tmp_path / "ckpt" / "chexbert.pth")
    started = time.monotonic()
    with pytest.raises(FileNotFoundError, match=rf"no tokenizer .*chexbert\.pth.*no {DEFAULT_TOKENIZER} in the local "
                                                r"Hugging Face cache.*::TOKENIZER_DIR"):
        load_labeler(f"chexbert:{checkpoint}")
    assert time.monotonic() - started < 10
    assert no_hub == []


def test_a_broken_checkpoint_is_refused_before_any_tokenizer_lookup(tmp_path, no_hub):
    broken = tmp_path / "chexbert.pth"
    broken.write_text("not a torch file")
    with pytest.raises(ValueError, match=r"chexbert\.pth.*could not be read"):
        load_labeler(f"chexbert:{broken}::{DEFAULT_TOKENIZER}")  # even with a hub id: checkpoint first
    assert no_hub == []


def test_only_a_named_hub_id_goes_to_the_hub(tmp_path, no_hub):
    checkpoint = save_official_layout(tiny_model(), tmp_path / "chexbert.pth")
    with pytest.raises((HubContacted, OSError)):
        load_labeler(f"chexbert:{checkpoint}::{DEFAULT_TOKENIZER}")
    assert no_hub  # the user asked for the hub id, so the hub was tried
