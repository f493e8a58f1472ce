"""manifold_ext: rank model expansions by the size of their low-loss manifold.

The foundation is a set of fused ops that evaluate layers at B interpolated parameter points
``theta_b = sum_k coeffs[b, k] * theta_k`` in one batched pass, holding K instead of B weight
copies (:mod:`manifold_ext.ops`); on them, the engine that evaluates whole models at many points
(:mod:`manifold_ext.engine`), the probes (:mod:`manifold_ext.probes`), parameter-space geometry
(:mod:`manifold_ext.params`), growth operators (:mod:`manifold_ext.expand`), the manifold-size
estimators (:mod:`manifold_ext.manifold`) and the baseline metrics they compete with
(:mod:`manifold_ext.baselines`).
"""

from ._build import build_info
from .ops import batched_cross_entropy, interp_linear, interp_linear_cross_entropy
from . import baselines, data, engine, expand, manifold, params, probes  # noqa: E402  (after the kernels load)
from .engine import Evaluation, evaluate

__all__ = [
    "build_info",
    "interp_linear",
    "interp_linear_cross_entropy",
    "batched_cross_entropy",
    "evaluate",
    "Evaluation",
    "baselines",
    "data",
    "engine",
    "manifold",
    "expand",
    "params",
    "probes",
]
__version__ = "0.1.0"
