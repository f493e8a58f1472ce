"""vmap over rows of coeffs (and over inputs) equals one batched call."""

import pytest
import torch
from torch.func import vmap

import manifold_ext as mx
from manifold_ext import _reference as ref

from _inputs import interp_inputs, targets
from conftest import DEVICES


@pytest.mark.parametrize("device", DEVICES)
def test_vmap_rows_shared_input(device):
    x, w, b, c = interp_inputs(6, 5, 7, 4, 3, device=device, shared=True)
    got = vmap(lambda ci: mx.interp_linear(x, w, b, ci))(c)
    torch.testing.assert_close(got, mx.interp_linear(x, w, b, c))
    torch.testing.assert_close(got, ref.interp_linear(x, w, b, c))


@pytest.mark.parametrize("device", DEVICES)
def test_vmap_rows_per_point_input(device):
    x, w, b, c = interp_inputs(6, 5, 7, 4, 3, device=device)
    got = vmap(lambda xi, ci: mx.interp_linear(xi, w, b, ci))(x, c)
    torch.testing.assert_close(got, mx.interp_linear(x, w, b, c))


@pytest.mark.parametrize("device", DEVICES)
def test_vmap_over_batched_calls(device):
    # Each call has its own (B, K) coefficients: V x B points in one flat call.
    x, w, b, _ = interp_inputs(1, 5, 7, 4, 2, device=device, shared=True)
    cs = torch.rand(3, 4, 2, device=device)
    got = vmap(lambda ci: mx.interp_linear(x, w, b, ci))(cs)
    expected = torch.stack([ref.interp_linear(x, w, b, ci) for ci in cs])
    torch.testing.assert_close(got, expected)
    xs = torch.randn(3, 5, 7, device=device)  # one input per call, shared by its 4 points
    got = vmap(lambda xi, ci: mx.interp_linear(xi, w, b, ci))(xs, cs)
    expected = torch.stack([ref.interp_linear(xi, w, b, ci) for xi, ci in zip(xs, cs)])
    torch.testing.assert_close(got, expected)
    xs4 = torch.randn(3, 4, 5, 7, device=device)  # one input per point
    got = vmap(lambda xi, ci: mx.interp_linear(xi, w, b, ci))(xs4, cs)
    expected = torch.stack([ref.interp_linear(xi, w, b, ci) for xi, ci in zip(xs4, cs)])
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_vmap_batched_weights_fall_back(device):
    x, _, _, c = interp_inputs(4, 5, 7, 4, 2, device=device)
    ws = torch.randn(3, 2, 4, 7, device=device)
    got = vmap(lambda wi: mx.interp_linear(x, wi, None, c))(ws)
    expected = torch.stack([ref.interp_linear(x, wi, None, c) for wi in ws])
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shared", [True, False])
def test_vmap_fused_cross_entropy(device, shared):
    x, w, b, c = interp_inputs(6, 5, 7, 9, 3, device=device, shared=shared)
    t = targets(5, 9, device=device)
    if shared:
        loss, correct = vmap(lambda ci: mx.interp_linear_cross_entropy(x, w, b, ci, t))(c)
    else:
        loss, correct = vmap(lambda xi, ci: mx.interp_linear_cross_entropy(xi, w, b, ci, t))(x, c)
    eloss, ecorrect = mx.interp_linear_cross_entropy(x, w, b, c, t)
    torch.testing.assert_close(loss, eloss)
    torch.testing.assert_close(correct, ecorrect)
    # Targets batched too: each call its own labels.
    ts = targets(5, 9, B=6, device=device, seed=3)
    if shared:
        loss, _ = vmap(lambda ci, ti: mx.interp_linear_cross_entropy(x, w, b, ci, ti))(c, ts)
    else:
        f = lambda xi, ci, ti: mx.interp_linear_cross_entropy(xi, w, b, ci, ti)
        loss, _ = vmap(f)(x, c, ts)
    torch.testing.assert_close(loss, mx.interp_linear_cross_entropy(x, w, b, c, ts)[0])


@pytest.mark.parametrize("device", DEVICES)
def test_vmap_batched_cross_entropy(device):
    logits = torch.randn(6, 5, 9, device=device)
    t = targets(5, 9, device=device)
    loss, correct = vmap(lambda li: mx.batched_cross_entropy(li, t))(logits)
    eloss, ecorrect = mx.batched_cross_entropy(logits, t)
    torch.testing.assert_close(loss, eloss)
    torch.testing.assert_close(correct, ecorrect)
