"""CheXbertLabeler on a tiny random BERT saved in exactly the official chexbert.pth layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import BertConfig

from cyclex.findings import ABNORMALITIES, FINDINGS, NO_FINDING, LabelState
from cyclex.labelers import CheXbertLabeler, load_labeler
from cyclex.labelers.chexbert import (
    MAX_TOKENS,
    CheXbertModel,
    load_bert_tokenizer,
    load_chexbert_state,
    save_chexbert_checkpoint,
)

WORDS = ["the", "heart", "is", "enlarged", "no", "pneumo", "##thorax", "possible", "effusion", "small", "left",
         "lungs", "are", "clear", ".", ","]
REPORTS = ["The heart is enlarged.", "No pneumothorax. Possible small left effusion.", "The lungs are clear."]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A bert-base-uncased-like folder: a tiny WordPiece vocab.txt and the tiny BERT's config.json."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tiny_config().save_pretrained(folder)
    return folder


def tiny_config() -> BertConfig:
    return BertConfig(vocab_size=5 + len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=37, max_position_embeddings=MAX_TOKENS)


def tiny_model(seed: int = 0) -> CheXbertModel:
    torch.manual_seed(seed)
    return CheXbertModel(tiny_config()).eval()


def save_official_layout(model: CheXbertModel, path: Path) -> Path:
    """What CheXbert's training script saved: nn.DataParallel keys under model_state_dict, plus the
    position_ids buffer older transformers kept in the state dict, and training bookkeeping."""
    state = {f"module.{k}": v.clone() for k, v in model.state_dict().items()}
    state["module.bert.embeddings.position_ids"] = torch.arange(MAX_TOKENS).unsqueeze(0)
    torch.save({"epoch": 7, "model_state_dict": state}, path)
    return path


def test_official_layout_round_trip_gives_the_same_logits(tmp_path, tokenizer_dir):
    model = tiny_model(seed=0)
    checkpoint = save_official_layout(model, tmp_path / "chexbert.pth")
    saved_keys = torch.load(checkpoint, weights_only=True)["model_state_dict"]
    assert "module.bert.embeddings.word_embeddings.weight" in saved_keys
    assert saved_keys["module.linear_heads.13.weight"].shape == (2, 32)
    assert saved_keys["module.linear_heads.0.weight"].shape == (4, 32)

    reference = CheXbertLabeler(model, load_bert_tokenizer(tokenizer_dir), device="cpu")
    loaded = CheXbertLabeler.from_checkpoint(checkpoint, tokenizer=tokenizer_dir, device="cpu")
    assert loaded.model is not model
    before, after = reference.logits(REPORTS), loaded.logits(REPORTS)
    assert [tuple(t.shape) for t in after] == [(3, 4)] * 13 + [(3, 2)]
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert not torch.allclose(after[0][0], after[0][1])  # the reports differ, so do their logits
    assert loaded.label(REPORTS) == reference.label(REPORTS)

    # our own writer produces the same layout and loads back identically
    ours = save_chexbert_checkpoint(tiny_model(seed=1), tmp_path / "ours.pth")
    assert set(torch.load(ours, weights_only=True)["model_state_dict"]) == set(saved_keys) - {
        "module.bert.embeddings.position_ids"}
    reloaded = load_chexbert_state(tiny_model(seed=2), ours)
    torch.testing.assert_close(reloaded.linear_heads[5].weight, tiny_model(seed=1).linear_heads[5].weight)


def test_classes_map_to_chexbert_states(tokenizer_dir):
    """Heads with zero weights answer their bias's argmax: 0 blank, 1 positive, 2 negative, 3 uncertain."""
    model = tiny_model()
    wanted = [1, 2, 3, 0] * 3 + [1]  # 13 abnormality heads
    with torch.no_grad():
        for head, cls in zip(model.linear_heads, [*wanted, 1], strict=True):
            head.weight.zero_()
            head.bias.zero_()
            head.bias[cls] = 5.0
    labels = CheXbertLabeler(model, load_bert_tokenizer(tokenizer_dir), device="cpu").label(REPORTS[:1])[0]
    states = {1: LabelState.POSITIVE, 2: LabelState.NEGATIVE, 3: LabelState.UNCERTAIN, 0: LabelState.BLANK}
    assert [labels[f] for f in ABNORMALITIES] == [states[c] for c in wanted]
    assert labels[NO_FINDING] is LabelState.POSITIVE
    with torch.no_grad():
        model.linear_heads[13].bias.copy_(torch.tensor([5.0, 0.0]))
    labels = CheXbertLabeler(model, load_bert_tokenizer(tokenizer_dir), device="cpu").label(REPORTS[:1])[0]
    assert labels[NO_FINDING] is LabelState.BLANK


def test_preprocessing_and_truncation_follow_chexbert(tokenizer_dir):
    labeler = CheXbertLabeler(tiny_model(), load_bert_tokenizer(tokenizer_dir), device="cpu", batch_size=2)
    tok = labeler.tokenizer
    assert labeler.encode("  The heart\n\n is   enlarged. ") == labeler.encode("The heart is enlarged.")
    assert labeler.encode("The heart") == [tok.cls_token_id, tok.convert_tokens_to_ids("the"),
                                           tok.convert_tokens_to_ids("heart"), tok.sep_token_id]
    long_ids = labeler.encode("the heart " * 600)
    assert len(long_ids) == MAX_TOKENS and long_ids[0] == tok.cls_token_id and long_ids[-1] == tok.sep_token_id
    # padding inside a batch does not change a report's logits
    alone = labeler.logits(["The heart is enlarged."])
    padded = labeler.logits(["The heart is enlarged.", "the heart " * 600])
    for a, b in zip(alone, padded, strict=True):
        torch.testing.assert_close(a[0], b[0], rtol=1e-4, atol=1e-5)


def test_bad_reports(tokenizer_dir):
    labeler = CheXbertLabeler(tiny_model(), load_bert_tokenizer(tokenizer_dir), device="cpu")
    blank, full, spaces = labeler.label(["", "The heart is enlarged.", "  \n "])
    assert all(blank[f] is LabelState.BLANK for f in FINDINGS)
    assert all(spaces[f] is LabelState.BLANK for f in FINDINGS)
    assert any(full[f] is not LabelState.BLANK for f in FINDINGS)  # random heads rarely say blank 14 times
    with pytest.raises(TypeError, match="position 1 must be a str, got NoneType"):
        labeler.label(["ok", None])
    with pytest.raises(TypeError, match="position 0 must be a str, got float"):
        labeler.logits([3.5])
    assert labeler.label([]) == []


def test_missing_files_and_wrong_keys_give_clear_errors(tmp_path, tokenizer_dir):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        CheXbertLabeler.from_checkpoint(tmp_path / "nope.pth", tokenizer=tokenizer_dir)
    checkpoint = save_official_layout(tiny_model(), tmp_path / "chexbert.pth")
    with pytest.raises(FileNotFoundError, match="tokenizer folder .*no-such-dir.* does not exist"):
        CheXbertLabeler.from_checkpoint(checkpoint, tokenizer=tmp_path / "no-such-dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither vocab.txt nor tokenizer.json"):
        load_bert_tokenizer(tmp_path / "empty")

    state = torch.load(checkpoint, weights_only=True)["model_state_dict"]
    del state["module.linear_heads.13.bias"]
    state["module.classifier.weight"] = torch.zeros(2)
    broken = tmp_path / "broken.pth"
    torch.save({"model_state_dict": state}, broken)
    with pytest.raises(ValueError, match=r"broken\.pth.*missing keys \['module\.linear_heads\.13\.bias'\].*"
                                         r"unexpected keys \['module\.classifier\.weight'\]"):
        load_chexbert_state(tiny_model(), broken)

    bare = tmp_path / "bare.pth"
    torch.save(tiny_model().state_dict(), bare)
    with pytest.raises(ValueError, match=r"bare\.pth.*no 'model_state_dict'"):
        load_chexbert_state(tiny_model(), bare)

    bigger = BertConfig(**{**tiny_config().to_dict(), "hidden_size": 64, "num_attention_heads": 4})
    with pytest.raises(ValueError, match=r"chexbert\.pth.*other shapes"):
        load_chexbert_state(CheXbertModel(bigger), checkpoint)


def test_load_labeler_chexbert_spec(tmp_path, tokenizer_dir):
    checkpoint = save_official_layout(tiny_model(), tmp_path / "chexbert.pth")
    labeler = load_labeler(f"chexbert:{checkpoint}::{tokenizer_dir}")
    assert isinstance(labeler, CheXbertLabeler)
    assert labeler.model.bert.config.hidden_size == 32  # the config came from the tokenizer folder
    assert len(labeler.label(REPORTS)) == 3
