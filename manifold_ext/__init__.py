"""manifold_ext: rank model expansions by the size of their low-loss manifold.

The foundation is a set of fused ops that evaluate layers at B interpolated parameter points
``theta_b = sum_k coeffs[b, k] * theta_k`` in one batched pass, holding K instead of B weight copies.
"""

from ._build import build_info
from .ops import batched_cross_entropy, interp_linear, interp_linear_cross_entropy

__all__ = [
    "build_info",
    "interp_linear",
    "interp_linear_cross_entropy",
    "batched_cross_entropy",
]
__version__ = "0.1.0"
