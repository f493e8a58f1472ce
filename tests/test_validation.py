"""Every argument check: the message names the argument, the expected and the actual value."""

import re

import pytest
import torch

import manifold_ext as mx

from _inputs import interp_inputs, targets

x, w, b, c = interp_inputs(4, 5, 6, 7, 3)
t = targets(5, 7)
ops = torch.ops.manifold_ext


def raises(fn, *args, match):
    with pytest.raises(RuntimeError, match=re.escape(match)):
        fn(*args)


INTERP_CASES = {
    "weight 2-D": ((x, w[0], b, c), "expected weight to have shape (K, out, in), but got shape [7, 6]"),
    "no vertex": ((x, w[:0], b[:0], c[:, :0]), "expected weight to hold at least one vertex (K >= 1)"),
    "coeffs 3-D": ((x, w, b, c[None]), "expected coeffs to have shape (B, K) or (K,), but got shape [1, 4, 3]"),
    "coeffs K": ((x, w, b, c[:, :2]), "expected coeffs to have shape (B, K) with K = 3 (the vertices in weight), but got shape [4, 2]"),
    "coeffs int": ((x, w, b, c.long()), "expected coeffs to have a floating-point dtype, but got Long"),
    "weight dtype": ((x, w.double(), b, c), "expected weight to have dtype Float (the dtype of x), but got Double"),
    "bias dtype": ((x, w, b.double(), c), "expected bias to have dtype Float (the dtype of x), but got Double"),
    "half on cpu": ((x.half(), w.half(), b.half(), c), "expected x to have dtype float32 or float64 on cpu, but got Half"),
    "x for one point": ((x, w, b, c[0]), "expected x to have shape (N, in) = (N, 6) for coeffs of shape (K,), but got shape [4, 5, 6]"),
    "x 4-D": ((x[None], w, b, c), "expected x to have shape (B, N, in) = (4, N, 6) or (N, in) = (N, 6), but got shape [1, 4, 5, 6]"),
    "x points": ((x[:2], w, b, c), "expected x to have shape (B, N, in) with B = 4 (the rows of coeffs), but got shape [2, 5, 6]"),
    "x in": ((x[..., :5], w, b, c), "expected the last dimension of x to be in = 6 (weight has shape [3, 7, 6]), but got x of shape [4, 5, 5]"),
    "bias shape": ((x, w, b[:, :3], c), "expected bias to have shape (K, out) = (3, 7), but got shape [3, 3]"),
}


@pytest.mark.parametrize("case", INTERP_CASES, ids=list(INTERP_CASES))
def test_interp_linear_errors(case):
    args, msg = INTERP_CASES[case]
    raises(mx.interp_linear, *args, match="interp_linear: " + msg)
    # The fused op checks its shared arguments the same way.
    raises(mx.interp_linear_cross_entropy, *args, t, match="interp_linear_cross_entropy: " + msg)


TARGET_CASES = {
    "dtype": (t.int(), "expected target to have dtype int64 (class indices), but got Int"),
    "shape": (t[:3], "expected target to have shape (N,) = (5) or (B, N) = (4, 5), but got shape [3]"),
    "range high": (t.clone().fill_(7), "expected target values in [0, 7) (the classes in weight or logits), but got values in [7, 7]"),
    "range low": (t.clone().fill_(-1), "expected target values in [0, 7)"),
}


@pytest.mark.parametrize("case", TARGET_CASES, ids=list(TARGET_CASES))
def test_target_errors(case):
    target, msg = TARGET_CASES[case]
    raises(mx.interp_linear_cross_entropy, x, w, b, c, target,
           match="interp_linear_cross_entropy: " + msg)
    raises(mx.batched_cross_entropy, torch.randn(4, 5, 7), target,
           match="batched_cross_entropy: " + msg)


def test_target_shape_for_one_point():
    raises(mx.interp_linear_cross_entropy, x[0], w, b, c[0], t[None],
           match="interp_linear_cross_entropy: expected target to have shape (N,) = (5), but got shape [1, 5]")


def test_no_classes():
    raises(mx.interp_linear_cross_entropy, x, w[:, :0], b[:, :0], c, t,
           match="interp_linear_cross_entropy: expected at least one class, but got [3, 0, 6]")
    raises(mx.batched_cross_entropy, torch.randn(4, 5, 0), t,
           match="batched_cross_entropy: expected at least one class, but got [4, 5, 0]")


def test_logits_errors():
    raises(mx.batched_cross_entropy, torch.randn(5), t,
           match="batched_cross_entropy: expected logits to have shape (B, N, classes) or (N, classes), but got shape [5]")
    raises(mx.batched_cross_entropy, torch.ones(4, 5, 7, dtype=torch.long), t,
           match="batched_cross_entropy: expected logits to have a floating-point dtype, but got Long")


def test_backward_grad_shape():
    raises(ops.interp_linear_backward, torch.randn(4, 5, 3), x, w, b, c, [True] * 4,
           match="interp_linear_backward: expected grad_y to have shape (B, N, out) = (4, 5, 7), but got shape [4, 5, 3]")


def test_meta_device_is_checked_like_any_other():
    # Devices must agree: a meta coeffs with CPU tensors is refused, naming the argument.
    raises(mx.interp_linear, x, w, b, c.to("meta"),
           match="interp_linear: expected coeffs on device cpu (the device of x), but got meta")
