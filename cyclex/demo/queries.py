"""The demo's query phantoms: the distribution `cyclex demo` and the benchmarks explain.

Apart from `run_demo.py` so that the demo's tailored-SD builder (`base_sd.py`, which trains on this
distribution) and the demo runner import it without importing each other.

`write_query_folder` writes them as a phantom folder whose records carry the true chest box as
`alignment_chest_box`: read back (by the demo, or by `cyclex explain --images FOLDER`), maps and
frames cover the whole image, so the marker outside the chest stays visible, and `cyclex evaluate`
still measures alignment inside the box (SPEC section 2).
"""

from __future__ import annotations

from cyclex.datasets.seed_registry import DEMO_QUERIES

DEMO_QUERY_SEED = DEMO_QUERIES.set_seed  # held out (cyclex.datasets.seed_registry)
DEMO_MARKER_RATE = 0.5


def demo_query_config(marker_rate: float = DEMO_MARKER_RATE):
    """The phantom config of the demo's queries: the generators' world (canonical reports) with the
    shortcut world's marker on about `marker_rate` of them, independent of the findings."""
    from dataclasses import replace

    from cyclex.datasets.phantom import ShortcutConfig
    from cyclex.demo.generators import DemoGeneratorConfig, phantom_config_for

    world = phantom_config_for(DemoGeneratorConfig(name="shortcut"))
    marker = ShortcutConfig(finding=world.shortcut.finding, rate_with_finding=marker_rate,
                            rate_without_finding=marker_rate, box=world.shortcut.box,
                            intensity=world.shortcut.intensity)
    return replace(world, shortcut=marker)


def demo_query_phantoms(n: int, seed: int = DEMO_QUERY_SEED, marker_rate: float = DEMO_MARKER_RATE) -> list:
    """n held-out phantoms drawn with `demo_query_config(marker_rate)`."""
    from cyclex.datasets.phantom import make_phantoms

    return make_phantoms(n, seed, demo_query_config(marker_rate))


def write_query_folder(phantoms, folder):
    """`write_phantom_folder(phantoms, folder)` with each record's chest box as `alignment_chest_box`."""
    import json
    from pathlib import Path

    from cyclex.atomic_io import write_text_atomic
    from cyclex.datasets.phantom import write_phantom_folder

    folder = write_phantom_folder(phantoms, Path(folder))
    metadata = folder / "metadata.jsonl"
    records = [json.loads(line) for line in metadata.read_text().splitlines() if line.strip()]
    for record in records:
        record["alignment_chest_box"] = record.pop("chest_box")
    write_text_atomic(metadata, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    return folder
