"""Generator faults in a run folder: one failing batch is logged and retried later, never the run's end.

`run_explainer` guards the explainer's generator for the run (`guarded_generator`: every fault a
`GeneratorError`, empty reports refused, an optional per-call timeout), explains each batch through
`explain_isolating_faults` (a batch the generator fails on is explained again image by image, so
only the images it fails on are errors; a timeout is not retried, it would hang again), and lists
the failed images in ``RUN/skipped.jsonl`` (`SkippedItems`): one line per image with its id, image,
stage and error. A failed image is not marked complete, so a rerun redoes it, and its line goes once
it succeeds. Lines of other stages (images that could not be read) are kept as they are.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from cyclex.adapters.base import GeneratorError
from cyclex.adapters.guarded import GeneratorTimeout, GuardedGenerator
from cyclex.atomic_io import write_text_atomic
from cyclex.file_names import printable_text

logger = logging.getLogger(__name__)

SKIPPED_NAME = "skipped.jsonl"
GENERATOR_STAGE = "generator"
IMAGE_STAGE = "image"  # the query could not be read or is too small to explain

Item = TypeVar("Item")


@contextmanager
def guarded_generator(explainer, timeout_s: float | None = None) -> Iterator[GuardedGenerator]:
    """For the `with` block, `explainer` (and a maker that verifies its own candidates, the search)
    calls its generator through a `GuardedGenerator`; the original is put back afterwards."""
    original = explainer.generator
    guard = GuardedGenerator(original, timeout_s=timeout_s)
    explainer.generator = guard
    explainer.maker.bind_cycle(guard, explainer.labeler, explainer.uncertain_as_present)
    try:
        yield guard
    finally:
        explainer.generator = original
        explainer.maker.bind_cycle(original, explainer.labeler, explainer.uncertain_as_present)


def explain_isolating_faults(chunk: Sequence[Item], explain_part: Callable[[Sequence[Item]], Any],
                             ) -> list[tuple[Sequence[Item], Any, GeneratorError | None]]:
    """[(part, results, None) or (part, None, error)] covering `chunk`: the chunk at once, or, when the
    generator fails on it (other than by a timeout), each item alone."""
    try:
        return [(chunk, explain_part(chunk), None)]
    except GeneratorTimeout as error:
        return [(chunk, None, error)]
    except GeneratorError as error:
        if len(chunk) == 1:
            return [(chunk, None, error)]
        logger.warning("the generator failed on a batch of %d images (%s); explaining them one by one",
                       len(chunk), error)
    parts: list[tuple[Sequence[Item], Any, GeneratorError | None]] = []
    for item in chunk:
        try:
            parts.append(([item], explain_part([item]), None))
        except GeneratorError as error:
            parts.append(([item], None, error))
    return parts


class SkippedItems:
    """The images of a run folder that failed, as ``RUN/skipped.jsonl`` lists them (id -> line)."""

    def __init__(self, out: str | Path) -> None:
        self.path = Path(out) / SKIPPED_NAME
        self.lines: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            for number, text in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
                if not text.strip():
                    continue
                try:
                    line = json.loads(text)
                    self.lines[str(line["id"])] = line
                except (json.JSONDecodeError, KeyError, TypeError):
                    logger.warning("%s line %d is not a skipped-item line; dropped", self.path, number)

    def add(self, record: Mapping[str, Any], stage: str, error: BaseException) -> None:
        image = record.get("image")
        # paths and messages may hold a non-UTF-8 file name: written printable, like the ids
        self.lines[str(record["id"])] = {"id": str(record["id"]),
                                         "image": printable_text(image) if isinstance(image, str) else None,
                                         "stage": stage, "error_type": type(error).__name__,
                                         "error": printable_text(str(error))}

    def clear(self, image_id: str, stage: str = GENERATOR_STAGE) -> None:
        """The image succeeded at `stage`: its line of that stage goes."""
        line = self.lines.get(str(image_id))
        if line is not None and line.get("stage") == stage:
            del self.lines[str(image_id)]

    def of_stage(self, stage: str) -> list[dict[str, Any]]:
        return [line for line in self.lines.values() if line.get("stage") == stage]

    def write(self) -> Path | None:
        """Write the list (atomically); with nothing listed, the file goes."""
        if not self.lines:
            self.path.unlink(missing_ok=True)
            return None
        return write_text_atomic(self.path, "".join(json.dumps(line, sort_keys=True) + "\n"
                                                    for line in self.lines.values()))


def read_skipped(out: str | Path) -> list[dict[str, Any]]:
    """The lines of ``RUN/skipped.jsonl`` (none when the file is missing)."""
    return list(SkippedItems(out).lines.values())
