"""Fuzz: the ops against their float64 references on 300 random combinations of shapes (empty
ones included), dtypes, layouts (shared or per-point inputs, one point or B) and strides
(transposed and sliced views). Seeded, so a failure names a reproducible case."""

import random

import pytest
import torch

import manifold_ext as mx
from manifold_ext import _reference as ref

CASES = 300


def _view(t: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """The same values as ``t`` in a random memory layout: contiguous, every other element of a
    larger tensor, or the transpose of a transposed copy."""
    kind = rng.choice(["contiguous", "strided", "transposed"])
    if kind == "strided" and t.dim() >= 1:
        big = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    if kind == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return t


def _case(seed: int):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    dtype = rng.choice([torch.float32, torch.float64])
    B, K, N = rng.choice([0, 1, 2, 5]), rng.randint(1, 4), rng.choice([0, 1, 3, 7])
    R, C = rng.randint(1, 9), rng.randint(1, 9)
    single = rng.random() < 0.25
    x_shape = (N, R) if single or rng.random() < 0.5 else (B, N, R)
    x = torch.randn(x_shape, generator=g, dtype=torch.float64)
    w = torch.randn(K, C, R, generator=g, dtype=torch.float64)
    b = torch.randn(K, C, generator=g, dtype=torch.float64) if rng.random() < 0.7 else None
    c = torch.randn((K,) if single else (B, K), generator=g, dtype=torch.float64)
    t = torch.randint(C, (N,) if single or rng.random() < 0.5 else (B, N), generator=g)
    return rng, dtype, x, w, b, c, t


def _cast(rng, dtype, *ts):
    return [None if t is None else _view(t.to(dtype), rng) for t in ts]


@pytest.mark.parametrize("seed", range(CASES))
def test_ops_match_float64_references(seed):
    rng, dtype, x, w, b, c, t = _case(seed)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    xs, ws, bs, cs = _cast(rng, dtype, x, w, b, c)
    y = mx.interp_linear(xs, ws, bs, cs)
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), ref.interp_linear(x, w, b, c), **tol)
    loss, correct = mx.interp_linear_cross_entropy(xs, ws, bs, cs, t)
    want_loss, want_correct = ref.interp_linear_cross_entropy(x, w, b, c, t)
    torch.testing.assert_close(loss.double(), want_loss, **tol)
    logits = ref.interp_linear(x, w, b, c)
    near_tie = (logits.topk(2, -1).values.diff(dim=-1).abs() < 1e-4).any() if logits.shape[-1] > 1 and logits.numel() else False
    if not near_tie:  # float32 may break a near tie differently
        assert torch.equal(correct, want_correct)
    l_loss, l_correct = mx.batched_cross_entropy(_cast(rng, dtype, logits)[0], t)
    torch.testing.assert_close(l_loss.double(), ref.batched_cross_entropy(logits, t)[0], **tol)
