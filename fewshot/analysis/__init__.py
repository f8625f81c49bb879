"""What the paper uses to explain ACDC: the cross-layer joint subspace of aligned atom coefficients (Sec. 3.2,
:mod:`~fewshot.analysis.subspace`) and class activation maps at every layer (Fig. 8, :mod:`~fewshot.analysis.cam`).

Modules: ``rank`` (effective rank), ``svcca`` (SVCCA), ``sublayers`` (the atom and coefficient sub-layers of an
ACDC conv), ``subspace`` (the measurement), ``subspace_report`` (its files), ``network`` (the analyzed network:
built, trained with ``fit``, or loaded), ``images`` (held-out images), ``cam`` (Grad-CAM at every layer),
``cam_models`` (classifiers from checkpoints), ``cam_plot`` (the grid), ``*_command`` and ``cli`` (the command line).
"""

from fewshot.analysis.rank import effective_rank, spectrum_effective_rank
from fewshot.analysis.subspace import aligned_coefficients, analyze_model, analyze_pair
from fewshot.analysis.svcca import SVCCA, svcca, svd_reduce

__all__ = [
    "effective_rank",
    "spectrum_effective_rank",
    "SVCCA",
    "svcca",
    "svd_reduce",
    "aligned_coefficients",
    "analyze_pair",
    "analyze_model",
]
