"""Pure-PyTorch references for every op: the oracle the tests compare the kernels against.

They materialise what the kernels avoid (B weight copies, the full logits), so they are only for
small inputs.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def _single(coeffs: Tensor) -> bool:
    return coeffs.dim() == 1


def interp_weights(weight: Tensor, bias: Optional[Tensor], coeffs: Tensor):
    """Materialised per-point weights ``(B, out, in)`` and biases ``(B, out)`` (or None)."""
    c = coeffs.reshape(-1, weight.shape[0]).to(weight.dtype)
    w = torch.einsum("bk,koi->boi", c, weight)
    b = None if bias is None else c @ bias
    return w, b


def interp_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], coeffs: Tensor) -> Tensor:
    """Reference for :func:`manifold_ext.interp_linear`."""
    w, b = interp_weights(weight, bias, coeffs)
    xb = x.unsqueeze(0) if x.dim() == 2 else x
    y = torch.matmul(xb, w.transpose(1, 2))
    if b is not None:
        y = y + b.unsqueeze(1)
    return y.squeeze(0) if _single(coeffs) else y


def batched_cross_entropy(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Reference for :func:`manifold_ext.batched_cross_entropy`."""
    single = logits.dim() == 2
    lg = logits.unsqueeze(0) if single else logits
    B, N, C = lg.shape
    t = target.expand(B, N) if target.dim() == 1 else target
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    lf = lg.to(acc)
    loss = F.cross_entropy(lf.reshape(B * N, C), t.reshape(B * N), reduction="none")
    loss_sum = loss.reshape(B, N).sum(1)
    correct = (lf.argmax(-1) == t).sum(1)
    if single:
        return loss_sum.squeeze(0), correct.squeeze(0)
    return loss_sum, correct


def interp_linear_cross_entropy(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], coeffs: Tensor, target: Tensor
) -> tuple[Tensor, Tensor]:
    """Reference for :func:`manifold_ext.interp_linear_cross_entropy`."""
    return batched_cross_entropy(interp_linear(x, weight, bias, coeffs), target)
