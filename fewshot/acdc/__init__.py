"""ACDC: convolutions as per-layer filter atoms combined by atom coefficients shared across layers,
blocks or filter groups ("A Joint Subspace View to Convolutional Neural Networks").

Main entry points: :func:`convert` (any ``nn.Module`` -> ACDC, in place), :func:`expand` (relax sharing /
add atoms, same function), :class:`ACDCConv2d`, :data:`SCOPES`.
"""

from fewshot.acdc.blocks import default_example_input, infer_blocks
from fewshot.acdc.convert import GROUPED_SCOPES, SCOPES, convert
from fewshot.acdc.expand import expand
from fewshot.acdc.layer import ACDCConv2d, SharedCoefficients, channel_shuffle, hold_atom_masks
from fewshot.acdc.params import PARAMETER_KINDS, acdc_convs, acdc_named_parameters, acdc_parameters, count_parameters
from fewshot.acdc.reference import reconstruct_kernel, two_sublayer_forward

__all__ = [
    "SCOPES",
    "GROUPED_SCOPES",
    "convert",
    "expand",
    "ACDCConv2d",
    "SharedCoefficients",
    "channel_shuffle",
    "hold_atom_masks",
    "acdc_convs",
    "acdc_named_parameters",
    "acdc_parameters",
    "count_parameters",
    "PARAMETER_KINDS",
    "reconstruct_kernel",
    "two_sublayer_forward",
    "infer_blocks",
    "default_example_input",
]
