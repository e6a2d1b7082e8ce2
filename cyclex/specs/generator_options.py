"""Every `::key=value` option of a generator spec, per kind (no model code: the CLI's help imports it).

`cyclex.specs.generators.load_generator` accepts exactly these; the README's table and the
`--generator` help of `cyclex explain`, `train-tailored` and `generate` are written from them.
"""

from __future__ import annotations

# Every `::key=value` option, per kind: what it does (the README table and `--generator` help).
SPEC_OPTIONS: dict[str, dict[str, str]] = {
    "hf": {
        "prompt": "instruction for image-text-to-text models (e.g. Describe the findings); ignored by "
                  "encoder-decoder captioners",
        "device": "torch device (default: cuda when available, else cpu)",
        "batch_size": "images per generate call (default 16)",
        "max_new_tokens": "report length in tokens (default: the model's generation_config, else 96; "
                          "always capped to the decoder's positions)",
        "max_length": "prompt + report length in tokens, as transformers counts it",
        "min_new_tokens": "shortest report in tokens",
        "num_beams": "beam search width (default: the model's generation_config)",
        "do_sample": "true: sample reports (not reproducible: the cycle check needs greedy or beams)",
        "temperature": "sampling temperature", "top_k": "sampling: keep the k most likely tokens",
        "top_p": "sampling: nucleus probability", "repetition_penalty": "penalty on repeated tokens",
        "no_repeat_ngram_size": "forbid repeating n-grams of this size", "length_penalty": "beam length penalty",
        "early_stopping": "beam search stops when num_beams reports are finished",
    },
    "r2gen": {
        "dataset": "iu_xray (two views) or mimic_cxr (one view); default: read from the annotation file",
        "threshold": "word-frequency cut-off of the vocabulary; default: the checkout's main script, or the "
                     "one that reproduces the checkpoint's vocabulary size",
        "device": "torch device", "batch_size": "images per call (default 16)",
        "ANY_OPTION": "any other argparse option of the checkout's main script (beam_size, max_seq_length, "
                      "sample_method, ...), converted to the option's type",
    },
    "python": {"batch_size": "call the function on at most this many images at a time (default: all)"},
    "demo": {"device": "torch device", "batch_size": "images per call (default 64)"},
}
SPEC_OPTIONS["r2gencmn"] = SPEC_OPTIONS["r2gen"]


def spec_options_help() -> str:
    """One line per kind naming its options (the CLI's --generator help)."""
    kinds = {"hf": "hf:PATH_OR_ID", "r2gen": "r2gen:REPO::CHECKPOINT::ANNOTATION (also r2gencmn:)",
             "python": "python:module:function", "demo": "demo:clean | demo:shortcut"}
    lines = []
    for kind, form in kinds.items():
        keys = [k if k != "ANY_OPTION" else "any argparse option of the checkout" for k in SPEC_OPTIONS[kind]]
        lines.append(f"{form}[::{'=..,'.join(keys)}=..]")
    return "; ".join(lines)


__all__ = ["SPEC_OPTIONS", "spec_options_help"]
