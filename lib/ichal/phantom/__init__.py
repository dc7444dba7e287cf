"""Synthetic head-CT generator with exact hemorrhage labels and simulated annotator seconds.

DESIGN.md "Data": realistic anatomy and look-alikes, five acute bleed kinds, NIfTI/JSON/DICOM pool writers;
`python -m ichal.phantom --out DIR --count N --size S --seed K` makes a pool.
"""

from ichal.phantom.annotator import LabelFeatures, label_features, simulated_annotator_seconds
from ichal.phantom.bleeds import BLEED_KINDS
from ichal.phantom.generator import (
    GENERATOR_VERSION,
    PhantomError,
    PhantomStack,
    RenderedStack,
    generate_pool,
    generate_stack,
    render_stack,
    stack_seed,
)
from ichal.phantom.writers import choose_labeled, write_pool, write_stack

__all__ = [
    "BLEED_KINDS",
    "GENERATOR_VERSION",
    "LabelFeatures",
    "PhantomError",
    "PhantomStack",
    "RenderedStack",
    "generate_pool",
    "generate_stack",
    "label_features",
    "render_stack",
    "simulated_annotator_seconds",
    "stack_seed",
    "choose_labeled",
    "write_pool",
    "write_stack",
]
