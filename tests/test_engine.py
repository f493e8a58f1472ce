"""The engine's main test: every point equals loading its state dict and evaluating it alone."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from manifold_ext import engine, params as P
from manifold_ext.data import load_digits

from _models import TinyTransformer, cnn, mlp, randomise_bn

DIGITS = load_digits()


def _coeffs(B, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, K, generator=g) * 1.6 - 0.3  # inside and outside the simplex


def _digits(n, image=False):
    x, y = DIGITS.x_test[:n], DIGITS.y_test[:n]
    return (x.reshape(-1, 1, 8, 8) if image else x), y


def _tokens(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 13, (n, 6), generator=g)
    return x, (x.sum(1) % 5)


CASES = {
    "mlp": (lambda s: mlp(s), lambda: _digits(97)),
    "cnn_bn": (lambda s: randomise_bn(cnn(s), s), lambda: _digits(97, image=True)),
    "transformer": (lambda s: TinyTransformer(seed=s), lambda: _tokens(41)),
}


def _close(a, b):
    # equal_nan: mixing running variances with negative coefficients can make them negative, and
    # both engines then agree on NaN.
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(a.accuracy, b.accuracy, rtol=0, atol=1e-9, equal_nan=True)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("bn", ["recompute", "interpolate"])
@pytest.mark.parametrize("K", [1, 3])
def test_fused_equals_loop(case, bn, K):
    make, data = CASES[case]
    vertices = [make(s) for s in range(K)]
    coeffs = _coeffs(7, K)
    d = data()
    fused = engine.evaluate(vertices[0], vertices, coeffs, d, bn=bn)
    loop = engine.evaluate(vertices[0], vertices, coeffs, d, bn=bn, engine="loop")
    _close(fused, loop)
    assert fused.loss.shape == (7,)
    assert torch.isfinite(fused.loss).sum() >= 5


@pytest.mark.parametrize("case", CASES)
def test_chunking_does_not_change_results(case):
    make, data = CASES[case]
    vertices = [make(s) for s in range(2)]
    coeffs = _coeffs(9, 2)
    d = data()
    whole = engine.evaluate(vertices[0], vertices, coeffs, d)
    chunked = engine.evaluate(vertices[0], vertices, coeffs, d, points_per_chunk=2, batch_size=16)
    loop = engine.evaluate(vertices[0], vertices, coeffs, d, engine="loop", batch_size=16)
    _close(chunked, loop)
    if case != "cnn_bn":  # with BatchNorm, batch_size changes the recomputed statistics
        _close(whole, chunked)
    tiny = engine.evaluate(vertices[0], vertices, coeffs, d, max_memory=1)
    _close(tiny, whole)


def test_vertex_equals_its_model():
    m = mlp(0)
    x, y = _digits(50)
    ev = engine.evaluate(m, [m, mlp(1)], torch.tensor([[1.0, 0.0]]), (x, y))
    with torch.no_grad():
        expected = nn.functional.cross_entropy(m(x), y)
    torch.testing.assert_close(ev.loss[0].float(), expected, rtol=1e-6, atol=1e-6)


def test_architecture_mismatch_names_parameter():
    with pytest.raises(ValueError, match=r"parameter '2.weight' has shape \(10, 32\) in vertex 1 but \(24, 32\) in vertex 0"):
        engine.evaluate(mlp(0), [mlp(0), mlp(1, widths=(64, 32, 10))], _coeffs(2, 2), _digits(5))


def test_coeffs_shape_error():
    with pytest.raises(ValueError, match=r"expected coeffs of shape \(B, K\) with K = 2 \(the number of vertices\), got \(4, 3\)"):
        engine.evaluate(mlp(0), [mlp(0), mlp(1)], _coeffs(4, 3), _digits(5))


def test_empty_data_error():
    x, y = _digits(5)
    with pytest.raises(ValueError, match=r"data is empty: expected at least one example, got inputs of shape \(0, 64\)"):
        engine.evaluate(mlp(0), [mlp(0), mlp(1)], _coeffs(4, 2), (x[:0], y[:0]))


def test_non_finite_vertex_only_poisons_its_points():
    a, b = mlp(0), mlp(1)
    with torch.no_grad():
        b[2].weight[3, 4] = float("nan")
    coeffs = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    with pytest.warns(RuntimeWarning, match=r"vertex 1 has non-finite values in parameter '2.weight'"):
        ev = engine.evaluate(a, [a, b], coeffs, _digits(30))
    assert torch.isnan(ev.loss[1:]).all()
    clean = engine.evaluate(a, [a, a], coeffs[:1], _digits(30))
    torch.testing.assert_close(ev.loss[:1], clean.loss)


def test_huge_finite_float64_vertices_are_not_flagged():
    # Their sum overflows to Inf: the quick screen must fall back to the exact check.
    stacked = {"w": torch.tensor([[1e308, 1e308], [1.0, 2.0]], dtype=torch.float64),
               "b": torch.tensor([[float("inf")], [0.0]])}
    coeffs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    with pytest.warns(RuntimeWarning, match=r"vertex 0 has non-finite values in parameter 'b'"):
        bad = engine._non_finite(stacked, coeffs)
    assert bad.tolist() == [True, False]
    assert stacked["w"][0, 0] == 1e308  # left as it was
    del stacked["b"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not engine._non_finite(stacked, coeffs).any()


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 10)

    def forward(self, x):
        h = self.lin(x)
        if h.max() > 0:  # a Python branch on a computed value: impossible under vmap
            return h
        return -h


class WrongShape(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 10)

    def forward(self, x):
        return self.lin(x).unsqueeze(-1)  # (N, 10, 1): not the (N, classes) cross-entropy needs


class Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 10)

    def forward(self, x):
        raise ValueError("my model is broken")


def test_a_model_that_fails_on_its_own_gets_its_own_error_not_loop_advice():
    with pytest.raises(ValueError, match=r"^the model's output does not fit loss='cross_entropy': logits of shape "
                                         r"\(1, 10, 1\) for 1 example of shape \(1, 64\), expected \(1, classes\)$"):
        engine.evaluate(WrongShape(), [WrongShape(), WrongShape()], _coeffs(3, 2), _digits(5), engine="fused")
    with pytest.raises(ValueError, match="^my model is broken$"):
        engine.evaluate(Broken(), [Broken(), Broken()], _coeffs(3, 2), _digits(5), engine="fused")
    with pytest.raises(ValueError, match="^my model is broken$"):  # auto does not fall back to the loop either
        engine.evaluate(Broken(), [Broken(), Broken()], _coeffs(3, 2), _digits(5))


def test_model_that_cannot_vmap_suggests_loop():
    vertices = [DataDependent(), DataDependent()]
    with pytest.raises(RuntimeError, match=r"use evaluate\(..., engine='loop'\), which runs any model one point at a time"):
        engine.evaluate(vertices[0], vertices, _coeffs(3, 2), _digits(5), engine="fused")
    ev = engine.evaluate(vertices[0], vertices, _coeffs(3, 2), _digits(5), engine="loop")
    assert torch.isfinite(ev.loss).all()
    # The default engine falls back to the loop, says so, and gives the loop's results.
    with pytest.warns(RuntimeWarning, match=r"engine='auto': the fused engine cannot run this model \(vmap: .*\); using the loop"):
        auto = engine.evaluate(vertices[0], vertices, _coeffs(3, 2), _digits(5))
    assert auto.engine == "loop"
    torch.testing.assert_close(auto.loss, ev.loss)


@pytest.mark.parametrize("arg,value,msg", [
    ("bn", "none", "bn must be 'recompute' or 'interpolate', got 'none'"),
    ("engine", "jit", "engine must be one of 'auto', 'fused', 'loop', got 'jit'"),
    ("loss", "nll", "loss must be one of 'cross_entropy', 'mse', 'lm', got 'nll'"),
])
def test_option_errors(arg, value, msg):
    with pytest.raises(ValueError, match=msg):
        engine.evaluate(mlp(0), [mlp(0)], _coeffs(1, 1), _digits(5), **{arg: value})


def test_vertices_of_another_architecture_are_named():
    other = nn.Linear(64, 10)
    with pytest.raises(ValueError, match=r"the vertices have no tensor '0.weight', which the model has"):
        engine.evaluate(mlp(0), [other.state_dict()], _coeffs(1, 1), _digits(5))


# ----------------------------------------------------------------------------- mse


def _regression(n=23, seed=0, outputs=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 64, generator=g), torch.randn(n, outputs, generator=g)


@pytest.mark.parametrize("case", ["mlp", "cnn_bn", "bare_linear"])
@pytest.mark.parametrize("bn", ["recompute", "interpolate"])
def test_mse_fused_equals_loop_and_definition(case, bn):
    x, y = _regression()
    if case == "mlp":
        vertices = [mlp(s, widths=(64, 9, 2)) for s in range(3)]
    elif case == "cnn_bn":
        vertices = [nn.Sequential(*list(randomise_bn(cnn(s), s))[:-1], nn.Linear(128, 2)) for s in range(3)]
        x = x.reshape(-1, 1, 8, 8)
    else:
        vertices = [nn.Linear(64, 2) for _ in range(3)]
    coeffs = _coeffs(5, 3)
    fused = engine.evaluate(vertices[0], vertices, coeffs, (x, y), loss="mse", bn=bn)
    loop = engine.evaluate(vertices[0], vertices, coeffs, (x, y), loss="mse", bn=bn, engine="loop")
    torch.testing.assert_close(fused.loss, loop.loss, rtol=1e-5, atol=1e-7, equal_nan=True)  # see _close
    assert torch.isfinite(fused.loss).sum() >= 3
    assert torch.isnan(fused.accuracy).all() and torch.isnan(loop.accuracy).all()
    one = engine.evaluate(vertices[0], vertices, torch.tensor([[0.0, 1.0, 0.0]]), (x, y), loss="mse",
                          bn="interpolate")
    with torch.no_grad():
        vertices[1].eval()
        expected = nn.functional.mse_loss(vertices[1](x), y)
    torch.testing.assert_close(one.loss[0].float(), expected, rtol=1e-6, atol=1e-7)


def test_mse_single_output_takes_flat_targets():
    x, y = _regression(outputs=1)
    vertices = [nn.Linear(64, 1) for _ in range(2)]
    coeffs = _coeffs(4, 2)
    flat = engine.evaluate(vertices[0], vertices, coeffs, (x, y[:, 0]), loss="mse")
    column = engine.evaluate(vertices[0], vertices, coeffs, (x, y), loss="mse", engine="loop")
    torch.testing.assert_close(flat.loss, column.loss, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- point_losses


def _bn_update_bn_semantics(m, record):
    """BatchNorm as a model evaluated after torch.optim.swa_utils.update_bn behaves, written
    differentiably: a first pass normalises by the batch's biased variance (train mode) and
    records the mean and unbiased variance; the second pass normalises by the recorded ones.
    Pass "running" normalises by the (mixed, differentiable) running statistics."""
    def forward(x):
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        if record["pass"] == 1:
            mean, var = x.mean(dims), x.var(dims, unbiased=False)
            record[m] = (mean, x.var(dims, unbiased=True))
        elif record["pass"] == 2:
            mean, var = record[m]
        else:  # bn="interpolate": the mixed running statistics
            mean, var = m.running_mean, m.running_var
        out = (x - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + m.eps)
        return out * m.weight.reshape(shape) + m.bias.reshape(shape)
    return forward


def _reference_losses(model, stacked, coeffs, data, loss, bn):
    """Per-point losses by combining the parameters and calling the model functionally."""
    from torch.func import functional_call
    x, y = data
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    record = {}
    for m in norms:
        m.forward = _bn_update_bn_semantics(m, record)
    model.eval()
    out = []
    try:
        for c in coeffs:
            params = {n: torch.tensordot(c.to(t.dtype), t, dims=1) if t.is_floating_point() else t[0]
                      for n, t in stacked.items()}
            record["pass"] = 1
            if bn == "recompute":
                functional_call(model, params, (x,))
            record["pass"] = 2 if bn == "recompute" else "running"
            logits = functional_call(model, params, (x,))
            out.append(nn.functional.mse_loss(logits, y) if loss == "mse"
                       else nn.functional.cross_entropy(logits, y))
    finally:
        for m in norms:
            m.__dict__.pop("forward", None)
    return torch.stack(out)


@pytest.mark.parametrize("case", ["mlp", "cnn_bn"])
@pytest.mark.parametrize("bn", ["recompute", "interpolate"])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_point_losses_values_and_gradients(case, bn, loss):
    torch.manual_seed(0)
    if case == "mlp":
        vertices = [mlp(s, widths=(64, 9, 7, 10)) for s in range(3)]
        x, yc = _digits(31)
    else:
        vertices = [randomise_bn(cnn(s), s) for s in range(3)]
        x, yc = _digits(31, image=True)
    y = torch.randn(31, 10) if loss == "mse" else yc
    model = vertices[0]
    stacked = {n: t.clone().double().requires_grad_(t.is_floating_point()) if t.is_floating_point() else t
               for n, t in engine.P.stack(vertices).items()}
    for v in vertices:
        v.double()
    coeffs = _coeffs(4, 3).double().requires_grad_()
    data = (x.double(), y.double() if loss == "mse" else y)
    got = engine.point_losses(model, stacked, coeffs, data, loss=loss, bn=bn)
    ref_stacked = {n: t.detach().clone().requires_grad_(t.is_floating_point()) for n, t in stacked.items()}
    ref_coeffs = coeffs.detach().clone().requires_grad_()
    want = _reference_losses(model, ref_stacked, ref_coeffs, data, loss, bn)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    w = torch.arange(1.0, 5.0, dtype=torch.float64)
    (got * w).sum().backward()
    (want * w).sum().backward()
    for n, t in stacked.items():
        if t.requires_grad and ref_stacked[n].grad is not None:
            torch.testing.assert_close(t.grad, ref_stacked[n].grad, rtol=1e-7, atol=1e-9, msg=n)
    torch.testing.assert_close(coeffs.grad, ref_coeffs.grad, rtol=1e-7, atol=1e-9)
    assert stacked["0.weight"].grad.abs().sum() > 0


def _fake_engine(name, per_point, calls):
    """A stand-in for one engine: records which points it ran and reports per_point seconds."""
    def run(c, quiet, times=None):
        calls.append((name, c[:, 0].tolist()))
        if times is not None:
            times.extend([per_point] * len(c))
        return c[:, 0].double(), torch.zeros(len(c), dtype=torch.int64)
    return run


@pytest.mark.parametrize("t_fused,expect,probes", [
    (0.5, "fused", 2),    # faster on one point: chunks only make it faster
    (5.0, "loop", 2),     # clearly slower on one point: no further probe
    (2.0, "loop", 3),     # in between: judged on a chunk of B // 16 points
])
def test_auto_picks_the_faster_engine_and_keeps_the_point_order(t_fused, expect, probes):
    calls = []
    coeffs = torch.arange(64, dtype=torch.float32).reshape(64, 1)
    loss, correct, chosen = engine._auto(coeffs, False, _fake_engine("fused", t_fused, calls),
                                         _fake_engine("loop", 1.0, calls), quiet=True)
    assert chosen == expect
    assert loss.tolist() == list(range(64))  # every point once, in order, whoever ran it
    assert calls[0] == ("loop", [0.0]) and calls[1] == ("fused", [0.0, 1.0])  # point 0 by both: checked
    assert len(calls) == probes + 1 and calls[-1][0] == expect
    if probes == 3:
        assert calls[2] == ("fused", [float(i) for i in range(2, 5)])


def test_auto_runs_a_chain_fused_and_one_point_by_the_loop():
    calls = []
    c = torch.ones(4, 1)
    assert engine._auto(c, True, _fake_engine("fused", 9.0, calls), _fake_engine("loop", 1.0, calls), True)[2] == "fused"
    assert engine._auto(c[:1], False, _fake_engine("fused", 0.1, calls), _fake_engine("loop", 1.0, calls), True)[2] == "loop"
    assert calls == [("fused", [1.0] * 4), ("loop", [1.0])]


def test_auto_sends_a_convolutional_model_with_large_activations_to_the_loop():
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 64, 10))
    big = (torch.randn(1200, 1, 8, 8), torch.randint(0, 10, (1200,)))  # 1200 * 2 * 4 KiB per point
    small = (big[0][:16], big[1][:16])
    fused = engine._Fused(cnn, P.stack([cnn, cnn], model=cnn), "cross_entropy", lay=P.layout(cnn))
    assert engine._conv_heavy(fused, big[0], 1200, {})
    assert not engine._conv_heavy(fused, small[0], 16, {})
    ev = engine.evaluate(cnn, [cnn, cnn], _coeffs(4, 2), big)
    assert ev.engine == "loop"
    torch.testing.assert_close(ev.loss, engine.evaluate(cnn, [cnn, cnn], _coeffs(4, 2), big, engine="fused").loss,
                               rtol=1e-5, atol=0)


class _ReadsAcross(nn.Module):
    """Reads its embedding table outside the embedding's forward (a hand-tied output layer)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.mix = nn.Linear(4, 4)

    def forward(self, ids):
        return self.mix(self.emb(ids)).mean(1) @ self.emb.weight.T


def test_auto_checks_the_fused_engine_against_the_loop_on_the_first_point():
    torch.manual_seed(0)
    a, b = _ReadsAcross(), _ReadsAcross()
    data = (torch.randint(0, 7, (5, 3)), torch.randint(0, 7, (5,)))
    loop = engine.evaluate(a, [a, b], _coeffs(6, 2), data, engine="loop")
    with pytest.warns(RuntimeWarning, match=r"engine='auto': the fused engine disagrees with the loop on this "
                                            r"model \(loss sum .* against .* at the first point\).*; using the loop"):
        auto = engine.evaluate(a, [a, b], _coeffs(6, 2), data)
    assert auto.engine == "loop"
    torch.testing.assert_close(auto.loss, loop.loss)


def test_auto_disagreement_fakes():
    calls = []
    coeffs = torch.arange(8, dtype=torch.float32).reshape(8, 1)

    def fused(c, quiet, times=None):
        calls.append(("fused", c[:, 0].tolist()))
        if times is not None:
            times.extend([0.1] * len(c))
        return c[:, 0].double() + 1, torch.zeros(len(c), dtype=torch.int64)  # off by one everywhere

    with pytest.warns(RuntimeWarning, match="disagrees with the loop"):
        loss, _, chosen = engine._auto(coeffs, False, fused, _fake_engine("loop", 1.0, calls), quiet=True)
    assert chosen == "loop" and loss.tolist() == list(range(8))


class DoublesItsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 10)

    def forward(self, x):
        x.mul_(2)  # in place, on whatever it is given
        return self.lin(x)


@pytest.mark.parametrize("eng", ["fused", "loop", "auto"])
@pytest.mark.parametrize("make", [lambda: DoublesItsInput(),
                                  lambda: nn.Sequential(nn.ReLU(inplace=True), nn.Linear(64, 10))],
                         ids=["doubles", "inplace-relu-chain"])
def test_a_model_that_changes_its_input_changes_neither_the_caller_s_data_nor_the_result(eng, make):
    torch.manual_seed(0)
    vertices = [make(), make()]
    x, y = _digits(13)
    x = x.clone()
    before = x.clone()
    coeffs = _coeffs(5, 2)
    ev = engine.evaluate(vertices[0], vertices, coeffs, (x, y), engine=eng, batch_size=4)
    assert torch.equal(x, before)
    for b in range(5):  # each point as a fresh model on a fresh copy of the data
        m = make()
        m.load_state_dict({k: coeffs[b, 0] * vertices[0].state_dict()[k] + coeffs[b, 1] * vertices[1].state_dict()[k]
                           for k in m.state_dict()})
        want = sum(F.cross_entropy(m(x[i:i + 4].clone()), y[i:i + 4], reduction="sum") for i in range(0, 13, 4)) / 13
        torch.testing.assert_close(ev.loss[b].float(), want.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eng", ["fused", "loop"])
@pytest.mark.parametrize("batch_size,refused", [(1, True), (4, True), (3, False)])
def test_batchnorm_from_one_value_per_channel_is_refused_alike_by_both_engines(eng, batch_size, refused):
    from manifold_ext import models

    torch.manual_seed(0)
    vertices = [models.mlp((64, 6, 10), norm="batch") for _ in range(2)]
    x, y = _digits(9)  # chunks of 4 leave one example in the last
    if refused:
        with pytest.raises(ValueError, match=r"^bn='recompute': BatchNorm '1' cannot recompute its statistics from one "
                                             r"value per channel \(a chunk of input shape \(1, 6\)\); pass a batch_size "
                                             r"that leaves at least 2 examples in every chunk, or bn='interpolate'$"):
            engine.evaluate(vertices[0], vertices, _coeffs(3, 2), (x, y), engine=eng, batch_size=batch_size)
    else:
        ev = engine.evaluate(vertices[0], vertices, _coeffs(3, 2), (x, y), engine=eng, batch_size=batch_size)
        other = engine.evaluate(vertices[0], vertices, _coeffs(3, 2), (x, y), engine="loop", batch_size=batch_size)
        torch.testing.assert_close(ev.loss, other.loss)
    # Without recomputation, any chunk will do.
    engine.evaluate(vertices[0], vertices, _coeffs(3, 2), (x, y), engine=eng, batch_size=batch_size, bn="interpolate")


class _Reentrant(nn.Module):
    """Evaluates itself from inside its own forward (a nested fused pass on the same object). The
    fused engine runs a private copy of the module tree, so what the forward records goes into a
    dict that the copy shares: whether the caller's own Linear had its forward replaced."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.log = {"caller_lin": self.lin, "patched_seen": False}

    def forward(self, x):
        log = self.log
        log["patched_seen"] |= "forward" in log["caller_lin"].__dict__
        if "inner" in log:
            log["inner_result"] = engine.evaluate(self, *log.pop("inner"), engine="fused", quiet=True).loss
        return torch.tanh(self.lin(x)) * 1.0


def test_a_nested_fused_pass_on_the_same_model_works_and_never_touches_its_modules():
    torch.manual_seed(0)
    model = _Reentrant()
    a, b = P.state_of(_Reentrant()), P.state_of(_Reentrant())
    data = (torch.randn(5, 4), torch.randint(0, 3, (5,)))
    coeffs = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    plain = engine.evaluate(model, [a, b], coeffs, data, engine="fused", points_per_chunk=2, quiet=True).loss
    model.log["inner"] = ([a, b], coeffs.flip(1), data)
    # points_per_chunk given: the first call of the model is inside the fused pass
    outer = engine.evaluate(model, [a, b], coeffs, data, engine="fused", points_per_chunk=2, quiet=True).loss
    assert "inner" not in model.log and torch.equal(outer, plain)
    flipped = engine.evaluate(model, [a, b], coeffs.flip(1), data, engine="fused", quiet=True).loss
    assert torch.equal(model.log["inner_result"], flipped) and not torch.equal(flipped, plain)
    # The caller's modules are never patched, and they keep their own train/eval flags.
    assert not model.log["patched_seen"] and "forward" not in model.lin.__dict__
    model.train()
    engine.evaluate(model, [a, b], coeffs, data, engine="fused", quiet=True)
    assert all(m.training for m in model.modules())


def test_the_private_copy_shares_tensors_and_keeps_ties_and_shared_modules():
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    model.register_buffer("scale", torch.ones(1), persistent=False)
    work = engine._private_copy(model)
    assert work is not model and work[0] is work[2] and work[0] is not shared
    assert work[0].weight is shared.weight and work.scale is model.scale
    work[0].forward = lambda x: x  # replacing a forward on the copy leaves the original alone
    assert "forward" not in shared.__dict__


def test_shard_false_evaluates_every_point_on_this_rank(monkeypatch):
    from manifold_ext import distributed as D

    torch.manual_seed(0)
    model = mlp()
    a, b = P.state_of(mlp()), P.state_of(mlp())
    d = load_digits()
    data = (d.x_test[:32], d.y_test[:32])
    coeffs = torch.rand(5, 2)
    alone = engine.evaluate(model, [a, b], coeffs, data, quiet=True).loss
    monkeypatch.setattr(D, "active", lambda: True)  # as if a process group of several ranks ran

    def no_collectives(*args):
        raise AssertionError("shard=False must not shard or gather")

    monkeypatch.setattr(D, "gather_rows", no_collectives)
    monkeypatch.setattr(D, "shard", no_collectives)
    assert torch.equal(engine.evaluate(model, [a, b], coeffs, data, quiet=True, shard=False).loss, alone)
    with D.local():  # the default follows local()
        assert torch.equal(engine.evaluate(model, [a, b], coeffs, data, quiet=True).loss, alone)
    with pytest.raises(AssertionError, match="must not shard"):  # the default shards when distributed
        engine.evaluate(model, [a, b], coeffs, data, quiet=True)
