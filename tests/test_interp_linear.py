
import pytest
import torch
from torch.library import opcheck

import manifold_ext as mx
from manifold_ext import _reference as ref

from _inputs import interp_inputs
from conftest import DEVICE_DTYPES, DEVICES, tol

# (B, N, in, out, K): odd sizes that are multiples of no tile, K = 1, B = 1, N = 1, N = 0, B = 0,
# out = 1 (a regression head: its shared-input vertex outputs are a strided view), and each route
# of the CPU kernel: few examples per point (one product of all vertices, then a mix); weights of
# up to 4 MiB per point built for groups of points (700x700 float32: groups of 2, so B=5 leaves a
# group of 1); larger weights built one point at a time in chunks of outputs (1100x1031).
SHAPES = [
    (5, 7, 13, 11, 3),
    (1, 9, 17, 5, 1),
    (4, 1, 3, 33, 2),
    (3, 0, 6, 4, 2),
    (3, 12, 6, 1, 2),
    (1, 7, 9, 1, 3),
    (0, 5, 6, 4, 2),
    (2, 3, 1031, 700, 2),
    (3, 67, 65, 129, 4),
    (3, 40, 1031, 700, 2),
    (5, 40, 700, 700, 2),
    (3, 40, 1031, 1100, 2),
]


def _ref64(x, w, b, c):
    d = lambda t: None if t is None else t.double()
    return ref.interp_linear(d(x), d(w), d(b), d(c))


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["per_point", "shared", "single"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("contiguous", [True, False])
def test_matches_reference(device, dtype, shape, layout, bias, contiguous):
    B, N, I, O, K = shape
    x, w, b, c = interp_inputs(B, N, I, O, K, device=device, dtype=dtype, bias=bias,
                               shared=layout == "shared", single=layout == "single",
                               contiguous=contiguous)
    y = mx.interp_linear(x, w, b, c)
    expected = _ref64(x, w, b, c)
    assert y.dtype == dtype
    assert y.shape == expected.shape
    rtol, atol = tol(dtype)
    torch.testing.assert_close(y.double(), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("device", DEVICES)
def test_extrapolation_is_linear_in_coeffs(device):
    # Coefficients far outside [0, 1] must give the affine extrapolation, not a clamped one.
    x, w, b, _ = interp_inputs(2, 4, 8, 6, 2, device=device, dtype=torch.float64)
    c = torch.tensor([[-3.0, 4.0], [10.0, -9.0]], dtype=torch.float64, device=device)
    y = mx.interp_linear(x, w, b, c)
    y0 = x @ w[0].T + b[0]
    y1 = x @ w[1].T + b[1]
    torch.testing.assert_close(y, c[:, 0, None, None] * y0 + c[:, 1, None, None] * y1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["per_point", "shared", "single"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(3, 4, 5, 6, 2), (1, 2, 3, 4, 1), (2, 0, 3, 2, 2)], ids=str)
def test_gradcheck_float64(device, layout, bias, shape):
    B, N, I, O, K = shape
    args = interp_inputs(B, N, I, O, K, device=device, dtype=torch.float64, bias=bias,
                         shared=layout == "shared", single=layout == "single")
    args = [None if a is None else a.detach().requires_grad_() for a in args]
    assert torch.autograd.gradcheck(mx.interp_linear, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(4, 9, 300, 70, 3), (3, 40, 1031, 700, 2), (5, 40, 700, 700, 2),
                                   (3, 40, 1031, 1100, 2)], ids=str)
def test_gradients_match_reference_float32(device, shape):
    B, N, I, O, K = shape
    args = interp_inputs(B, N, I, O, K, device=device, dtype=torch.float32, contiguous=False)
    a1 = [t.detach().requires_grad_() for t in args]
    a2 = [t.detach().double().requires_grad_() for t in args]
    g = torch.randn(B, N, O, device=device)
    torch.autograd.backward(mx.interp_linear(*a1), g)
    torch.autograd.backward(ref.interp_linear(*a2), g.double())
    for p, q in zip(a1, a2):
        # float32 sums over up to 1031 * 40 terms: absolute error relative to the gradient's scale.
        scale = q.grad.abs().max().item()
        torch.testing.assert_close(p.grad.double(), q.grad, rtol=1e-4, atol=1e-5 * max(scale, 1.0))


@pytest.mark.parametrize("device", DEVICES)
def test_partial_gradients(device):
    # Only coeffs needs a gradient: the others are not computed, and the one asked for is right.
    x, w, b, c = interp_inputs(3, 4, 5, 6, 2, device=device, dtype=torch.float64)
    c.requires_grad_()
    (gc,) = torch.autograd.grad(mx.interp_linear(x, w, b, c).sum(), c)
    c2 = c.detach().requires_grad_()
    (gc2,) = torch.autograd.grad(ref.interp_linear(x, w, b, c2).sum(), c2)
    torch.testing.assert_close(gc, gc2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["per_point", "shared", "single"])
def test_opcheck(device, layout):
    args = interp_inputs(3, 5, 7, 4, 2, device=device, dtype=torch.float32,
                         shared=layout == "shared", single=layout == "single")
    args = [a.detach().requires_grad_() for a in args]
    opcheck(torch.ops.manifold_ext.interp_linear.default, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask", [[True] * 4, [False, True, False, True], [True, False, False, False]])
def test_opcheck_backward(device, mask):
    x, w, b, c = interp_inputs(3, 5, 7, 4, 2, device=device, dtype=torch.float32)
    g = torch.randn(3, 5, 4, device=device)
    opcheck(torch.ops.manifold_ext.interp_linear_backward.default, (g, x, w, b, c, mask))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile(device):
    x, w, b, c = interp_inputs(3, 5, 7, 4, 2, device=device)
    f = torch.compile(lambda *a: torch.relu(mx.interp_linear(*a)) * 2, fullgraph=True)
    torch.testing.assert_close(f(x, w, b, c), torch.relu(ref.interp_linear(x, w, b, c)) * 2)


def _peak_cpu_bytes(fn, *args):
    acts = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(profile_memory=True, activities=acts) as prof:
        fn(*args)
    return max((e.cpu_memory_usage for e in prof.key_averages()), default=0)


@pytest.mark.parametrize("N", [4, 64], ids=["by-vertex", "grouped"])
def test_memory_holds_k_not_b_weight_copies(N):
    # 64 points of a 512x512 layer: materialising their weights takes 64 MiB (the reference does);
    # the op holds K vertex outputs (N=4) or one group's 4 MiB of weights (N=64).
    args = interp_inputs(64, N, 512, 512, 2)
    weight_copies = 64 * 512 * 512 * 4
    assert _peak_cpu_bytes(ref.interp_linear, *args) >= weight_copies
    output = 64 * N * 512 * 4
    assert _peak_cpu_bytes(mx.interp_linear, *args) - output < weight_copies / 8
