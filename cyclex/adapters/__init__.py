"""Report-generator adapters: everything cyclex explains is a `ReportGenerator`."""

from cyclex.adapters.base import (
    GeneratorError,
    GeneratorInfo,
    ReportGenerator,
    check_reports,
)
from cyclex.adapters.callable import CallableGenerator, generate_in_batches
from cyclex.adapters.hf import HFImageToTextGenerator
from cyclex.adapters.r2gen import R2GenCMNGenerator, R2GenGenerator
from cyclex.adapters.registry import GeneratorSpecError, load_generator
from cyclex.image_checks import check_image_batch

__all__ = [
    "CallableGenerator",
    "GeneratorError",
    "GeneratorInfo",
    "GeneratorSpecError",
    "HFImageToTextGenerator",
    "R2GenCMNGenerator",
    "R2GenGenerator",
    "ReportGenerator",
    "check_image_batch",
    "check_reports",
    "generate_in_batches",
    "load_generator",
]
