"""Wrap any Python function `images -> list[str]` as a report generator.

`generate_in_batches` is the one place where every adapter splits a batch, calls the model and
turns a failure or a malformed answer into a `GeneratorError` that names the generator and the batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from cyclex.adapters.base import GeneratorError, GeneratorInfo, check_reports
from cyclex.adapters.inputs import as_image_batch

logger = logging.getLogger(__name__)

ReportFunction = Callable[[torch.Tensor], "list[str]"]


def generate_in_batches(
    name: str, images, batch_size: int | None, generate_batch: ReportFunction,
    *, mixed_sizes_to: tuple[int, int] | None = None,
) -> list[str]:
    """Run `generate_batch` over `images` in chunks of `batch_size` (None = all at once).

    images: paths, PIL images, arrays or tensors (`cyclex.adapters.inputs`), turned here into
    (B, 1, H, W) (or a (B, V, 1, H, W) tensor of studies) float in [0, 1]. mixed_sizes_to: (H, W)
    images of different sizes are resized to (the model's input size; None refuses them).
    Returns B strings. Any exception raised by `generate_batch` (and `SystemExit`), or an answer that
    is not a list of one string per image, becomes a `GeneratorError` naming the generator and the
    failing chunk.
    """
    images = as_image_batch(images, views=True, size=mixed_sizes_to)
    total = images.shape[0]
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size}")
    step = total if not batch_size else batch_size
    reports: list[str] = []
    for batch_index, start in enumerate(range(0, total, max(step, 1))):
        chunk = images[start:start + step]
        where = (f"batch {batch_index} (images {start}..{start + chunk.shape[0] - 1} of {total}, "
                 f"shape {tuple(chunk.shape)})")
        try:
            answer = generate_batch(chunk)
        except GeneratorError as error:
            raise GeneratorError(f"{error} [{where}]") from error
        except Exception as error:  # any failure inside third-party model code: re-raise with context
            raise GeneratorError(f"generator {name} raised {type(error).__name__} on {where}: {error}") from error
        except SystemExit as error:  # sys.exit() in user code must not end cyclex silently
            raise GeneratorError(f"generator {name} called sys.exit({error.code!r}) on {where}; a generator must "
                                 "return reports or raise an exception") from error
        try:
            reports.extend(check_reports(answer, chunk.shape[0], generator=name))
        except GeneratorError as error:
            raise GeneratorError(f"{error} [{where}]") from None
    return reports


class CallableGenerator:
    """A report generator made from a plain function.

    fn: takes a float32 tensor (B, 1, H, W) (or (B, V, 1, H, W)) in [0, 1] and returns B strings;
        `generate` hands it that whatever it was given (paths, PIL images, arrays, tensors).
    info: what cyclex should know about it; default: name from the function, any input size.
    batch_size: call `fn` on chunks of at most this many images (None: the whole batch at once).
    """

    def __init__(self, fn: ReportFunction, info: GeneratorInfo | None = None, *, batch_size: int | None = None):
        if not callable(fn):
            raise TypeError(f"CallableGenerator needs a callable, got {type(fn).__name__}")
        self.fn = fn
        if info is None:
            qualname = getattr(fn, "__qualname__", type(fn).__name__)
            module = getattr(fn, "__module__", None)
            info = GeneratorInfo(name=f"python:{module}:{qualname}" if module else f"python:{qualname}",
                                 channels=1, mean=(0.0,), std=(1.0,))
        self.info = info
        self.batch_size = batch_size

    def generate(self, images) -> list[str]:
        """images: paths, PIL images, arrays or (B, 1, H, W) tensors in [0, 1] (`cyclex.adapters.inputs`)
        -> B report strings."""
        return generate_in_batches(self.info.name, images, self.batch_size, self.fn,
                                   mixed_sizes_to=self.info.input_size)

    def __repr__(self) -> str:
        return f"CallableGenerator({self.info.name!r})"
