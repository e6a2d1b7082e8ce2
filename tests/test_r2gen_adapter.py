"""R2Gen / R2GenCMN adapters against fixture repositories with the official interface."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

from cyclex.adapters import GeneratorError, R2GenCMNGenerator, R2GenGenerator
from cyclex.adapters.r2gen import (
    R2GEN,
    R2GENCMN,
    build_args,
    imagenet_views,
    isolated_repo_import,
    read_argparse_defaults,
)
from cyclex.specs.generators import load_generator

FIXTURES = Path(__file__).parent / "fixtures"
FAKE_R2GEN = FIXTURES / "fake_r2gen"
FAKE_R2GENCMN = FIXTURES / "fake_r2gencmn"

BRIGHT_REPORT = "the heart is enlarged ."
DARK_REPORT = "no acute disease ."


def write_annotation(path: Path, two_views: bool = True) -> Path:
    views = ["CXR1/0.png", "CXR1/1.png"] if two_views else ["p10/s1/view.jpg"]
    train = [{"id": f"t{i}", "report": report, "image_path": views, "split": "train"}
             for i, report in enumerate(["The heart is enlarged.", "No acute disease.",
                                         "The heart is enlarged..", "No acute disease. The heart is enlarged."])]
    val = [{"id": "v0", "report": "Small pneumothorax.", "image_path": views, "split": "val"}]
    path.write_text(json.dumps({"train": train, "val": val, "test": val}))
    return path


def make_checkpoint(repo: Path, family, ann_path: Path, out: Path, **overrides) -> Path:
    """Build the fixture model, hand-set its tables so bright images give BRIGHT_REPORT."""
    with isolated_repo_import(repo):
        tokenizer_cls = importlib.import_module("modules.tokenizers").Tokenizer
        model_cls = getattr(importlib.import_module(family.model_module), family.model_class)
    args = build_args(repo, family, ann_path, overrides)
    tokenizer = tokenizer_cls(args)
    model = model_cls(args, tokenizer)
    torch.manual_seed(0)
    with torch.no_grad():
        table = model.encoder_decoder.report_logits
        table.zero_()
        for row, report in enumerate([BRIGHT_REPORT, DARK_REPORT]):
            ids = [tokenizer.token2idx[token] for token in report.split()] + [0]
            for step, token_id in enumerate(ids):
                table[row, step, token_id] = 10.0
        model.encoder_decoder.selector.weight.fill_(1.0)
        model.encoder_decoder.selector.bias.fill_(0.0)
        conv = model.visual_extractor.model[1]
        conv.weight.fill_(1.0)
        conv.bias.zero_()
    torch.save({"epoch": 3, "state_dict": model.state_dict(), "monitor_best": 0.25}, out)
    return out


@pytest.fixture()
def r2gen_files(tmp_path):
    ann = write_annotation(tmp_path / "annotation.json")
    ckpt = make_checkpoint(FAKE_R2GEN, R2GEN, ann, tmp_path / "model_best.pth")
    return ann, ckpt


def test_defaults_are_read_from_main_without_importing_it():
    defaults, types = read_argparse_defaults(FAKE_R2GEN / "main.py")
    assert defaults["threshold"] == 2  # the fixture's own value, not the official 3
    assert defaults["max_seq_length"] == 12 and types["max_seq_length"] is int
    assert defaults["visual_extractor_pretrained"] is True and types["visual_extractor_pretrained"] is bool
    assert defaults["resume"] is None
    assert "pycocoevalcap" not in sys.modules


def test_args_force_pretrained_false_and_convert_overrides(tmp_path):
    ann = write_annotation(tmp_path / "annotation.json", two_views=False)
    args = build_args(FAKE_R2GEN, R2GEN, ann, {"beam_size": "5", "temperature": "0.5",
                                               "visual_extractor_pretrained": "True"})
    assert args.dataset_name == "mimic_cxr"  # inferred: one image path per study
    assert args.beam_size == 5 and args.temperature == 0.5
    assert args.visual_extractor_pretrained is False
    assert args.ann_path == str(ann)
    with pytest.raises(ValueError, match="beam_size='three'"):
        build_args(FAKE_R2GEN, R2GEN, ann, {"beam_size": "three"})


def test_documented_defaults_when_main_script_is_missing(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    ann = write_annotation(tmp_path / "annotation.json")
    args = build_args(repo, R2GEN, ann)
    assert args.threshold == 3 and args.rm_num_slots == 3 and args.visual_extractor_pretrained is False


def test_tokenizer_vocabulary_comes_from_train_split(r2gen_files):
    ann, ckpt = r2gen_files
    generator = R2GenGenerator(FAKE_R2GEN, ckpt, ann, device="cpu")
    vocab = set(generator.tokenizer.token2idx)
    # threshold 2 over the train split: "heart" (3x) kept, "pneumothorax" (val only) absent
    assert {"the", "heart", "is", "enlarged", "no", "acute", "disease", ".", "<unk>"} == vocab


def test_generates_on_cpu_despite_cuda_calls_and_restores_tensor_cuda(r2gen_files):
    ann, ckpt = r2gen_files
    original_cuda = torch.Tensor.cuda
    generator = R2GenGenerator(FAKE_R2GEN, ckpt, ann, device="cpu", batch_size=2)
    images = torch.zeros(3, 1, 40, 48)
    images[0] = 1.0
    images[2] = 0.9
    reports = generator.generate(images)
    assert reports == [BRIGHT_REPORT, DARK_REPORT, BRIGHT_REPORT]
    assert torch.Tensor.cuda is original_cuda
    assert generator.info.views_per_study == 2 and generator.info.input_size == (224, 224)
    assert "models" not in sys.modules and "modules" not in sys.modules


def test_two_view_input_and_view_count_check(r2gen_files):
    ann, ckpt = r2gen_files
    generator = R2GenGenerator(FAKE_R2GEN, ckpt, ann, device="cpu")
    study = torch.ones(1, 2, 1, 30, 30)
    assert generator.generate(study) == [BRIGHT_REPORT]
    with pytest.raises(GeneratorError, match="2 views per study, got 3"):
        generator.generate(torch.ones(1, 3, 1, 30, 30))


def test_imagenet_views_matches_torchvision_normalisation():
    from torchvision.transforms import functional as TF

    images = torch.rand(2, 1, 224, 224)
    out = imagenet_views(images, views=2)
    assert out.shape == (2, 2, 3, 224, 224)
    expected = TF.normalize(images[0].expand(3, -1, -1), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    torch.testing.assert_close(out[0, 1], expected, atol=1e-5, rtol=1e-5)


def test_r2gen_and_r2gencmn_coexist(tmp_path, r2gen_files):
    ann, ckpt = r2gen_files
    cmn_ckpt = make_checkpoint(FAKE_R2GENCMN, R2GENCMN, ann, tmp_path / "cmn.pth")
    r2gen = R2GenGenerator(FAKE_R2GEN, ckpt, ann, device="cpu")
    cmn = R2GenCMNGenerator(FAKE_R2GENCMN, cmn_ckpt, ann, device="cpu")
    images = torch.stack([torch.ones(1, 32, 32), torch.zeros(1, 32, 32)])
    assert cmn.args.threshold == 1  # read from the CMN fixture's main_train.py
    assert cmn.generate(images) == [BRIGHT_REPORT, DARK_REPORT]  # sample mode returns (ids, probs)
    assert r2gen.generate(images) == [BRIGHT_REPORT, DARK_REPORT]
    assert type(r2gen.model).__name__ == "R2GenModel" and type(cmn.model).__name__ == "BaseCMNModel"


def test_load_generator_spec_with_options(r2gen_files):
    ann, ckpt = r2gen_files
    generator = load_generator(f"r2gen:{FAKE_R2GEN}::{ckpt}::{ann}::dataset=iu_xray,beam_size=1,device=cpu")
    assert generator.args.beam_size == 1 and generator.args.dataset_name == "iu_xray"
    assert generator.generate(torch.ones(1, 1, 16, 16)) == [BRIGHT_REPORT]


def test_bad_checkpoints_name_the_file(tmp_path, r2gen_files):
    ann, _ = r2gen_files
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(GeneratorError, match="empty.pth"):
        R2GenGenerator(FAKE_R2GEN, empty, ann, device="cpu")
    wrong = tmp_path / "wrong.pth"
    torch.save({"epoch": 1, "optimizer": {}}, wrong)
    with pytest.raises(GeneratorError, match="expected a dict with 'state_dict'"):
        R2GenGenerator(FAKE_R2GEN, wrong, ann, device="cpu")
    other_vocab = write_annotation(tmp_path / "other.json")
    other_vocab.write_text(json.dumps({"train": [{"report": "Lungs clear. Lungs clear.", "image_path": ["a", "b"]}]}))
    ckpt = make_checkpoint(FAKE_R2GEN, R2GEN, ann, tmp_path / "ok.pth")
    with pytest.raises(GeneratorError, match="no threshold reproduces 9 from this annotation file"):
        R2GenGenerator(FAKE_R2GEN, ckpt, other_vocab, device="cpu")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        R2GenGenerator(FAKE_R2GEN, tmp_path / "missing.pth", ann, device="cpu")


def write_threshold_annotation(path: Path) -> Path:
    """Train reports whose words occur 3 times, plus one phrase occurring twice: threshold 2 and 3 differ."""
    reports = ["The heart is enlarged."] * 3 + ["No acute disease."] * 3 + ["Mild scoliosis."] * 2
    train = [{"id": f"t{i}", "report": r, "image_path": ["CXR1/0.png", "CXR1/1.png"], "split": "train"}
             for i, r in enumerate(reports)]
    path.write_text(json.dumps({"train": train, "val": train[:1], "test": train[:1]}))
    return path


def test_a_checkpoint_trained_with_another_threshold_is_loaded_with_the_one_that_fits(tmp_path, caplog):
    # the user's R2Gen checkpoint was trained with --threshold 10; the checkout's default (here 2) used
    # to end in a raw "size mismatch for encoder_decoder.logit.weight" traceback
    ann = write_threshold_annotation(tmp_path / "annotation.json")
    ckpt = make_checkpoint(FAKE_R2GEN, R2GEN, ann, tmp_path / "model_best.pth", threshold="3")
    with caplog.at_level("WARNING", logger="cyclex.adapters.r2gen"):
        generator = R2GenGenerator(FAKE_R2GEN, ckpt, ann, device="cpu", overrides={"beam_size": "1"})
    assert generator.args.threshold == 3
    assert generator.generate(torch.ones(1, 1, 16, 16)) == [BRIGHT_REPORT]
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "vocabulary of 9 tokens (encoder_decoder.logit.weight has 10 rows)" in message
    assert "threshold=2" in message and "gives 11" in message and "using threshold=3" in message


def test_a_wrong_explicit_threshold_says_exactly_which_to_pass(tmp_path):
    ann = write_threshold_annotation(tmp_path / "annotation.json")
    ckpt = make_checkpoint(FAKE_R2GEN, R2GEN, ann, tmp_path / "model_best.pth", threshold="3")
    with pytest.raises(GeneratorError) as refused:
        load_generator(f"r2gen:{FAKE_R2GEN}::{ckpt}::{ann}::threshold=2,device=cpu")
    message = str(refused.value)
    assert "size mismatch" not in message
    assert f"threshold=3 reproduces it: pass r2gen:{FAKE_R2GEN.resolve()}::{ckpt}::{ann}::threshold=3" in message
    # an annotation file that cannot give the checkpoint's vocabulary at any threshold: said so
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"train": [{"report": "Lungs clear.", "image_path": ["a", "b"]}]}))
    with pytest.raises(GeneratorError, match="no threshold reproduces 9 from this annotation file"):
        R2GenGenerator(FAKE_R2GEN, ckpt, other, device="cpu")
