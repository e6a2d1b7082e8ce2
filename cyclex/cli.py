"""The `cyclex` command line: a thin layer over the Python API (typer + rich)."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path

import typer

from cyclex.specs.generator_options import spec_options_help

ATTENTION_CONTROL_VARIANTS = ("nti", "negative-prompt", "direct")  # the makers with P2P processors
# Built-in variants the search can drive: it makes its candidates with the maker's invert() and edit();
# rse's region edit happens in make(), which the search never calls, so searching it would be plain DDIM.
SEARCHABLE_VARIANTS = ("ddim", "nti", "negative-prompt", "direct")
GENERATOR_HELP = f"generator spec, one of: {spec_options_help()}"
TAILORED_HELP = ("tailored Stable Diffusion: a folder written by `cyclex train-tailored --out`, or demo:clean / "
                 "demo:shortcut (the demo's, shipped with the package; see the README)")

# Python spellings in library messages -> what a command-line user types instead
_CLI_SPELLINGS = (
    ("(or pass backbone_weights=PATH); use random_backbone=True only for tests", "(or pass --lpips alex:PATH)"),
    ("backbone_weights=PATH", "--lpips alex:PATH"),
    ("(or pass weights_path=PATH)", "(or pass --classifier xrv:WEIGHTS::PATH / --encoder xrv:WEIGHTS::PATH)"),
    ("pass search=True", "pass --search"),
    ("image_size (--resize / --image-size)", "--image-size"),
    ("resize='pad' or 'crop' with image_size (--resize / --image-size)", "--resize pad or --resize crop"),
)
_EXPLAIN_FLAGS = {"ExplainSettings.steps": "--steps", "ExplainSettings.guidance": "--guidance",
                  "ExplainSettings.strength": "--strength", "ExplainSettings.batch_size": "--batch-size",
                  "ExplainSettings.image_size": "--image-size", "ExplainSettings.resize": "--resize",
                  "ExplainSettings.difference_reference": "--difference-reference",
                  "FrameSettings.threshold": "--frame-threshold", "FrameSettings.map_blur": "--map-blur",
                  "SearchGrid.required_score": "--required-score", "SearchGrid.strengths": "--search-strengths",
                  "SearchGrid.guidance_batch_size": "--search-guidance-batch",
                  "SearchGrid.early_stop": "--search-early-stop",
                  "difference_reference='reconstruction'": "--difference-reference reconstruction",
                  "(use difference_reference='query')": "(use --difference-reference query)"}
_TRAIN_FLAGS = {"TailoredTrainingConfig.max_train_steps": "--max-steps", "TailoredTrainingConfig.resolution":
                "--resolution", "TailoredTrainingConfig.train_batch_size": "--batch-size",
                "TailoredTrainingConfig.learning_rate": "--learning-rate",
                "TailoredTrainingConfig.checkpointing_steps": "--checkpointing-steps",
                "TailoredTrainingConfig.num_inversion_steps": "--inversion-steps",
                "TailoredTrainingConfig.lr_warmup_steps": "--warmup-steps",
                "TailoredTrainingConfig.latent_cache_dir": "--latent-cache-dir", "prompt_source": "--prompt-source",
                "max_failed_fraction": "--max-failed-fraction", "batch_size must be": "--generation-batch-size must be"}


def for_the_command_line(message: str, flags: dict[str, str] | None = None) -> str:
    """A library error message with Python argument names replaced by the command's flags."""
    for python, flag in (*_CLI_SPELLINGS, *(flags or {}).items()):
        message = message.replace(python, flag)
    return message


def interrupted(console, out: Path, runs: tuple[str, ...] = ()) -> None:
    """Ctrl-C: one line saying what finished and that the same command resumes; exit code 130."""
    folders = [out / name for name in runs] or [out]
    done = sum(len(list((folder / "records").glob("*/_complete.json"))) for folder in folders)
    console.print(f"interrupted: {done} image{'s' if done != 1 else ''} finished in {out}; rerun the same command "
                  "to resume (finished images are kept)", soft_wrap=True)
    raise typer.Exit(code=130)


def parse_maker_options(options: list[str]) -> dict:
    """--maker-option KEY=VALUE texts -> maker keyword arguments (true/false, ints, floats, else text)."""
    parsed: dict = {}
    for option in options:
        key, sep, text = option.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise ValueError(f"--maker-option must be KEY=VALUE with KEY a setting name, got {option!r}")
        text = text.strip()
        value: object = text
        if text.lower() in ("true", "false"):
            value = text.lower() == "true"
        else:
            for kind in (int, float):
                try:
                    value = kind(text)
                    break
                except ValueError:
                    continue
        parsed[key] = value
    return parsed

app = typer.Typer(help="cyclex: cyclic counterfactual explanations for chest X-ray report generators.",
                  no_args_is_help=True, add_completion=False)


class DifferenceReference(str, Enum):
    """What `explain` differences the counterfactual against (see `CyclicExplainer`)."""

    query = "query"
    reconstruction = "reconstruction"


class FitMode(str, Enum):
    """How `explain` fits queries to the tailored SD's side (see `cyclex.cycle.image_fit`)."""

    pad = "pad"
    crop = "crop"
    stretch = "stretch"
    none = "none"


@app.callback()
def main(
    verbose: bool = typer.Option(False, "--verbose", help="also show the model libraries' progress bars, "
                                 "warnings and info logs (hidden by default)"),
) -> None:
    """cyclex command line."""
    for stream in (sys.stdout, sys.stderr):  # a non-UTF-8 file name in a message prints as \xNN, never fails
        if callable(getattr(stream, "reconfigure", None)):
            stream.reconfigure(errors="backslashreplace")
    if not verbose:
        from cyclex.third_party_output import quiet_third_party_output

        quiet_third_party_output()


@app.command()
def evaluate(
    run: str = typer.Argument(..., help="run folder written by the cyclic engine (results.jsonl, summary.json)"),
    annotations: str = typer.Option(None, "--annotations", help="mask PNG folder (ID__slug.png, .npy heatmaps), "
                                    "MS-CXR box CSV or REFLACX ellipse CSV; used where items have no mask_png"),
    classifier: str = typer.Option("auto", "--classifier", help="CPG classifier: 'auto' (demo runs: the phantom "
                                   "classifier; others: torchxrayvision DenseNet when its weights are here), "
                                   "'xrv:WEIGHTS[::PATH]', 'phantom[:DIR]' or 'none'"),
    encoder: str = typer.Option("auto", "--encoder", help="encoder of the CLIP criterion: 'auto' (demo runs: the "
                                "stand-in; others: CLIP from the Hugging Face cache), 'clip:PATH_OR_ID', "
                                "'classifier', 'xrv:WEIGHTS[::PATH]', 'phantom[:DIR]' or 'none'"),
    lpips: str = typer.Option("auto", "--lpips", help="'auto' (demo runs: the stand-in; others: AlexNet from "
                              "torch's cache), 'alex[:PATH]', 'vgg[:PATH]', 'stand-in' or 'none'"),
    thresholds: str = typer.Option(None, "--thresholds", help="cf_thresholds.json calibrated for these scorers "
                                   "(default: the demo's calibration for demo runs, seed 000 Table 2 otherwise)"),
    map_kind: str = typer.Option("positive", "--map", help="'positive' (max(F - CF, 0), seed 000) or 'absolute'"),
    figures: bool = typer.Option(True, "--figures/--no-figures", help="draw the seed-000 figures into RUN/figures"),
) -> None:
    """Score a run's counterfactuals and maps: RUN/metrics.jsonl, summary.json["metrics"], RUN/figures/.

    Scorers are the phantom stand-ins only for runs of a demo generator ('demo:...' in the run's
    settings); any other run needs real scorers (or 'none', reported unavailable).
    """
    import contextlib
    import json
    import logging

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from cyclex.cycle.run_ownership import RunFolderError, inspect_run_folder, locked_run_folder
    from cyclex.explain.evaluate_run import EvaluationConfig, evaluate_run
    from cyclex.specs.scorers import is_demo_generator_spec, load_scorers

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    console = Console()
    try:
        config_path = Path(run) / "run_config.json"
        generator = json.loads(config_path.read_text()).get("generator") if config_path.is_file() else None
        scorers = load_scorers(classifier, encoder, lpips, thresholds, demo=is_demo_generator_spec(generator or ""))
        if not Path(run).is_dir():
            raise FileNotFoundError(f"{Path(run) / 'results.jsonl'} not found: {run} is not a run folder")
        try:  # its metrics and figures go into the run: one writer at a time in a folder cyclex owns
            inspect_run_folder(run)
            hold = locked_run_folder(run)
        except RunFolderError:  # results laid out by hand (no marker, no run_config.json): evaluated unlocked
            hold = contextlib.nullcontext()
        with hold:
            summary = evaluate_run(run, classifier=scorers.classifier, encoder=scorers.encoder, lpips=scorers.lpips,
                                   annotations=annotations, scorer_provenance=scorers.describe(),
                                   config=EvaluationConfig(map_kind=map_kind, draw_figures=figures,
                                                           thresholds=scorers.thresholds,
                                                           not_applicable=scorers.not_applicable))
    except (FileNotFoundError, ValueError, RunFolderError) as error:
        console.print(f"[red]error:[/red] {escape(str(error))}")
        raise typer.Exit(code=1) from None
    table = Table(title=f"cyclex evaluate {run}")
    table.add_column("metric")
    table.add_column("all")
    table.add_column("verified")
    keys = ["l1", "l2", "ssim", "lpips", "clip_cosine", "cpg", "fet", "full/ncc", "full/auc", "full/auc_smoothed",
            "full/auc_iou", "boundary/auc", "mass_outside_chest_box"]
    for key in keys:
        values = [summary[group]["mean"].get(key) for group in ("all", "verified")]
        if any(v is not None for v in values):
            table.add_row(key, *("-" if v is None else f"{v:.4f}" for v in values))
    for key in ("cf_score_mean", "acceptance_rate"):
        values = [summary[group].get(key) for group in ("all", "verified")]
        if any(v is not None for v in values):
            table.add_row(key, *("-" if v is None else f"{v:.3f}" for v in values))
    table.add_row("items", str(summary["all"]["count"]), str(summary["verified"]["count"]))
    console.print(table)
    acceptance = summary["all"].get("acceptance")
    if acceptance and acceptance["undetermined"]:
        low, high = acceptance["bounds"]
        console.print(f"acceptance undetermined for {acceptance['undetermined']} of {acceptance['n']} items "
                      f"(between {low:.3f} and {high:.3f})")
    for name, counts in (summary["all"].get("criteria") or {}).items():
        if counts["unavailable"] or counts["not_applicable"]:
            console.print(f"criterion {name}: unavailable {counts['unavailable']}/{counts['n']}, "
                          f"not applicable {counts['not_applicable']}/{counts['n']}")
    if scorers.not_applicable:
        console.print(f"not applicable: {', '.join(scorers.not_applicable)} (seed 000's Table 2 thresholds belong to "
                      "CLIP and real LPIPS); calibrate thresholds for these scorers with "
                      "`python scripts/calibrate_cf_thresholds.py` and pass --thresholds FILE")
    for role, described in summary["provenance"]["scorers"].items():
        if isinstance(described, dict) and "role" in described:
            console.print(f"{role}: {escape(str(described.get('name') or described.get('note')))}")
    for name, path in summary.get("figures", {}).items():
        console.print(f"figure {name}: {run}/{path}")


@app.command()
def phantoms(
    n: int = typer.Option(100, "--n", help="number of phantoms"),
    size: int = typer.Option(64, "--size", help="image side in pixels (32-512)"),
    seed: int = typer.Option(0, "--seed", help="set seed; phantom i uses seed * 1e6 + i"),
    shortcut: str = typer.Option(None, "--shortcut", help="spurious marker FINDING:RATE[:x,y,w,h] (box in image fractions)"),
    shortcut_without: float = typer.Option(0.0, "--shortcut-without", help="marker rate on phantoms WITHOUT the finding"),
    report_style: str = typer.Option("varied", "--report-style", help="'varied' or 'canonical'"),
    attributes: bool = typer.Option(False, "--attributes/--no-attributes", help="patient age and sex as causal "
                                    "parents of anatomy and findings, recorded in metadata.jsonl (default off: "
                                    "phantoms identical to those the demo models were trained on)"),
    out: str = typer.Option(..., "--out", help="output folder (images/, masks/, metadata.jsonl)"),
) -> None:
    """Write synthetic chest X-rays with masks, chest boxes, reports and labels (the phantom world)."""
    from dataclasses import replace

    from rich.console import Console

    from cyclex.datasets.phantom import PhantomConfig, ShortcutConfig, make_phantoms, write_phantom_folder

    console = Console()
    try:
        shortcut_config = None
        if shortcut:
            shortcut_config = replace(ShortcutConfig.parse(shortcut), rate_without_finding=shortcut_without)
        config = PhantomConfig(size=size, shortcut=shortcut_config, report_style=report_style, attributes=attributes)
        items = make_phantoms(n, seed, config)
        folder = write_phantom_folder(items, out)
    except ValueError as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(code=1) from None
    normal = sum(not p.findings_meta for p in items)
    marked = sum(p.shortcut for p in items)
    console.print(f"wrote {len(items)} phantoms ({normal} normal, {marked} with the shortcut marker) to {folder}")


class Engine(str, Enum):
    accelerate = "accelerate"
    ray = "ray"


def command_line_of(ctx: typer.Context, drop: tuple[str, ...] = ()) -> list[str]:
    """The options the user gave this command (defaults left out), as arguments that repeat the call."""
    args = [ctx.info_name or ctx.command.name]
    for param in ctx.command.params:
        # typer may bring its own copy of click: options are told by their kind, sources by their name
        if param.name in drop or getattr(param, "param_type_name", "") != "option":
            continue
        source = ctx.get_parameter_source(param.name)
        if source is None or source.name in ("DEFAULT", "DEFAULT_MAP"):
            continue
        value = ctx.params[param.name]
        if param.is_flag:
            if param.secondary_opts:
                args.append(param.opts[0] if value else param.secondary_opts[0])
            elif value:
                args.append(param.opts[0])
            continue
        for item in (value if param.multiple else [value]):
            if item is not None:
                args.extend([param.opts[0], str(item.value if isinstance(item, Enum) else item)])
    return args


@app.command()
def explain(
    ctx: typer.Context,
    generator: str = typer.Option(..., "--generator", help=GENERATOR_HELP),
    tailored: str = typer.Option(..., "--tailored", help=TAILORED_HELP),
    images: str = typer.Option(..., "--images", help="folder of images, phantom folder (metadata.jsonl) or CSV"),
    out: str = typer.Option(..., "--out", help="run folder (created; re-running resumes)"),
    findings: list[str] = typer.Option(None, "--findings", help="only remove these findings (repeat the option or separate by commas)"),
    variant: str = typer.Option("ddim", "--variant", help="counterfactual maker (registered variant name)"),
    steps: int = typer.Option(50, "--steps", help="DDIM steps T"),
    guidance: float = typer.Option(7.5, "--guidance", help="classifier-free guidance omega"),
    strength: float = typer.Option(1.0, "--strength", help="denoising strength delta in (0, 1]"),
    checkpoint: str = typer.Option("best_psnr", "--checkpoint", help="best_psnr | best_l1 | best_l2 | final | subfolder"),
    batch_size: int = typer.Option(8, "--batch-size", help="images per engine batch"),
    labeler: str = typer.Option("rules", "--labeler", help="'rules', 'chexbert:PATH[::TOKENIZER]' or python:mod:attr"),
    frame_threshold: str = typer.Option("stable", "--frame-threshold", help="L on 0-255, or 'stable'"),
    frame_normalize: bool = typer.Option(True, "--frame-normalize/--no-frame-normalize",
                                         help="stretch |I - CF| to a maximum of 255 before thresholding (default: "
                                         "on, so a faint verified edit still gets a frame; --no-frame-normalize "
                                         "thresholds on the paper's absolute 0-255 scale)"),
    map_blur: int = typer.Option(5, "--map-blur", help="Gaussian kernel (odd) smoothing the positive difference "
                                 "map, as the frame is smoothed; 1 keeps the raw max(I - CF, 0)"),
    image_size: int = typer.Option(None, "--image-size", help="side every query is fitted to (default: the "
                                   "tailored SD's resolution, from its cyclex_tailored.json)"),
    resize: FitMode = typer.Option(FitMode.pad, "--resize", case_sensitive=False,
                                   help="how queries of another size or shape are fitted: pad (keep the aspect "
                                   "ratio, pad the short side), crop (keep it, centre-crop the long side), "
                                   "stretch, or none (use them as they come); maps and frames are also drawn "
                                   "on the original image (difference_original.png, frame_original.png)"),
    estimate_chest_box: bool = typer.Option(False, "--estimate-chest-box/--no-estimate-chest-box",
                                            help="mask maps to an Otsu chest box when the input gives none"),
    difference_reference: DifferenceReference = typer.Option(
        DifferenceReference.query, "--difference-reference", case_sensitive=False,
        help="difference the counterfactual against the query (I - CF, the paper) or against the maker's own "
             "redraw of the query with its source prompt (R - CF: hides what the VAE / sampler cannot reproduce)"),
    device: str = typer.Option(None, "--device", help="torch device for the tailored SD"),
    overwrite: bool = typer.Option(False, "--overwrite", help="start over: empty the run folder (one cyclex made) first"),
    search: bool = typer.Option(False, "--search/--no-search", help="metric-guided search over inference settings "
                                "per finding (seed 000 Algorithm 1, made cheap); variants "
                                f"{', '.join(SEARCHABLE_VARIANTS)}"),
    required_score: int = typer.Option(5, "--required-score", help="search: CF_Score (0-5) a counterfactual needs"),
    thresholds: str = typer.Option(None, "--thresholds", help="search: cf_thresholds.json (default: the demo's "
                                   "calibration for demo generators, seed 000 Table 2 otherwise)"),
    classifier: str = typer.Option("auto", "--classifier", help="search: 'auto', 'phantom[:DIR]', 'xrv:WEIGHTS[::PATH]'"),
    encoder: str = typer.Option("auto", "--encoder", help="search: 'auto', 'classifier', 'clip:PATH_OR_ID', 'xrv:...'"),
    lpips: str = typer.Option("auto", "--lpips", help="search: 'auto', 'stand-in', 'alex[:PATH]', 'vgg[:PATH]', 'none'"),
    search_checkpoints: str = typer.Option("best_l2,best_l1", "--search-checkpoints", help="search: checkpoints"),
    search_strengths: str = typer.Option("1.0,0.9,0.8", "--search-strengths", help="search: denoising strengths"),
    search_guidances: str = typer.Option("7,8,9,10", "--search-guidances", help="search: guidance scales"),
    null_settings: str = typer.Option("negative-prompt,direct,default,underfit", "--null-settings",
                                      help="search: null settings (negative-prompt, direct, default, underfit)"),
    attention_control: str = typer.Option("none", "--attention-control",
                                          help="prompt-to-prompt attention control of the edit: none | refine | replace "
                                          "| reweight (variants nti, negative-prompt, direct)"),
    local_blend: bool = typer.Option(True, "--local-blend/--no-local-blend",
                                     help="with --attention-control: keep the latent outside the removed finding's "
                                     "cross-attention region (P2P LocalBlend)"),
    search_guidance_batch: int = typer.Option(0, "--search-guidance-batch", min=0,
                                              help="search: guidances per UNet batch (0: all at once; 1: one by one, "
                                              "stopping at the first accepted, fewest UNet evaluations)"),
    search_early_stop: str = typer.Option(None, "--search-early-stop", help="search: AFTER:BELOW, give up on a "
                                          "finding unless one of its first AFTER attempts reaches CF_Score BELOW "
                                          "(e.g. 1:3, the rule benchmarks/search.py fitted on validation seeds)"),
    causal_model: str = typer.Option(None, "--causal-model", help="--variant causal: a causal model folder "
                                     "(`cyclex train-causal`), or 'demo' for the shipped 64 px phantom model"),
    instruct_model: str = typer.Option(None, "--instruct-model", help="--variant instruct | instruct-rse: the "
                                       "InstructPix2Pix-style editor, a saved pipeline folder, a hub id, or 'demo' "
                                       "(the shipped demo editor)"),
    maker_option: list[str] = typer.Option(None, "--maker-option", help="KEY=VALUE setting of the variant's maker, "
                                           "repeatable; e.g. for --variant rse: tau=0.2, relevance_draws=8, "
                                           "relevance_strength=0.5, prior=none, paste_query_outside_mask=true"),
    generator_timeout: float = typer.Option(None, "--generator-timeout", min=0.001,
                                            help="seconds one generator call (a batch of images) may take before "
                                            "its images are listed as failed in RUN/skipped.jsonl (default: no "
                                            "limit; a first GPU call may be slow)"),
    generator_version: str = typer.Option(None, "--generator-version", help="version of the generator's code or "
                                          "weights, part of the resume key (default: a sha256 of the weight files "
                                          "of hf:FOLDER and r2gen: specs; python: callables need it to tell a "
                                          "fixed function from the old one)"),
    num_processes: int = typer.Option(1, "--num-processes", min=1,
                                      help="processes (one per GPU) that share the images: >1 runs `accelerate "
                                      "launch` on this machine (--engine accelerate) or as many Ray workers "
                                      "(--engine ray); the run folder, results and resume are the same"),
    engine: Engine = typer.Option(Engine.accelerate, "--engine", case_sensitive=False,
                                  help="accelerate (default; several nodes: `accelerate launch ... -m cyclex "
                                  "explain`) or ray (Ray Data map_batches; pip install cyclex[ray])"),
    ray_num_gpus: float = typer.Option(0.0, "--ray-num-gpus", min=0.0,
                                       help="--engine ray: GPUs each Ray worker holds (0: CPU workers)"),
    ray_address: str = typer.Option(None, "--ray-address", help="--engine ray: a running Ray cluster "
                                    "(default: a local Ray instance started for the run)"),
) -> None:
    """Remove each finding, make the counterfactual, regenerate, verify; write frames into a run folder.

    Images the generator fails on (it raises, exits, hangs past --generator-timeout, or answers an
    empty or malformed report) are listed in RUN/skipped.jsonl and not marked done: a rerun retries
    them; the command then ends with exit code 1.
    """
    import logging

    from rich.console import Console
    from rich.markup import escape

    from cyclex.adapters import GeneratorError
    from cyclex.cycle.run_folder import RunFolderError, run_explain
    from cyclex.cycle.settings import ExplainSettings, FrameSettings, SearchGrid
    from cyclex.findings import UnknownFindingError
    from cyclex.specs.generators import load_generator

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    console = Console()
    from cyclex.cycle.distributed import world_size_of_this_launch

    if engine is Engine.accelerate and num_processes > 1 and world_size_of_this_launch() == 1:
        import subprocess

        from cyclex.cycle.distributed import accelerate_launch_command

        # the same command on N processes; rank 0 prints the summary and writes the report
        command = accelerate_launch_command(command_line_of(ctx, drop=("num_processes",)), num_processes)
        raise typer.Exit(code=subprocess.call(command))
    state = None
    if world_size_of_this_launch() > 1:  # one process of `accelerate launch`: join the group before loading models
        from cyclex.cycle.distributed import process_state

        state = process_state()
    main_process = state is None or state.is_main_process
    try:
        try:
            threshold = frame_threshold if frame_threshold == "stable" else float(frame_threshold)
        except ValueError:
            raise ValueError(f"--frame-threshold must be a number on 0-255 or 'stable', got {frame_threshold!r}") from None
        names = [name.strip() for value in (findings or []) for name in value.split(",") if name.strip()]
        # 1. What can be refused from the options alone is refused before any model is loaded
        check_variant(variant, search=search, difference_reference=difference_reference.value)
        from cyclex.specs.tailored import generator_mismatch, resolve_tailored

        tailored = str(resolve_tailored(tailored))
        mismatch = generator_mismatch(tailored, generator)
        if mismatch and main_process:
            console.print(f"[yellow]warning:[/yellow] {mismatch}")
        search_grid, scorer = None, None
        if search:
            from cyclex.specs.scorers import is_demo_generator_spec, search_scorer_from_specs
            from cyclex.specs.search_grid import early_stop_from_text, search_kwargs_from_text

            search_grid = SearchGrid(**search_kwargs_from_text(search_checkpoints, search_strengths, search_guidances,
                                                               null_settings, required_score),
                                     guidance_batch_size=search_guidance_batch or None,
                                     early_stop=early_stop_from_text(search_early_stop))
            # the application decides from the spec that a demo generator gets the phantom stand-ins
            scorer = search_scorer_from_specs(classifier, encoder, lpips, thresholds,
                                              demo=is_demo_generator_spec(generator))
        maker_kwargs = parse_maker_options(maker_option or [])
        if attention_control != "none":
            from cyclex.counterfactuals.attention_control import AttentionControlConfig

            if variant not in ATTENTION_CONTROL_VARIANTS:
                raise ValueError(f"--attention-control needs --variant {' | '.join(ATTENTION_CONTROL_VARIANTS)}, "
                                 f"got --variant {variant}")
            maker_kwargs["attention_control"] = AttentionControlConfig(mode=attention_control, local_blend=local_blend)
        if causal_model:
            from cyclex.demo.packaged import PACKAGED_DIR

            maker_kwargs["causal_model"] = str(PACKAGED_DIR / "causal") if causal_model == "demo" else causal_model
        if instruct_model:
            from cyclex.demo.instruct_model import resolve_instruct_model

            maker_kwargs["instruct_model"] = resolve_instruct_model(instruct_model)
        settings = ExplainSettings(
            variant=variant, checkpoint=checkpoint, steps=steps, guidance=guidance, strength=strength,
            findings=tuple(names) or None, batch_size=batch_size, image_size=image_size, resize=resize.value,
            difference_reference=difference_reference.value, device=device, search=search_grid,
            frames=FrameSettings(threshold=threshold, normalize=frame_normalize, map_blur=map_blur,
                                 estimate_chest_boxes=estimate_chest_box),
        )
        from cyclex.specs.generator_fingerprint import generator_version as version_of

        run_kwargs = dict(settings=settings, labeler_spec=labeler, generator_spec=generator, maker_kwargs=maker_kwargs,
                          scorer=scorer, overwrite=overwrite, generator_timeout_s=generator_timeout,
                          generator_version=version_of(generator, generator_version))
        if engine is Engine.ray:
            from functools import partial

            from cyclex.cycle.ray_engine import run_explain_ray

            summary = run_explain_ray(partial(load_generator, generator), tailored, images, out,
                                      num_workers=num_processes, num_gpus=ray_num_gpus, address=ray_address,
                                      **run_kwargs)
        elif state is not None:
            from cyclex.cycle.distributed import run_explain_distributed

            summary = run_explain_distributed(load_generator(generator), tailored, images, out, state=state,
                                              **run_kwargs)
        else:
            summary = run_explain(load_generator(generator), tailored, images, out, **run_kwargs)
    except KeyboardInterrupt:
        interrupted(console, Path(out))
    except (FileNotFoundError, ValueError, KeyError, TypeError, RunFolderError, UnknownFindingError,
            GeneratorError, OSError) as error:  # OSError: unreadable weights, a full disk (they name the file)
        message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
        rank = "" if state is None else f" (process {state.process_index} of {state.num_processes})"
        console.print(f"[red]error{rank}:[/red] {for_the_command_line(str(message), _EXPLAIN_FLAGS)}")
        raise typer.Exit(code=1) from None
    if summary is None:  # another process of the launch: its shard is written, rank 0 merges and reports
        return
    rate = summary["cyclic_rate"]
    console.print(f"Cyclic Rate {'-' if rate is None else f'{rate:.3f}'} "
                  f"({summary['n_verified']}/{summary['n']} findings, {summary['n_images']} images)")
    if search:
        accepted, attempted = search_acceptance(out)
        console.print(f"search: {accepted}/{attempted} counterfactuals accepted (CF_Score >= {required_score} and the "
                      "cycle verified)" + ("" if accepted == attempted else
                                           f"; the other {attempted - accepted} are the best candidate the search "
                                           "found, marked 'search: not accepted' in the report, and count in the "
                                           "Cyclic Rate above"))
    for finding, entry in summary["per_finding"].items():
        console.print(f"  {finding}: {entry['cyclic_rate']:.3f} ({entry['n_verified']}/{entry['n']})")
    from cyclex.cycle.report_html import write_run_report

    page = write_run_report(out)
    console.print(f"results: {out}/results.jsonl, summary: {out}/summary.json, report: {page}")
    if search:
        console.print(f"search: {out}/search_attempts.jsonl (every attempt), {out}/search_ablation.json")
    if summary.get("n_images_skipped"):
        from cyclex.cycle.generator_faults import IMAGE_STAGE, SKIPPED_NAME, SkippedItems

        unreadable = SkippedItems(out).of_stage(IMAGE_STAGE)
        for line in unreadable[:10]:
            console.print(f"[yellow]skipped:[/yellow] {escape(line['id'])}: {escape(line['error'])}")
        console.print(f"[yellow]skipped {len(unreadable)} of {summary['n_images']} images[/yellow] (unreadable or too "
                      f"small): listed in {escape(str(Path(out) / SKIPPED_NAME))}")
    if summary.get("n_images_failed"):
        from cyclex.cycle.generator_faults import GENERATOR_STAGE, SKIPPED_NAME, SkippedItems

        failed = SkippedItems(out).of_stage(GENERATOR_STAGE)
        for line in failed[:10]:
            console.print(f"[red]failed:[/red] {escape(line['id'])}: {escape(line['error'])}")
        console.print(f"[red]the generator failed on {len(failed)} of {summary['n_images']} images[/red]: listed "
                      f"in {escape(str(Path(out) / SKIPPED_NAME))}, not marked done; rerun the same command to "
                      "retry them")
        raise typer.Exit(code=1)


def check_variant(variant: str, *, search: bool, difference_reference: str) -> None:
    """Refuse, naming the flags, what `explain` would only find out after loading its models."""
    from cyclex.counterfactuals import BUILTIN_MAKERS, get_maker_factory

    try:
        get_maker_factory(variant)
    except KeyError as error:
        raise ValueError(f"--variant: {error.args[0]}") from None
    if not search:
        return
    if variant.strip().lower() in BUILTIN_MAKERS and variant.strip().lower() not in SEARCHABLE_VARIANTS:
        raise ValueError(f"--search cannot search --variant {variant}: the search makes its candidates with the "
                         "maker's invert() and edit(), which would skip this variant's own edit; use --variant "
                         f"{' | '.join(SEARCHABLE_VARIANTS)}, or drop --search")
    if difference_reference == "reconstruction":
        raise ValueError("--search picks settings per finding, so no single reconstruction matches its "
                         "counterfactuals: use --difference-reference query with --search")


def search_acceptance(out: str | Path) -> tuple[int, int]:
    """(accepted, attempted) searched counterfactuals of a run folder's results."""
    import json

    lines = [json.loads(x) for x in (Path(out) / "results.jsonl").read_text().splitlines() if x.strip()]
    details = [line.get("maker_details") or {} for line in lines]
    return sum(bool(d.get("accepted")) for d in details), len(details)


@app.command("train-tailored")
def train_tailored_command(
    generator: str = typer.Option(..., "--generator", help=GENERATOR_HELP),
    images: str = typer.Option(..., "--images", help="the generator's training images: a folder (phantom folder or "
                               "image files) or a CSV with image[, id, report] columns"),
    base: str = typer.Option(..., "--base", help="base Stable Diffusion: a local diffusers folder or a hub id"),
    out: str = typer.Option(..., "--out", help="output folder of the tailored SD"),
    prompt_source: str = typer.Option("generated", "--prompt-source", help="'generated' (CVLM) or 'ground-truth'"),
    labeler: str = typer.Option("rules", "--labeler", help="'rules' or 'chexbert:PATH[::TOKENIZER_DIR]'"),
    template: str = typer.Option("cvlm", "--template", help="prompt template: 'cvlm' or 'prism'"),
    max_steps: int = typer.Option(None, "--max-steps", help="training steps (default: the config's 100k)"),
    resolution: int = typer.Option(None, "--resolution", help="image side in pixels (default 512)"),
    batch_size: int = typer.Option(None, "--batch-size", help="training batch per process (default 8)"),
    learning_rate: float = typer.Option(None, "--learning-rate", help="default 5e-5"),
    checkpointing_steps: int = typer.Option(None, "--checkpointing-steps", help="default 5000"),
    generation_batch_size: int = typer.Option(16, "--generation-batch-size", help="images per generator call"),
    inversion_steps: int = typer.Option(None, "--inversion-steps", help="DDIM steps T of checkpoint selection (default 50)"),
    warmup_steps: int = typer.Option(None, "--warmup-steps", min=0, help="lr warm-up steps (default: 5 % of "
                                     "--max-steps, at most 500)"),
    max_failed_fraction: float = typer.Option(0.01, "--max-failed-fraction", min=0.0, max=1.0,
                                              help="refuse the data set when more than this share of the images "
                                              "fail in the generator or the image reader (listed in "
                                              "OUT/dataset/failures.jsonl)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="start over: delete the tailored run already in --out "
                                   "(needed when it was made with another generator, base or settings)"),
    select: bool = typer.Option(True, "--select/--no-select", help="run checkpoint selection after training"),
    latent_cache_dir: str = typer.Option(None, "--latent-cache-dir", help="encode the VAE latents once into this "
                                         "folder (resumable, shared by later runs of the same data) and train from it"),
) -> None:
    """Build the tailored data set from the generator's own reports, train the tailored SD, select checkpoints.

    For several GPUs or nodes, train the built data set with
    `accelerate launch -m cyclex.tailored_training --manifest OUT/dataset/manifest.jsonl --base ... --out ...`.
    """
    import contextlib
    import dataclasses
    import json
    import logging
    from pathlib import Path

    from rich.console import Console

    from cyclex.atomic_io import remove_stale_temp_files
    from cyclex.labelers import load_labeler
    from cyclex.run_lock import FolderLock, FolderLockedError
    from cyclex.specs.generators import load_generator
    from cyclex.tailored_training import (
        TailoredTrainingConfig,
        build_tailored_dataset,
        check_base_model,
        read_image_source,
        select_checkpoints,
        train_tailored,
    )
    from cyclex.tailored_training.run_identity import check_training_run, training_identity

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    console = Console()
    held = contextlib.ExitStack()
    overrides = {"max_train_steps": max_steps, "resolution": resolution, "train_batch_size": batch_size,
                 "learning_rate": learning_rate, "checkpointing_steps": checkpointing_steps,
                 "num_inversion_steps": inversion_steps, "lr_warmup_steps": warmup_steps,
                 "latent_cache_dir": latent_cache_dir, "precompute_latents": True if latent_cache_dir else None}
    try:
        config = dataclasses.replace(TailoredTrainingConfig(), **{k: v for k, v in overrides.items() if v is not None})
        check_base_model(base)
        if Path(out).exists() and not Path(out).is_dir():
            raise FileExistsError(f"--out {out} is a file; expected a folder for the tailored SD")
        Path(out).mkdir(parents=True, exist_ok=True)
        # one trainer per folder: a second one (or an --overwrite) would mix checkpoints of two runs
        held.enter_context(FolderLock(out))
        remove_stale_temp_files(out)  # what writes killed in an earlier run of this folder left behind
        # before anything else is written: --out is this run's, the same run resumed, or refused
        check_training_run(out, training_identity(generator, base, config), overwrite=overwrite)
        records = read_image_source(images)
        manifest = build_tailored_dataset(load_generator(generator), records, load_labeler(labeler),
                                          Path(out) / "dataset", batch_size=generation_batch_size,
                                          prompt_source=prompt_source, template=template,
                                          max_failed_fraction=max_failed_fraction)
        described = json.loads((Path(out) / "dataset" / "dataset.json").read_text())
        if described.get("n_failed"):
            console.print(f"[yellow]skipped {described['n_failed']} of {described['n_failed'] + described['n_images']} "
                          f"images[/yellow] (generator or reader failures): {Path(out) / 'dataset' / 'failures.jsonl'}")
        result = train_tailored(manifest, base, out, config, generator_spec=generator)
        console.print(f"trained {result.global_step} steps ({result.images_per_s:.1f} images/s) -> {out}")
        if select:
            selection = select_checkpoints(out)
            console.print(f"best PSNR: {selection['best_psnr']}  best L1: {selection['best_l1']}  "
                          f"best L2: {selection['best_l2']}")
    except (ValueError, FileNotFoundError, FileExistsError, FolderLockedError) as err:
        console.print(f"[red]error:[/red] {for_the_command_line(str(err), _TRAIN_FLAGS)}")
        raise typer.Exit(code=2) from err
    finally:
        held.close()


@app.command("train-causal")
def train_causal_command(
    images: str = typer.Option(..., "--images", help="phantom folder with attributes (`cyclex phantoms --attributes`): "
                               "metadata.jsonl gives each image's age, sex and findings, the model's parents"),
    out: str = typer.Option(..., "--out", help="output folder: one causal model folder per arm, recipe.json"),
    recipe: str = typer.Option("tiny", "--recipe", help="'tiny' (64 px, CPU, minutes) or 'paper' (192 px, the "
                               "paper's widths and optimiser; run under `accelerate launch`)"),
    arms: list[str] = typer.Option(None, "--arms", help="baseline, expert, expert_al_10, expert_al_20, expert_al_30 "
                                   "(repeatable; default all)"),
    expert: str = typer.Option("phantom", "--expert", help="expert classifier of the expert term: 'phantom[:DIR]' "
                               "(the demo's stand-in), 'xrv:WEIGHTS[::PATH]' (torchxrayvision) or 'none' (baseline only)"),
    accelerate: bool = typer.Option(False, "--accelerate/--no-accelerate", help="train through accelerate.Accelerator "
                                    "(set by `accelerate launch`: several GPUs, mixed precision)"),
) -> None:
    """Train seed 004's causal HVAE arms (ELBO, counterfactual training, expert term, active learning)."""
    import logging

    from rich.console import Console

    console = Console()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        import cv2
        import numpy as np
        import torch
        import torch.nn.functional as F

        from cyclex.causal.expert import DifferentiableExpert, xrv_expert
        from cyclex.causal.recipe import ARMS, paper_recipe, tiny_recipe, train_causal_arms
        from cyclex.datasets.phantom import read_phantom_folder

        if recipe not in ("tiny", "paper"):
            raise ValueError(f"--recipe must be 'tiny' or 'paper', got {recipe!r}")
        chosen = tiny_recipe() if recipe == "tiny" else paper_recipe()
        records = read_phantom_folder(images)
        schema, side = chosen.hvae.schema, chosen.hvae.image_size
        pixels = []
        for record in records:
            image = cv2.imread(record["image"], cv2.IMREAD_GRAYSCALE)
            if image is None:
                raise ValueError(f"--images: cannot read {record['image']}")
            pixels.append(image.astype(np.float32) / 255.0)
        tensor = torch.from_numpy(np.stack(pixels))[:, None]
        if tuple(tensor.shape[-2:]) != (side, side):
            tensor = F.interpolate(tensor, size=(side, side), mode="area")
        parents = torch.stack([schema.from_record(record) for record in records])
        expert_model = None
        if expert.startswith("phantom"):
            from cyclex.demo.phantom_classifier import load_phantom_classifier

            _, _, folder = expert.partition(":")
            classifier = load_phantom_classifier(folder or None, train_if_missing=False)
            expert_model = DifferentiableExpert(classifier.net, classifier.class_names,
                                                name="phantom classifier (stand-in for torchxrayvision)")
        elif expert.startswith("xrv:"):
            from cyclex.explain.effectiveness import XRVClassifier

            weights, _, path = expert[4:].partition("::")
            expert_model = xrv_expert(XRVClassifier(weights, weights_path=path or None))
        elif expert != "none":
            raise ValueError(f"--expert must be 'phantom[:DIR]', 'xrv:WEIGHTS[::PATH]' or 'none', got {expert!r}")
        accelerator = None
        if accelerate:
            from accelerate import Accelerator

            accelerator = Accelerator()
        report = train_causal_arms(tensor, parents, chosen, out, expert=expert_model, arms=tuple(arms or ARMS),
                                   accelerator=accelerator, metadata={"images": str(Path(images).resolve()),
                                                                      "recipe": recipe, "expert": expert})
    except (FileNotFoundError, ValueError, KeyError) as error:
        console.print(f"[red]error:[/red] {error.args[0] if isinstance(error, KeyError) and error.args else error}")
        raise typer.Exit(code=1) from None
    console.print(f"trained {', '.join(report['arms'])} in {report['seconds']:.0f} s: {out}")


@app.command("label")
def label_command(
    reports_csv: str = typer.Argument(..., help="CSV file with one free-text report per row"),
    column: str = typer.Option("report", "--column", help="name of the report text column"),
    labeler: str = typer.Option("rules", "--labeler", help="'rules' or 'chexbert:PATH/chexbert.pth[::TOKENIZER_DIR]'"),
    out: str = typer.Option(..., "--out", help="labels CSV to write: the report column + 14 findings (1/0/-1/blank)"),
    encoding: str = typer.Option("utf-8", "--encoding", help="text encoding of the reports CSV (a UTF-8 BOM is "
                                 "ignored), e.g. latin-1 or cp1252 for files saved by older spreadsheets"),
) -> None:
    """Label free-text reports with CheXbert's 14 findings, written as a CheXpert-style CSV.

    Cells are read as text (NaN / None stay words); invisible bidi and zero-width characters are
    removed before labelling; report cells starting with =, +, -, @ are written with a leading '.
    """
    import logging

    from rich.console import Console
    from rich.markup import escape

    from cyclex.labelers.registry import label_csv

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        labels = label_csv(reports_csv, out, column=column, labeler=labeler, encoding=encoding)
    except (FileNotFoundError, KeyError, ValueError, TypeError, OSError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
        Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {escape(str(message))}")
        raise typer.Exit(code=2) from None
    positives = sum(len(row.present(uncertain_as_present=False)) for row in labels)
    Console().print(f"labelled {len(labels)} reports ({positives} positive findings) -> {out}")


@app.command("generate")
def generate_command(
    generator: str = typer.Argument(..., help=GENERATOR_HELP),
    images: list[str] = typer.Argument(..., help="X-ray files (PNG, JPEG, DICOM, ...)"),
    out: str = typer.Option(None, "--out", help="CSV to write (image, report); default: print"),
    batch_size: int = typer.Option(16, "--batch-size", help="images per generator call"),
) -> None:
    """Run a report generator over image files; unreadable files are listed and skipped."""
    import numpy as np
    import torch
    from rich.console import Console
    from rich.markup import escape

    from cyclex.adapters import GeneratorError
    from cyclex.atomic_io import write_bytes_atomic
    from cyclex.csv_text import csv_bytes
    from cyclex.datasets.images import MIN_IMAGE_SIDE, ImageReadError, read_image, resize_image
    from cyclex.specs.generators import load_generator

    errors = Console(stderr=True, soft_wrap=True)
    try:
        model = load_generator(generator)
    except (GeneratorError, ValueError, FileNotFoundError, OSError) as error:
        errors.print(f"[red]error:[/red] {escape(str(error))}")
        raise typer.Exit(code=2) from None
    size = model.info.input_size or (256, 256)
    readable, failed = [], []
    for path in images:
        try:
            image = read_image(path)
            if min(image.shape) < MIN_IMAGE_SIDE:  # scaled up, it would be a flat grey with a report of its own
                raise ImageReadError(f"{path}: the image is {image.shape[1]} x {image.shape[0]} pixels; cyclex "
                                     f"reads images of at least {MIN_IMAGE_SIDE} x {MIN_IMAGE_SIDE}")
            readable.append((path, resize_image(image, size)))
        except ImageReadError as error:
            failed.append(path)
            errors.print(f"[red]skipped:[/red] {escape(str(error))}")
    rows = []
    for start in range(0, len(readable), batch_size):
        chunk = readable[start:start + batch_size]
        batch = torch.from_numpy(np.stack([image for _, image in chunk]))[:, None]
        try:
            reports = model.generate(batch)
        except GeneratorError as error:
            errors.print(f"[red]error:[/red] {escape(str(error))} (files: {', '.join(p for p, _ in chunk)})")
            failed.extend(p for p, _ in chunk)
            continue
        rows.extend(zip([p for p, _ in chunk], reports, strict=True))
    if out:
        # file names and reports a spreadsheet would run as formulas get a leading '; OS file names
        # that are not UTF-8 are written back as their own bytes
        write_bytes_atomic(out, csv_bytes(["image", "report"], rows, text_columns=[0, 1], errors="surrogateescape"))
        Console().print(f"{len(rows)} reports -> {escape(out)}")
    else:
        for path, report in rows:
            Console().print(f"[bold]{escape(path)}[/bold]: {escape(report)}")
    if failed:
        raise typer.Exit(code=1)


@app.command("demo")
def demo_command(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Run folder of the demo."),
    n_images: int = typer.Option(16, "--n", min=1, help="Held-out phantoms to explain."),
    steps: int = typer.Option(50, "--steps", min=1, help="DDIM steps of inversion and sampling."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over instead of resuming."),
    difference_reference: DifferenceReference | None = typer.Option(
        None, "--difference-reference", case_sensitive=False,
        help="Maps against the query (I - CF) or the tiny SD's redraw of it (R - CF); default: the demo's choice."),
) -> None:
    """Explain 16 phantoms with the `clean` and `shortcut` demo generators and compare them."""
    import logging

    from rich.console import Console
    from rich.table import Table

    from cyclex.demo.run_demo import run_demo

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    console = Console()
    console.print("[bold]cyclex demo[/bold]: building or loading the demo models (cached after the first run)")
    from cyclex.cycle.run_folder import RunFolderError

    try:
        extra = {} if difference_reference is None else {"difference_reference": difference_reference.value}
        comparison = run_demo(out, n_images=n_images, steps=steps, overwrite=overwrite, **extra)
    except KeyboardInterrupt:
        interrupted(console, Path(out), runs=("clean", "shortcut"))
    except RunFolderError as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(code=2) from None
    table = Table(title=f"Cycle on {comparison['n_images']} held-out phantoms")
    table.add_column("generator")
    table.add_column("findings removed", justify="right")
    table.add_column("cyclic rate", justify="right")
    table.add_column("Cardiomegaly frames on the marker", justify="right")
    for name, entry in comparison["generators"].items():
        marker = entry["cardiomegaly_frames_on_marker"]
        rate = "-" if marker["overlap_rate"] is None else f"{marker['n_overlapping']}/{marker['n_frames_with_marker']}"
        cyclic = "-" if entry["cyclic_rate"] is None else f"{entry['cyclic_rate']:.2f}"
        table.add_row(name, str(entry["n_findings"]), cyclic, rate)
    console.print(table)
    audit = comparison.get("audit")
    if audit is not None:
        for flag in audit["shortcut_flags"] or [None]:
            if flag is None:
                console.print("audit: no shortcut flagged")
            else:
                console.print(f"audit: [bold]{flag['generator']}[/bold]'s {flag['finding']} evidence sits at one place "
                              f"where the finding cannot be in {flag['n_consistent_outside']} of {flag['n_items']} "
                              f"images, box {flag['suspected_box']} (shortcut flag; see {audit['page']})")
    console.print(f"open {out.resolve() / 'comparison.html'} in a browser (side-by-side audit); "
                  f"per generator: index.html, results.jsonl, summary.json, items/")
    console.print(f"took {comparison['seconds']:.0f} s")


BASELINE_HELP = ("gradcam: Grad-CAM of the generator's image encoder on the teacher-forced log-probability of the "
                 "finding's words in its report, shown beside the frames (pip install 'cyclex[gradcam]')")


def run_generators(runs: dict[str, Path]) -> dict:
    """Each run's generator, loaded from the spec its run_config.json records."""
    import json

    from cyclex.specs.generators import load_generator

    generators = {}
    for name, run in runs.items():
        config = Path(run) / "run_config.json"
        spec = json.loads(config.read_text()).get("generator") if config.is_file() else None
        if not spec or ":" not in str(spec):
            raise ValueError(f"{config}: no generator spec recorded (field 'generator'); the baseline needs the "
                             "run's generator")
        generators[name] = load_generator(str(spec))
    return generators


@app.command("report")
def report_command(
    runs: list[Path] = typer.Argument(..., help="run folder(s) written by `cyclex explain` / `cyclex demo`"),
    out: Path = typer.Option(None, "--out", help="HTML file to write (default: RUN/index.html for one run; "
                             "comparison.html in the runs' common folder for several)"),
    highlight: bool = typer.Option(True, "--highlight/--no-highlight",
                                   help="mark the findings' mentions in the reports (rule labeler)"),
    baseline: str = typer.Option(None, "--baseline", help=BASELINE_HELP),
) -> None:
    """Write an HTML report of a run folder, or a side-by-side comparison page of several runs."""
    import logging

    from rich.console import Console
    from rich.markup import escape

    from cyclex.cycle.report_html import (
        RunReportError,
        default_comparison_path,
        run_names,
        write_comparison_report,
        write_run_report,
    )
    from cyclex.cycle.run_ownership import RunFolderError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    console = Console()
    mentions = "rules" if highlight else None
    try:
        if baseline:
            from cyclex.cycle.audit_baselines import check_baseline, write_baselines

            check_baseline(baseline)
            write_baselines(baseline, run_names(runs), run_generators(run_names(runs)))
        if len(runs) == 1:
            page = write_run_report(runs[0], out, mentions=mentions)
        else:
            named = run_names(runs)
            for run in runs:  # each run's own page, linked from the comparison
                console.print(f"run report: {escape(str(write_run_report(run, mentions=mentions)))}")
            page = write_comparison_report(named, out or default_comparison_path(runs), mentions=mentions)
    except (RunReportError, RunFolderError, ValueError, FileNotFoundError, ImportError, TypeError) as error:
        console.print(f"[red]error:[/red] {escape(str(error))}")
        raise typer.Exit(code=1) from None
    console.print(f"report: {escape(str(page))} (open it in a browser: file://{escape(str(page.resolve()))})")


@app.command("audit")
def audit_command(
    runs: list[Path] = typer.Argument(None, help="finished run folders to audit (or use --generator / --tailored)"),
    out: Path = typer.Option(..., "--out", help="audit folder: audit.json, audit.html, overlays/ (and runs/)"),
    generator: list[str] = typer.Option(None, "--generator", help="generator spec, repeated (one per --tailored)"),
    tailored: list[str] = typer.Option(None, "--tailored", help="tailored SD folder of each --generator, in order"),
    images: str = typer.Option(None, "--images", help="query folder / phantom folder / CSV: explained with every "
                               "--generator; with run folders, only read for the images' chest boxes"),
    steps: int = typer.Option(50, "--steps", help="DDIM steps T (with --generator)"),
    guidance: float = typer.Option(7.5, "--guidance", help="classifier-free guidance omega (with --generator)"),
    checkpoint: str = typer.Option("best_psnr", "--checkpoint", help="tailored checkpoint (with --generator)"),
    frame_normalize: bool = typer.Option(False, "--frame-normalize/--no-frame-normalize",
                                         help="stretch |I - CF| to a maximum of 255 before thresholding"),
    overwrite: bool = typer.Option(False, "--overwrite", help="start the generators' run folders over"),
    baseline: str = typer.Option(None, "--baseline", help=BASELINE_HELP),
) -> None:
    """Compare generators on the same images: Cyclic Rates with intervals, frame agreement, shortcut flags."""
    import logging

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from cyclex.cycle.audit_report import audit_generators, audit_runs
    from cyclex.cycle.report_html import run_names
    from cyclex.cycle.run_folder import RunFolderError, load_image_records
    from cyclex.cycle.settings import ExplainSettings, FrameSettings

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    console = Console()
    try:
        from cyclex.cycle.audit_baselines import check_baseline

        check_baseline(baseline)
        if runs and generator:
            raise ValueError("give either run folders or --generator/--tailored, not both")
        if generator:
            if len(generator) != len(tailored or []) or len(generator) < 2:
                raise ValueError(f"--generator and --tailored must be given in pairs, at least two: got "
                                 f"{len(generator)} --generator and {len(tailored or [])} --tailored")
            if not images:
                raise ValueError("--generator needs --images (the queries every generator explains)")
            from cyclex.specs.generators import load_generator

            names = [spec.split(":", 1)[-1].replace("/", "_") or spec for spec in generator]
            if len(set(names)) != len(names):
                names = [f"{i}_{name}" for i, name in enumerate(names)]
            settings = ExplainSettings(steps=steps, guidance=guidance, checkpoint=checkpoint,
                                       frames=FrameSettings(normalize=frame_normalize))
            audit = audit_generators({n: (load_generator(g), t) for n, g, t in zip(names, generator, tailored, strict=True)},
                                     images, out, settings, generator_specs=dict(zip(names, generator, strict=True)),
                                     overwrite=overwrite, baseline=baseline)
        elif runs and len(runs) >= 2:
            boxes = None
            if images:
                boxes = {str(r["id"]): r["chest_box"] for r in load_image_records(images) if r.get("chest_box")}
            audit = audit_runs(run_names(runs), out, chest_boxes=boxes, baseline=baseline,
                               generators=run_generators(run_names(runs)) if baseline else None)
        else:
            raise ValueError("an audit needs at least two run folders, or --generator/--tailored pairs with --images")
    except (FileNotFoundError, ValueError, KeyError, RunFolderError, ImportError, TypeError) as error:
        console.print(f"[red]error:[/red] {escape(str(error))}")
        raise typer.Exit(code=1) from None
    names = audit["names"]
    table = Table(title=f"cyclex audit: {' vs '.join(names)} ({audit['n_shared_images']} shared images)")
    table.add_column("finding", no_wrap=True)
    for name in names:
        table.add_column(f"{name} rate, 95 % CI, n", justify="right", no_wrap=True)
    table.add_column("NCC/IoU", justify="right", no_wrap=True)
    table.add_column("shortcut", no_wrap=True)
    for finding, entry in audit["findings"].items():
        cells = []
        for name in names:
            rate = entry["rates"][name]
            cells.append("-" if rate["cyclic_rate"] is None else
                         f"{rate['cyclic_rate']:.2f} {rate['ci95'][0]:.2f}-{rate['ci95'][1]:.2f} {rate['n']}")
        agreement = next(iter(entry["frame_agreement"].values()))
        agree = "-" if agreement["mean_ncc"] is None else f"{agreement['mean_ncc']:.2f} / {agreement['mean_iou']:.2f}"
        flagged = [f"{name} {entry['shortcut'][name]['n_consistent_outside']}/{entry['shortcut'][name]['n_items']}"
                   for name in names if entry["shortcut"][name]["flagged"]]
        table.add_row(escape(finding), *[escape(c) for c in cells], agree, escape(", ".join(flagged)) or "-")
    console.print(table)
    for flag in audit["shortcut_flags"]:
        console.print(f"[bold red]shortcut:[/bold red] {escape(flag['generator'])}'s {escape(flag['finding'])} relies on "
                      f"something at {flag['suspected_box']} outside the finding's prior in "
                      f"{flag['n_consistent_outside']} of {flag['n_items']} images (S lower 95 % bound "
                      f"{flag['statistic_ci95'][0]:.2f} > {flag['threshold']:g}); overlay {escape(str(flag['overlay_png']))}")
    console.print(f"audit: {escape(audit['files']['json'])}, page: {escape(audit['files']['html'])}")
