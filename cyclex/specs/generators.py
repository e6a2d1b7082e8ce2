"""Name a report generator in one string (for the CLI and run folders).

Specs (options after the last ``::``, ``key=value`` pairs separated by commas):

* ``hf:PATH_OR_ID[::prompt=Describe the findings,num_beams=3,batch_size=8]``
* ``r2gen:REPO::CHECKPOINT::ANNOTATION[::dataset=iu_xray,beam_size=3,threshold=10]``
* ``r2gencmn:REPO::CHECKPOINT::ANNOTATION[::...]``
* ``python:package.module:function`` -- the function takes (B, 1, H, W) in [0, 1], returns B strings
  (a `ReportGenerator` object, or a zero-argument factory returning one, is used as is)
* ``demo:clean`` / ``demo:shortcut`` -- the embedded demo generators (installed from the weights the
  package ships, trained only when those are missing)

Every option each kind accepts is listed in `SPEC_OPTIONS` (the README's table and the CLI's
``--generator`` help are written from it). ``prompt=`` takes the rest of the options text when it
is the last option, so a prompt may contain commas. Hugging Face models decode with their own
``generation_config.json``; the generation options here override single fields of it.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from typing import Any

from cyclex.adapters.base import GeneratorInfo, ReportGenerator
from cyclex.adapters.callable import CallableGenerator
from cyclex.specs.generator_options import SPEC_OPTIONS, spec_options_help  # noqa: F401  (re-exported)

# hf: fields of the model's generation_config a spec may override, by type
_HF_GENERATION_INT = {"max_new_tokens", "num_beams", "max_length", "min_new_tokens", "top_k",
                      "no_repeat_ngram_size"}
_HF_GENERATION_FLOAT = {"temperature", "top_p", "repetition_penalty", "length_penalty"}
_HF_GENERATION_BOOL = {"do_sample", "early_stopping"}

class GeneratorSpecError(ValueError):
    """A generator spec string that cannot be understood."""


def parse_options(text: str, *, spec: str) -> dict[str, str]:
    """'a=1,b=two,prompt=x, y' -> {'a': '1', 'b': 'two', 'prompt': 'x, y'}."""
    options: dict[str, str] = {}
    remaining = text.strip()
    while remaining:
        key, sep, rest = remaining.partition("=")
        key = key.strip()
        if not sep or not key:
            raise GeneratorSpecError(f"generator spec {spec!r}: option {remaining!r} is not key=value")
        if key == "prompt":  # a prompt may contain commas
            value, remaining = _split_prompt(rest)
        else:
            value, _, remaining = rest.partition(",")
        options[key] = value.strip()
        remaining = remaining.strip()
    return options


def _split_prompt(rest: str) -> tuple[str, str]:
    """The prompt ends at the first ",identifier=" (the next option) or at the end."""
    following = re.search(r",\s*[A-Za-z_]\w*\s*=", rest)
    if following is None:
        return rest, ""
    return rest[:following.start()], rest[following.start() + 1:]


def _to_bool(key: str, value: str, spec: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise GeneratorSpecError(f"generator spec {spec!r}: {key}={value!r} must be true or false")


def _to_int(key: str, value: str, spec: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise GeneratorSpecError(f"generator spec {spec!r}: {key}={value!r} must be an integer") from None


def _load_hf(body: str, options: dict[str, str], spec: str) -> ReportGenerator:
    from cyclex.adapters.hf import HFImageToTextGenerator

    prompt = options.pop("prompt", None)
    device = options.pop("device", None)
    batch_size = _to_int("batch_size", options.pop("batch_size", "16"), spec)
    generation_kwargs: dict[str, Any] = {}
    for key, value in options.items():
        if key in _HF_GENERATION_INT:
            generation_kwargs[key] = _to_int(key, value, spec)
        elif key in _HF_GENERATION_FLOAT:
            try:
                generation_kwargs[key] = float(value)
            except ValueError:
                raise GeneratorSpecError(f"generator spec {spec!r}: {key}={value!r} must be a number") from None
        elif key in _HF_GENERATION_BOOL:
            generation_kwargs[key] = _to_bool(key, value, spec)
        else:
            raise GeneratorSpecError(
                f"generator spec {spec!r}: unknown hf option {key!r}; known: {', '.join(SPEC_OPTIONS['hf'])}")
    return HFImageToTextGenerator.from_pretrained(body, prompt=prompt, generation_kwargs=generation_kwargs,
                                                  device=device, batch_size=batch_size)


def _load_r2gen(kind: str, parts: list[str], options: dict[str, str], spec: str) -> ReportGenerator:
    from cyclex.adapters.r2gen import R2GenCMNGenerator, R2GenGenerator

    if len(parts) != 3 or not all(parts):
        raise GeneratorSpecError(f"generator spec {spec!r}: expected {kind}:REPO::CHECKPOINT::ANNOTATION"
                                 "[::options]")
    device = options.pop("device", None)
    batch_size = _to_int("batch_size", options.pop("batch_size", "16"), spec)
    if "dataset" in options:
        options["dataset_name"] = options.pop("dataset")
    cls = R2GenGenerator if kind == "r2gen" else R2GenCMNGenerator
    repo, checkpoint, ann_path = parts
    return cls(repo, checkpoint, ann_path, overrides=options, device=device, batch_size=batch_size)


def _load_python(body: str, options: dict[str, str], spec: str) -> ReportGenerator:
    module_name, sep, attribute = body.rpartition(":")
    if not sep or not module_name or not attribute:
        raise GeneratorSpecError(f"generator spec {spec!r}: expected python:package.module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise GeneratorSpecError(f"generator spec {spec!r}: cannot import module {module_name!r}: {error}") from error
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise GeneratorSpecError(f"generator spec {spec!r}: {module_name} has no attribute {attribute!r}")
        target = getattr(target, part)
    if isinstance(target, ReportGenerator):
        return target
    if inspect.isclass(target) or _is_zero_argument_factory(target):
        made = target()
        if isinstance(made, ReportGenerator):
            return made
        if not inspect.isclass(target):
            raise GeneratorSpecError(f"generator spec {spec!r}: factory {attribute} returned "
                                     f"{type(made).__name__}, not a ReportGenerator")
        raise GeneratorSpecError(f"generator spec {spec!r}: class {attribute} is not a ReportGenerator "
                                 "(needs .info and .generate(images))")
    if not callable(target):
        raise GeneratorSpecError(f"generator spec {spec!r}: {attribute} is not callable")
    batch_size = options.pop("batch_size", None)
    if options:
        raise GeneratorSpecError(f"generator spec {spec!r}: unknown python option(s) {sorted(options)}; "
                                 f"known: {', '.join(SPEC_OPTIONS['python'])}")
    return CallableGenerator(target, GeneratorInfo(name=spec.split("::")[0], channels=1, mean=(0.0,), std=(1.0,)),
                             batch_size=_to_int("batch_size", batch_size, spec) if batch_size else None)


def _is_zero_argument_factory(target: Any) -> bool:
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return False
    return len(signature.parameters) == 0


def _load_demo(body: str, options: dict[str, str], spec: str) -> ReportGenerator:
    from cyclex.adapters.hf import HFImageToTextGenerator
    from cyclex.demo.generators import DEMO_GENERATOR_NAMES, demo_generator_path

    if body not in DEMO_GENERATOR_NAMES:
        raise GeneratorSpecError(f"generator spec {spec!r}: unknown demo generator {body!r}; "
                                 f"known: {', '.join(DEMO_GENERATOR_NAMES)}")
    device = options.pop("device", None)
    batch_size = _to_int("batch_size", options.pop("batch_size", "64"), spec)
    if options:
        raise GeneratorSpecError(f"generator spec {spec!r}: demo generators take only device and batch_size")
    generator = HFImageToTextGenerator.from_pretrained(demo_generator_path(body), device=device,
                                                       batch_size=batch_size)
    generator.info = dataclasses.replace(generator.info, name=f"demo:{body}")
    return generator


def load_generator(spec: str) -> ReportGenerator:
    """Build a report generator from a one-string spec (see the module docstring)."""
    if not isinstance(spec, str) or ":" not in spec:
        raise GeneratorSpecError(f"generator spec {spec!r}: expected KIND:..., KIND one of hf, r2gen, "
                                 "r2gencmn, python, demo")
    kind, _, rest = spec.partition(":")
    kind = kind.strip().lower()
    parts = rest.split("::")
    if kind in ("r2gen", "r2gencmn"):
        options = parse_options("::".join(parts[3:]), spec=spec) if len(parts) > 3 else {}
        return _load_r2gen(kind, parts[:3], options, spec)
    body = parts[0].strip()
    options = parse_options("::".join(parts[1:]), spec=spec) if len(parts) > 1 else {}
    if not body:
        raise GeneratorSpecError(f"generator spec {spec!r}: nothing after {kind}:")
    if kind == "hf":
        return _load_hf(body, options, spec)
    if kind == "python":
        return _load_python(body, options, spec)
    if kind == "demo":
        return _load_demo(body, options, spec)
    raise GeneratorSpecError(f"generator spec {spec!r}: unknown kind {kind!r}; expected hf, r2gen, r2gencmn, "
                             "python or demo")
