"""A report generator guarded for a long run: every fault is a `GeneratorError`, a hang is cut short.

`GuardedGenerator(generator, timeout_s=...)` answers like the generator it wraps, but

- anything the wrapped `generate` raises (any exception, `SystemExit` from a user's `sys.exit()`)
  becomes a `GeneratorError` naming the generator; `KeyboardInterrupt` still stops the program;
- an answer that is not one string per image (None, a wrong count, non-strings) is a
  `GeneratorError` (`check_reports`), and so is an empty or whitespace-only report
  (`EmptyReportError`, with `refuse_empty`): labelling "" finds nothing, which would pass for a
  normal image;
- with `timeout_s`, a call that has not answered after that many seconds raises `GeneratorTimeout`.
  The call runs in a worker thread (a thread cannot be killed, so it is left to finish as a daemon);
  while it still runs, the next call waits up to `timeout_s` for it and is refused if it is still
  busy, so the wrapped model is never called twice at once.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from cyclex.adapters.base import GeneratorError, GeneratorInfo, check_reports


class GeneratorTimeout(GeneratorError):
    """A generator call that did not answer within the guard's timeout."""


class EmptyReportError(GeneratorError):
    """A generator answered an empty (or whitespace-only) report for an image."""


def as_generator_error(error: BaseException, name: str) -> GeneratorError:
    """`error` raised inside generator `name`'s code as a `GeneratorError` that says what happened."""
    if isinstance(error, GeneratorError):
        return error
    if isinstance(error, SystemExit):
        return GeneratorError(f"generator {name} called sys.exit({error.code!r}) (SystemExit from its code); "
                                 "a generator must return reports or raise an exception")
    return GeneratorError(f"generator {name} raised {type(error).__name__}: {error}")


class GuardedGenerator:
    """`generator` with its faults turned into `GeneratorError`s and an optional per-call timeout.

    timeout_s: seconds one `generate` call may take (None: no limit, the default: a slow GPU or a
    first call that compiles is not a fault). refuse_empty: an empty report is an `EmptyReportError`.
    """

    def __init__(self, generator, *, timeout_s: float | None = None, refuse_empty: bool = True) -> None:
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"generator timeout must be a positive number of seconds or None, got {timeout_s!r}")
        self.generator = generator
        self.info: GeneratorInfo = getattr(generator, "info", None) or GeneratorInfo(name=type(generator).__name__)
        self.timeout_s = None if timeout_s is None else float(timeout_s)
        self.refuse_empty = refuse_empty
        self._busy: threading.Thread | None = None  # a timed-out call still running

    def generate(self, images) -> list[str]:
        """images: what the wrapped generator takes ((B, 1, H, W) float in [0, 1]) -> B non-empty strings."""
        name = self.info.name
        expected = len(images)
        answer = self._call(images) if self.timeout_s is not None else self._call_here(images)
        reports = check_reports(answer, expected, generator=name)
        if self.refuse_empty:
            empty = [i for i, report in enumerate(reports) if not report.strip()]
            if empty:
                raise EmptyReportError(f"generator {name} returned an empty report for {len(empty)} of {expected} "
                                       f"images (positions {empty[:10]}); an empty report has no findings to "
                                       "explain or verify")
        return reports

    def _call_here(self, images) -> Any:
        try:
            return self.generator.generate(images)
        except KeyboardInterrupt:
            raise
        except BaseException as error:  # SystemExit too: user code must not end the run silently
            wrapped = as_generator_error(error, self.info.name)
            if wrapped is error:
                raise
            raise wrapped from error

    def _call(self, images) -> Any:
        name = self.info.name
        if self._busy is not None and self._busy.is_alive():
            self._busy.join(self.timeout_s)
            if self._busy.is_alive():
                raise GeneratorTimeout(f"generator {name} is still busy with a call that timed out earlier "
                                       f"(--generator-timeout {self.timeout_s:g} s); not called again until it ends")
        self._busy = None
        outcome: dict[str, Any] = {}
        grad_enabled = torch.is_grad_enabled()  # grad mode is per thread: the worker runs in the caller's

        def work() -> None:
            try:
                with torch.set_grad_enabled(grad_enabled):
                    outcome["answer"] = self.generator.generate(images)
            except BaseException as error:  # handed to the caller's thread below
                outcome["error"] = error

        worker = threading.Thread(target=work, name=f"cyclex-generator-{name}", daemon=True)
        worker.start()
        worker.join(self.timeout_s)
        if worker.is_alive():
            self._busy = worker
            raise GeneratorTimeout(f"generator {name} did not answer within {self.timeout_s:g} s for a batch of "
                                   f"{len(images)} images (--generator-timeout); it may hang on these images")
        if "error" in outcome:
            error = outcome["error"]
            wrapped = error if isinstance(error, KeyboardInterrupt) else as_generator_error(error, name)
            if wrapped is error:
                raise error
            raise wrapped from error
        return outcome.get("answer")

    def __repr__(self) -> str:
        return f"GuardedGenerator({self.generator!r}, timeout_s={self.timeout_s})"
