"""Report-generator adapters: everything cyclex explains is a `ReportGenerator`.

The models-and-data layer: wrappers of Hugging Face, R2Gen / R2GenCMN and plain callables. Building
one from a one-string spec ("hf:DIR", "r2gen:...", "demo:clean") is the application layer's job:
`cyclex.specs.generators.load_generator`.
"""

from cyclex.adapters.base import (
    GeneratorError,
    GeneratorInfo,
    ReportGenerator,
    check_reports,
)
from cyclex.adapters.callable import CallableGenerator, generate_in_batches
from cyclex.adapters.hf import HFImageToTextGenerator
from cyclex.adapters.inputs import as_image_batch
from cyclex.adapters.r2gen import R2GenCMNGenerator, R2GenGenerator
from cyclex.image_checks import check_image_batch

__all__ = [
    "CallableGenerator",
    "GeneratorError",
    "GeneratorInfo",
    "HFImageToTextGenerator",
    "R2GenCMNGenerator",
    "R2GenGenerator",
    "ReportGenerator",
    "as_image_batch",
    "check_image_batch",
    "check_reports",
    "generate_in_batches",
]
