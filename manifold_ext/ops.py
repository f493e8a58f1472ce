"""Typed wrappers over ``torch.ops.manifold_ext``, with their fake, autograd and vmap rules.

Notation: K vertices ``weight[k]`` (shape ``(K, out, in)``), B points with coefficients
``coeffs[b, k]``; point b uses ``W_b = sum_k coeffs[b, k] * weight[k]`` (affine combinations,
extrapolation allowed), built on the fly by the kernels and never materialised for all b.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _build  # noqa: F401  (loads the kernels into torch.ops)

_ops = torch.ops.manifold_ext


def interp_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], coeffs: Tensor) -> Tensor:
    """A linear layer evaluated at B interpolated parameter points.

    Args:
        x: ``(B, N, in)``, one input per point, or ``(N, in)``, one input shared by all points
            (e.g. the first layer; then the K vertex outputs are computed once and mixed, which is
            exact for a linear layer and costs K instead of B products).
        weight: ``(K, out, in)`` vertex weights.
        bias: ``(K, out)`` vertex biases, or None.
        coeffs: ``(B, K)`` coefficients, or ``(K,)`` for a single point (then x is ``(N, in)``
            and the result ``(N, out)``).

    Returns:
        ``(B, N, out)``: ``y[b] = x[b] @ W_b^T + bias_b``.

    Differentiable in x, weight, bias and coeffs; works under ``torch.func.vmap`` over rows of
    coeffs, ``torch.compile`` and ``torch.library.opcheck``. Float32/float64 on CPU; also
    bfloat16/float16 on CUDA (accumulating in float32).
    """
    return _ops.interp_linear.default(x, weight, bias, coeffs)


def interp_linear_cross_entropy(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], coeffs: Tensor, target: Tensor
) -> tuple[Tensor, Tensor]:
    """A classifier layer and its cross-entropy, fused, at B interpolated parameter points.

    The ``(B, N, classes)`` logits are never held in memory beyond a chunk of classes (online
    log-sum-exp), so vocabularies of tens of thousands of classes cost little memory.

    Args:
        x, weight, bias, coeffs: as in :func:`interp_linear` (weight is ``(K, classes, in)``).
        target: ``(N,)`` class indices shared by every point, or ``(B, N)``; int64 in
            ``[0, classes)``.

    Returns:
        ``(loss_sum, correct)``, each of shape ``(B,)`` (``()`` for coeffs of shape ``(K,)``):
        the summed cross-entropy over the N examples (float32, or float64 for float64 inputs)
        and the number of examples whose argmax prediction equals the target (int64).
        Differentiable in x, weight, bias and coeffs through ``loss_sum``.

    Non-finite logits: an example whose logits' log-sum-exp is not finite (a NaN or +inf logit,
    or every logit -inf) has loss NaN (so its point's ``loss_sum`` is NaN) and is never counted
    correct; a -inf logit among finite ones is an ordinary zero probability (loss +inf when it is
    the target's). Every device and route, and ``engine="loop"``, follow this rule.
    """
    loss_sum, correct, _ = _ops.interp_linear_cross_entropy.default(x, weight, bias, coeffs, target)
    return loss_sum, correct


def batched_cross_entropy(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Per-point summed cross-entropy and correct count from materialised logits.

    Args:
        logits: ``(B, N, classes)``, or ``(N, classes)`` for one point.
        target: ``(N,)`` shared by every point, or ``(B, N)``; int64 in ``[0, classes)``.

    Returns:
        ``(loss_sum, correct)`` of shape ``(B,)`` (``()`` for 2-D logits), as in
        :func:`interp_linear_cross_entropy`, with its rule for non-finite logits.
        Differentiable in logits through ``loss_sum``.
    """
    loss_sum, correct, _ = _ops.batched_cross_entropy.default(logits, target)
    return loss_sum, correct


# ----------------------------------------------------------------------------- fake kernels


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _points_shape(x: Tensor, coeffs: Tensor) -> tuple[int, ...]:
    return () if coeffs.dim() == 1 else (coeffs.shape[0],)


def _check_devices(op: str, x: Tensor, **others: Optional[Tensor]) -> None:
    for name, t in others.items():
        torch._check(
            t is None or t.device == x.device,
            lambda: f"{op}: expected {name} on device {x.device} (the device of x), but got {t.device}",
        )


@torch.library.register_fake("manifold_ext::interp_linear")
def _interp_linear_fake(x, weight, bias, coeffs):
    _check_devices("interp_linear", x, weight=weight, bias=bias, coeffs=coeffs)
    torch._check(weight.dim() == 3, lambda: "interp_linear: expected weight of shape (K, out, in)")
    torch._check(x.shape[-1] == weight.shape[2], lambda: "interp_linear: x and weight disagree on in")
    n = x.shape[-2]
    return x.new_empty((*_points_shape(x, coeffs), n, weight.shape[1]))


def _grads_fake(x, weight, bias, coeffs, mask):
    def maybe(flag, like, shape=None):
        if not flag:
            return like.new_empty((0,))
        return like.new_empty(shape if shape is not None else like.shape)

    gb_shape = tuple(bias.shape) if bias is not None else None
    return (
        maybe(mask[0], x),
        maybe(mask[1], weight),
        maybe(mask[2] and bias is not None, weight, gb_shape),
        maybe(mask[3], coeffs),
    )


@torch.library.register_fake("manifold_ext::interp_linear_backward")
def _interp_linear_backward_fake(grad_y, x, weight, bias, coeffs, output_mask):
    return _grads_fake(x, weight, bias, coeffs, output_mask)


@torch.library.register_fake("manifold_ext::interp_linear_cross_entropy")
def _interp_linear_cross_entropy_fake(x, weight, bias, coeffs, target):
    _check_devices("interp_linear_cross_entropy", x, weight=weight, bias=bias, coeffs=coeffs,
                   target=target)
    pts, n = _points_shape(x, coeffs), x.shape[-2]
    f = _opmath(x.dtype)
    return (
        x.new_empty(pts, dtype=f),
        x.new_empty(pts, dtype=torch.int64),
        x.new_empty((*pts, n), dtype=f),
    )


@torch.library.register_fake("manifold_ext::interp_linear_cross_entropy_backward")
def _interp_linear_cross_entropy_backward_fake(
    grad_loss, x, weight, bias, coeffs, target, lse, output_mask
):
    return _grads_fake(x, weight, bias, coeffs, output_mask)


@torch.library.register_fake("manifold_ext::batched_cross_entropy")
def _batched_cross_entropy_fake(logits, target):
    f = _opmath(logits.dtype)
    pts = tuple(logits.shape[:-2])
    return (
        logits.new_empty(pts, dtype=f),
        logits.new_empty(pts, dtype=torch.int64),
        logits.new_empty(tuple(logits.shape[:-1]), dtype=f),
    )


@torch.library.register_fake("manifold_ext::batched_cross_entropy_backward")
def _batched_cross_entropy_backward_fake(grad_loss, logits, target, lse):
    return torch.empty_like(logits)


# ----------------------------------------------------------------------------- autograd


def _none_if_unneeded(grads: Sequence[Tensor], needed: Sequence[bool]):
    return tuple(g if need else None for g, need in zip(grads, needed))


def _interp_setup(ctx, inputs, output):
    x, weight, bias, coeffs = inputs[:4]
    ctx.save_for_backward(x, weight, bias, coeffs)


def _interp_linear_backward(ctx, grad_y):
    x, weight, bias, coeffs = ctx.saved_tensors
    need = list(ctx.needs_input_grad[:4])
    grads = _ops.interp_linear_backward.default(grad_y, x, weight, bias, coeffs, need)
    return _none_if_unneeded(grads, need)


torch.library.register_autograd(
    "manifold_ext::interp_linear", _interp_linear_backward, setup_context=_interp_setup
)


def _ce_setup(ctx, inputs, output):
    x, weight, bias, coeffs, target = inputs
    _, correct, lse = output
    ctx.mark_non_differentiable(correct, lse)
    ctx.save_for_backward(x, weight, bias, coeffs, target, lse)


def _interp_linear_cross_entropy_backward(ctx, grad_loss, _grad_correct, _grad_lse):
    x, weight, bias, coeffs, target, lse = ctx.saved_tensors
    need = list(ctx.needs_input_grad[:4])
    grads = _ops.interp_linear_cross_entropy_backward.default(
        grad_loss, x, weight, bias, coeffs, target, lse, need
    )
    return (*_none_if_unneeded(grads, need), None)


torch.library.register_autograd(
    "manifold_ext::interp_linear_cross_entropy",
    _interp_linear_cross_entropy_backward,
    setup_context=_ce_setup,
)


def _bce_setup(ctx, inputs, output):
    logits, target = inputs
    _, correct, lse = output
    ctx.mark_non_differentiable(correct, lse)
    ctx.save_for_backward(logits, target, lse)


def _batched_cross_entropy_backward(ctx, grad_loss, _grad_correct, _grad_lse):
    logits, target, lse = ctx.saved_tensors
    return _ops.batched_cross_entropy_backward.default(grad_loss, logits, target, lse), None


torch.library.register_autograd(
    "manifold_ext::batched_cross_entropy",
    _batched_cross_entropy_backward,
    setup_context=_bce_setup,
)


def _no_double_backward(op: str):
    """The derivative of a backward op: refused by name (the kernels have no second derivative;
    without this, autograd would warn and return wrong gradients)."""

    def backward(ctx, *grads):
        raise RuntimeError(f"double backward through manifold_ext::{op} is not supported (its backward "
                           f"kernel has no derivative of its own); for second derivatives, differentiate the "
                           f"pure-PyTorch reference in manifold_ext._reference")

    return backward


def _no_context(ctx, inputs, output):
    pass


for _op in ("interp_linear", "interp_linear_cross_entropy", "batched_cross_entropy"):
    torch.library.register_autograd(f"manifold_ext::{_op}_backward", _no_double_backward(_op),
                                    setup_context=_no_context)

# ----------------------------------------------------------------------------- vmap
#
# vmap over V adds a leading dimension to the per-call points. Every rule folds the V batches and
# the call's own points into one flat set of points and makes one kernel call. Per call, coeffs
# is (K,) (one point) or (B, K); an unbatched x of shape (N, in) stays the shared-input form.


def _front(t: Optional[Tensor], bdim: Optional[int]) -> Optional[Tensor]:
    return t if t is None or bdim is None else t.movedim(bdim, 0)


def _loop_fallback(op, info, in_dims, args):
    """Vertex tensors batched under vmap: one call per batch entry (correct, not fused)."""
    outs = []
    for v in range(info.batch_size):
        call = [a if d is None or a is None else a.select(d, v) for a, d in zip(args, in_dims)]
        outs.append(op(*call))
    if isinstance(outs[0], tuple):
        return tuple(torch.stack(o) for o in zip(*outs)), (0,) * len(outs[0])
    return torch.stack(outs), 0


def _flat_coeffs(coeffs, c_bdim, V):
    c = _front(coeffs, c_bdim)
    if c_bdim is None:
        c = c.expand(V, *c.shape)
    per_call = c.shape[1:-1]  # () for (K,) coefficients, (B,) for (B, K)
    return c.reshape(-1, c.shape[-1]), per_call


def _flat_per_point(t, bdim, V, per_call, point_dims):
    """t's per-call shape is per_call + rest or rest (one value for every point of the call);
    returns a tensor with one leading dimension over all V * prod(per_call) points, or t itself
    when it is unbatched and shared by all points."""
    has_points = t.dim() - (bdim is not None) > point_dims
    if bdim is None and not has_points:
        return t
    t = _front(t, bdim)
    if bdim is None:
        t = t.expand(V, *t.shape)
    if not has_points:
        t = t.reshape(V, *([1] * len(per_call)), *t.shape[1:]).expand(V, *per_call, *t.shape[1:])
    return t.reshape(-1, *t.shape[1 + len(per_call):])


def _unflatten(t, V, per_call, keep):
    return t.reshape(V, *per_call, *t.shape[t.dim() - keep:])


@torch.library.register_vmap("manifold_ext::interp_linear")
def _interp_linear_vmap(info, in_dims, x, weight, bias, coeffs):
    x_d, w_d, b_d, c_d = in_dims
    if w_d is not None or b_d is not None:
        return _loop_fallback(_ops.interp_linear.default, info, in_dims, (x, weight, bias, coeffs))
    V = info.batch_size
    c, per_call = _flat_coeffs(coeffs, c_d, V)
    xf = _flat_per_point(x, x_d, V, per_call, 2)
    y = _ops.interp_linear.default(xf, weight, bias, c)
    return _unflatten(y, V, per_call, 2), 0


@torch.library.register_vmap("manifold_ext::interp_linear_cross_entropy")
def _interp_linear_cross_entropy_vmap(info, in_dims, x, weight, bias, coeffs, target):
    x_d, w_d, b_d, c_d, t_d = in_dims
    op = _ops.interp_linear_cross_entropy.default
    if w_d is not None or b_d is not None:
        return _loop_fallback(op, info, in_dims, (x, weight, bias, coeffs, target))
    V = info.batch_size
    c, per_call = _flat_coeffs(coeffs, c_d, V)
    xf = _flat_per_point(x, x_d, V, per_call, 2)
    tf = _flat_per_point(target, t_d, V, per_call, 1)
    loss, correct, lse = op(xf, weight, bias, c, tf)
    return (
        _unflatten(loss, V, per_call, 0),
        _unflatten(correct, V, per_call, 0),
        _unflatten(lse, V, per_call, 1),
    ), (0, 0, 0)


@torch.library.register_vmap("manifold_ext::batched_cross_entropy")
def _batched_cross_entropy_vmap(info, in_dims, logits, target):
    l_d, t_d = in_dims
    V = info.batch_size
    logits = _front(logits, l_d)
    if l_d is None:
        logits = logits.expand(V, *logits.shape)
    per_call = tuple(logits.shape[1:-2])
    lf = logits.reshape(-1, *logits.shape[-2:])
    tf = _flat_per_point(target, t_d, V, per_call, 1)
    loss, correct, lse = _ops.batched_cross_entropy.default(lf, tf)
    return (
        _unflatten(loss, V, per_call, 0),
        _unflatten(correct, V, per_call, 0),
        _unflatten(lse, V, per_call, 1),
    ), (0, 0, 0)
