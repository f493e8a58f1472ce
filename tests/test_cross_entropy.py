import pytest
import torch
from torch.library import opcheck

import manifold_ext as mx
from manifold_ext import _reference as ref

from _inputs import interp_inputs, noncontig, targets
from conftest import DEVICE_DTYPES, DEVICES, tol

# (B, N, in, classes, K), including a class count that needs several chunks and K = 1, B = 1.
SHAPES = [
    (5, 7, 13, 11, 3),
    (1, 9, 17, 1, 1),
    (4, 1, 3, 33, 2),
    (3, 0, 6, 4, 2),
    (0, 5, 6, 4, 2),
    (2, 33, 70, 5003, 2),
]


def _d(t):
    return None if t is None else t.double()


def _check_close(got, expected, dtype, n_rows):
    loss, correct = got
    eloss, ecorrect = expected
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert correct.dtype == torch.int64
    rtol, atol = tol(dtype)
    torch.testing.assert_close(loss.double(), eloss, rtol=rtol, atol=atol * max(1, n_rows))
    if dtype in (torch.float32, torch.float64):
        torch.testing.assert_close(correct, ecorrect)
    else:  # near-ties may flip under rounding
        assert (correct - ecorrect).abs().max().item() <= max(1, n_rows // 10) if correct.numel() else True


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize(
    "layout,per_point_target",
    [("per_point", False), ("per_point", True), ("shared", False), ("shared", True), ("single", False)],
)
@pytest.mark.parametrize("bias", [True, False])
def test_fused_matches_reference(device, dtype, shape, layout, bias, per_point_target):
    B, N, I, C, K = shape
    x, w, b, c = interp_inputs(B, N, I, C, K, device=device, dtype=dtype, bias=bias,
                               shared=layout == "shared", single=layout == "single", scale=3.0)
    t = targets(N, C, B=B if per_point_target else None, device=device)
    got = mx.interp_linear_cross_entropy(x, w, b, c, t)
    _check_close(got, ref.interp_linear_cross_entropy(_d(x), _d(w), _d(b), _d(c), t), dtype, N)
    if layout == "single":
        assert got[0].shape == () and got[1].shape == ()


@pytest.mark.parametrize("device", DEVICES)
def test_fused_non_contiguous(device):
    x, w, b, c = interp_inputs(3, 6, 9, 50, 2, device=device, contiguous=False)
    t = noncontig(targets(6, 50, device=device))
    _check_close(mx.interp_linear_cross_entropy(x, w, b, c, t),
                 ref.interp_linear_cross_entropy(_d(x), _d(w), _d(b), _d(c), t), torch.float32, 6)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_fifty_thousand_classes(device):
    B, N, I, C = 3, 16, 24, 50_000
    x, w, b, c = interp_inputs(B, N, I, C, 2, device=device, scale=4.0)
    t = targets(N, C, device=device)
    args = [a.detach().requires_grad_() for a in (x, w, b, c)]
    loss, correct = mx.interp_linear_cross_entropy(*args, t)
    args64 = [a.detach().double().requires_grad_() for a in (x, w, b, c)]
    eloss, ecorrect = ref.interp_linear_cross_entropy(*args64, t)
    torch.testing.assert_close(loss.double(), eloss, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(correct, ecorrect)
    g = torch.tensor([1.0, -2.0, 0.5], device=device)
    loss.backward(g)
    eloss.backward(g.double())
    for p, q in zip(args, args64):
        scale = q.grad.abs().max().item()
        torch.testing.assert_close(p.grad.double(), q.grad, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("device", DEVICES)
def test_argmax_ties_take_the_first_class(device):
    # All logits equal: argmax is class 0, as torch.argmax says.
    x = torch.zeros(2, 3, 4, device=device)
    w = torch.zeros(1, 3000, 4, device=device)
    c = torch.ones(2, 1, device=device)
    t = torch.tensor([0, 1, 2999], device=device)
    _, correct = mx.interp_linear_cross_entropy(x, w, None, c, t)
    assert correct.tolist() == [1, 1]
    _, correct = mx.batched_cross_entropy(torch.zeros(2, 3, 3000, device=device), t)
    assert correct.tolist() == [1, 1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["per_point", "shared", "single"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(3, 4, 5, 6, 2), (1, 2, 3, 7, 1), (2, 0, 3, 2, 2)], ids=str)
def test_fused_gradcheck_float64(device, layout, bias, shape):
    B, N, I, C, K = shape
    args = interp_inputs(B, N, I, C, K, device=device, dtype=torch.float64, bias=bias,
                         shared=layout == "shared", single=layout == "single")
    args = [None if a is None else a.detach().requires_grad_() for a in args]
    t = targets(N, C, device=device)
    assert torch.autograd.gradcheck(lambda *a: mx.interp_linear_cross_entropy(*a, t)[0], args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["per_point", "shared", "single"])
def test_fused_opcheck(device, layout):
    args = interp_inputs(3, 5, 7, 9, 2, device=device, shared=layout == "shared",
                         single=layout == "single")
    args = [a.detach().requires_grad_() for a in args]
    t = targets(5, 9, device=device)
    opcheck(torch.ops.manifold_ext.interp_linear_cross_entropy.default, (*args, t))


@pytest.mark.parametrize("device", DEVICES)
def test_fused_backward_opcheck(device):
    x, w, b, c = interp_inputs(3, 5, 7, 9, 2, device=device)
    t = targets(5, 9, device=device)
    _, _, lse = torch.ops.manifold_ext.interp_linear_cross_entropy.default(x, w, b, c, t)
    g = torch.randn(3, device=device)
    opcheck(torch.ops.manifold_ext.interp_linear_cross_entropy_backward.default,
            (g, x, w, b, c, t, lse, [True, True, True, True]))


# ------------------------------------------------------------------ batched_cross_entropy


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("shape", [(5, 7, 11), (1, 1, 1), (3, 0, 4), (0, 3, 4), (2, 9, 50_000)], ids=str)
@pytest.mark.parametrize("per_point_target", [False, True])
def test_batched_matches_reference(device, dtype, shape, per_point_target):
    B, N, C = shape
    logits = (torch.randn(B, N, C, generator=torch.Generator().manual_seed(0)) * 3).to(device, dtype)
    t = targets(N, C, B=B if per_point_target else None, device=device)
    _check_close(mx.batched_cross_entropy(logits, t), ref.batched_cross_entropy(logits.double(), t),
                 dtype, N)


@pytest.mark.parametrize("device", DEVICES)
def test_batched_single_point_and_non_contiguous(device):
    logits = noncontig(torch.randn(6, 40, device=device))
    t = targets(6, 40, device=device)
    loss, correct = mx.batched_cross_entropy(logits, t)
    assert loss.shape == () and correct.shape == ()
    _check_close((loss, correct), ref.batched_cross_entropy(logits.double(), t), torch.float32, 6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(3, 4, 5), (1, 1, 1), (2, 0, 3)], ids=str)
def test_batched_gradcheck_float64(device, shape):
    logits = torch.randn(*shape, device=device, dtype=torch.float64, requires_grad=True)
    t = targets(shape[1], shape[2], device=device)
    assert torch.autograd.gradcheck(lambda l: mx.batched_cross_entropy(l, t)[0], [logits])


@pytest.mark.parametrize("device", DEVICES)
def test_batched_opcheck(device):
    logits = torch.randn(3, 5, 7, device=device, requires_grad=True)
    t = targets(5, 7, device=device)
    opcheck(torch.ops.manifold_ext.batched_cross_entropy.default, (logits, t))
    _, _, lse = torch.ops.manifold_ext.batched_cross_entropy.default(logits, t)
    opcheck(torch.ops.manifold_ext.batched_cross_entropy_backward.default,
            (torch.randn(3, device=device), logits.detach(), t, lse))


@pytest.mark.parametrize("op", ["interp_linear", "interp_linear_cross_entropy", "batched_cross_entropy"])
def test_double_backward_is_refused_by_name(op):
    import warnings

    from manifold_ext import ops

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(2, 4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(2, 4, dtype=torch.float64, generator=g, requires_grad=True)
    c = torch.rand(3, 2, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randint(4, (5,), generator=g)
    logits = torch.randn(3, 5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    out = {"interp_linear": lambda: ops.interp_linear(x, W, b, c).square().sum(),
           "interp_linear_cross_entropy": lambda: ops.interp_linear_cross_entropy(x, W, b, c, t)[0].sum(),
           "batched_cross_entropy": lambda: ops.batched_cross_entropy(logits, t)[0].sum()}[op]()
    inputs = (logits,) if op == "batched_cross_entropy" else (x, W, c)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "silently incorrect" warning on the way
        grads = torch.autograd.grad(out, inputs, create_graph=True)
        with pytest.raises(RuntimeError, match=rf"^double backward through manifold_ext::{op} is not supported"):
            sum(gr.sum() for gr in grads).backward()


NONFINITE_ROWS = {  # logits of 3 classes, target 0: (defined?, loss)
    "nan": ([float("nan"), 0.0, 1.0], False),
    "+inf": ([float("inf"), 0.0, 1.0], False),
    "two +inf": ([float("inf"), float("inf"), 0.0], False),
    "all -inf": ([-float("inf")] * 3, False),
    "target -inf": ([-float("inf"), 0.0, 1.0], True),  # defined: probability 0, loss +inf
    "finite": ([2.0, 0.0, 1.0], True),
}


@pytest.mark.parametrize("row", list(NONFINITE_ROWS))
@pytest.mark.parametrize("target", [0, 2])
def test_non_finite_logits_follow_one_rule_on_every_cpu_route(row, target):
    """A row whose log-sum-exp is not finite has loss NaN and is never correct, on the kernels'
    routes and the loop's; any other row is ordinary cross-entropy (inf when the target has -inf)."""
    from manifold_ext import engine, ops

    values, defined = NONFINITE_ROWS[row]
    logits = torch.tensor([values], dtype=torch.float64)
    t = torch.tensor([target])
    ref_loss = torch.nn.functional.cross_entropy(logits, t, reduction="sum") if defined else torch.tensor(float("nan"))
    ref_correct = int(defined and logits.argmax(-1).item() == target)
    got = {"batched": ops.batched_cross_entropy(logits[None], t[None]),
           "loop": engine._direct_loss(logits, t, "cross_entropy", -100)}
    # The fused linear route: logits = x @ W^T with x = 1 and W holding the row, once with few
    # classes (the per-vertex route) and once padded to many (the streaming route).
    for name, pad in (("linear", 0), ("linear streaming", 197)):
        w = torch.cat([logits[0], torch.full((pad,), -float("inf"), dtype=torch.float64)]).reshape(1, -1, 1)
        got[name] = ops.interp_linear_cross_entropy(torch.ones(1, 1, 1, dtype=torch.float64), w, None,
                                                    torch.ones(1, 1, dtype=torch.float64), t[None])
    for name, (loss, correct) in got.items():
        loss = loss.reshape(())
        assert (torch.isnan(loss) and torch.isnan(ref_loss)) or loss.item() == pytest.approx(ref_loss.item()), name
        assert int(correct.reshape(())) == ref_correct, name


def _backward_cases():
    ops = torch.ops.manifold_ext
    g = torch.Generator().manual_seed(0)
    x, W, c = torch.randn(4, 3, generator=g), torch.randn(2, 5, 3, generator=g), torch.rand(6, 2, generator=g)
    t = torch.tensor([0, 4, 2, 1])
    _, _, lse = ops.interp_linear_cross_entropy(x, W, None, c, t)
    logits, mask = torch.randn(6, 4, 5, generator=g), [True] * 4
    ilce, bce = ops.interp_linear_cross_entropy_backward, ops.batched_cross_entropy_backward
    return [
        (lambda: ilce(torch.ones(6), x, W, None, c, t + 1, lse, mask),
         r"interp_linear_cross_entropy_backward: expected target values in \[0, 5\) \(the classes in weight or "
         r"logits\), but got values in \[1, 5\]"),
        (lambda: ilce(torch.ones(5), x, W, None, c, t, lse, mask),
         r"interp_linear_cross_entropy_backward: expected grad_loss to have shape \(B,\) \(6 elements\), but got shape \[5\]"),
        (lambda: ilce(torch.ones(6), x, W, None, c, t, lse[:3], mask),
         r"interp_linear_cross_entropy_backward: expected lse to have shape \(B, N\) \(24 elements\), but got shape \[3, 4\]"),
        (lambda: ilce(torch.ones(6, dtype=torch.long), x, W, None, c, t, lse, mask),
         "interp_linear_cross_entropy_backward: expected grad_loss to have a floating-point dtype, but got Long"),
        (lambda: ops.interp_linear_backward(torch.ones(6, 4, 4), x, W, None, c, mask),
         r"interp_linear_backward: expected grad_y to have shape \(B, N, out\) = \(6, 4, 5\), but got shape \[6, 4, 4\]"),
        (lambda: ops.interp_linear_backward(torch.ones(6, 4, 5, dtype=torch.long), x, W, None, c, mask),
         "interp_linear_backward: expected grad_y to have a floating-point dtype, but got Long"),
        (lambda: bce(torch.ones(6), torch.randn(4), t, lse),
         r"batched_cross_entropy_backward: expected logits to have shape \(B, N, classes\) or \(N, classes\), but got "
         r"shape \[4\]"),
        (lambda: bce(torch.ones(6), logits, t - 1, lse),
         r"batched_cross_entropy_backward: expected target values in \[0, 5\) .* but got values in \[-1, 3\]"),
        (lambda: bce(torch.ones(2), logits, t, lse),
         r"batched_cross_entropy_backward: expected grad_loss to have shape \(B,\) \(6 elements\), but got shape \[2\]"),
        (lambda: bce(torch.ones(6), logits, t.float(), lse),
         "batched_cross_entropy_backward: expected target to have dtype int64"),
    ]


@pytest.mark.parametrize("case", range(10))
def test_backward_ops_validate_their_arguments(case):
    call, message = _backward_cases()[case]
    with pytest.raises(RuntimeError, match=message):
        call()
