"""Growth operators (manifold_ext.expand) on nn.Sequential MLPs: shapes, preservation, errors."""

import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from manifold_ext.expand import Deepen, ExpansionReport, Widen, expand, preservation_error
from _untouched import assert_untouched, snapshot

TOL = 1e-5
FAST = settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def build(widths, act=nn.ReLU, norm=None, norm_first=True, dropout=False, seed=0, dtype=torch.float32):
    """An MLP with random (not default) BatchNorm statistics and norm affine parameters, so that
    copying them along is actually tested."""
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i == len(widths) - 2:
            break
        block = [act()]
        if norm == "bn":
            bn = nn.BatchNorm1d(b)
            bn.running_mean.normal_(0, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            block.insert(0 if norm_first else 1, bn)
        elif norm == "ln":
            block.insert(0 if norm_first else 1, nn.LayerNorm(b))
        if dropout:
            block.append(nn.Dropout(0.3))
        layers += block
    model = nn.Sequential(*layers).to(dtype)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.LayerNorm)):
                m.weight.normal_(1.0, 0.5)
                m.bias.normal_(0.0, 0.5)
    return model


@st.composite
def mlps(draw, acts=(nn.ReLU, nn.GELU, nn.Tanh, nn.Identity), min_width=2):
    hidden = draw(st.lists(st.integers(min_width, 7), min_size=1, max_size=3))
    widths = [draw(st.integers(1, 6))] + hidden + [draw(st.integers(1, 4))]
    return build(
        widths,
        act=draw(st.sampled_from(acts)),
        norm=draw(st.sampled_from([None, "bn", "ln"])),
        norm_first=draw(st.booleans()),
        dropout=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def linears(model):
    return [(n, m) for n, m in model.named_children() if isinstance(m, nn.Linear)]


def inputs(model, n=64, seed=1):
    first = linears(model)[0][1]
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, first.in_features, generator=g, dtype=first.weight.dtype)


def tolerance(model, x=None):
    """1e-5, or 10x the base model's own float32 rounding error where that is larger.

    A LayerNorm over a few nearly equal units divides by a tiny standard deviation and so
    amplifies the rounding of its inputs (up to 1/sqrt(eps) = 316x); any re-ordering of a sum,
    which widening is, then shows at that scale. The base model's own float32-vs-float64 error
    measures this amplification, so exceeding 10x it would be a real loss of the function.
    """
    x = inputs(model, seed=0) if x is None else x
    if x.dtype != torch.float32:
        return TOL
    with torch.no_grad():
        ref = copy.deepcopy(model).double().eval()(x.double())
        own = (model.eval()(x).double() - ref).abs().max().item()
    return max(TOL, 10 * own)


def assert_consistent(model, base, report):
    """Forward runs, the output shape is kept, the report's counts and JSON match the model."""
    x = inputs(base)
    model.eval()
    assert model(x).shape == base.eval()(x).shape
    assert report.params_after == sum(p.numel() for p in model.parameters())
    assert report.params_before == sum(p.numel() for p in base.parameters())
    assert ExpansionReport.from_json(report.to_json()) == report
    names = dict(model.named_children())
    for c in report.changes:
        assert isinstance(names[c.path], nn.Linear)
    assert report.preserving == all(c.exact for c in report.changes)


def hidden_width_targets(model):
    lins = linears(model)
    return [n for n, _ in lins[:-1]]


# ---------------------------------------------------------------- width


@FAST
@given(model=mlps(), data=st.data(), init=st.sampled_from(["net2net", "zero", "random"]))
def test_widen_shapes_preservation_and_base_untouched(model, data, init):
    path = data.draw(st.sampled_from(hidden_width_targets(model)))
    n = model._modules[path].out_features
    by_size = data.draw(st.booleans())
    spec = (Widen(path, size=data.draw(st.integers(n, 3 * n + 2)), init=init) if by_size
            else Widen(path, factor=data.draw(st.floats(1.0, 3.5)), init=init))
    m = spec.size if by_size else int(round(n * spec.factor))
    snap = snapshot(model)
    new, report = expand(model, spec, generator=torch.Generator().manual_seed(0))
    assert_untouched(model, snap)
    assert_consistent(new, model, report)
    lins = dict(linears(new))
    names = [k for k, _ in linears(new)]
    assert lins[path].out_features == m
    assert lins[names[names.index(path) + 1]].in_features == m
    for mod in new.children():
        if isinstance(mod, nn.BatchNorm1d) and mod.num_features != m:
            continue
        if isinstance(mod, nn.BatchNorm1d):
            assert mod.running_mean.shape == (m,) and mod.weight.shape == (m,)
    (change,) = report.changes
    assert change.before == [lins[path].in_features, n] and change.after == [lins[path].in_features, m]
    err = preservation_error(model, new, inputs(model))
    if change.exact:
        assert init != "random"
        assert err <= tolerance(model, inputs(model))
    has_ln = any(isinstance(x, nn.LayerNorm) for x in model.children())
    if init != "random" and not has_ln:
        assert change.exact  # without LayerNorm, net2net and zero always preserve


@FAST
@given(model=mlps(acts=(nn.GELU, nn.Tanh, nn.Identity), min_width=3), data=st.data(),
       init=st.sampled_from(["net2net", "zero", "random"]))
def test_widen_not_preserving_inits_differ(model, data, init):
    # GELU/Tanh/Identity have no dead units, so a non-zero new contribution must show (a
    # 2-unit LayerNorm is excluded: it outputs +-gain whatever its input, hiding changes).
    path = data.draw(st.sampled_from(hidden_width_targets(model)))
    n = model._modules[path].out_features
    noise = 0.0 if init == "random" else 0.1
    new, report = expand(model, Widen(path, size=n + data.draw(st.integers(1, 5)), init=init, noise=noise))
    assert not report.preserving
    assert report.preservation_error > 1e-5


@FAST
@given(model=mlps(), data=st.data())
def test_widen_pattern_composes_over_all_hidden_layers(model, data):
    f = data.draw(st.sampled_from([1.0, 1.5, 2.0, 3.0]))
    init = data.draw(st.sampled_from(["net2net", "zero"]))
    before = {n: m.out_features for n, m in linears(model)}
    new, report = expand(model, Widen("*", factor=f, init=init))
    assert_consistent(new, model, report)
    targets = hidden_width_targets(model)
    assert [c.path for c in report.changes] == targets
    for n, m in linears(new)[:-1]:
        assert m.out_features == int(round(before[n] * f))
    if report.preserving:
        assert report.preservation_error <= tolerance(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_net2net_through_batchnorm_is_exact_and_copies_statistics(dtype):
    model = build([5, 6, 4], norm="bn", dtype=dtype)
    new, report = expand(model, Widen("0", factor=2.5), generator=torch.Generator().manual_seed(3))
    bn = new[1]
    assert bn.weight.dtype == dtype and new[0].weight.dtype == dtype
    assert report.preserving and report.preservation_error <= (TOL if dtype == torch.float32 else 1e-12)
    old = model[1]
    # Every new unit's statistics equal those of the unit its incoming row was copied from.
    for j in range(6, 15):
        src = [i for i in range(6) if torch.equal(new[0].weight[j], model[0].weight[i])]
        assert len(src) == 1
        assert bn.running_mean[j] == old.running_mean[src[0]] and bn.running_var[j] == old.running_var[src[0]]
    # net2net balances copies: m = 15 = 2*6 + 3, so each unit appears 2 or 3 times.
    counts = [sum(torch.equal(new[0].weight[j], model[0].weight[i]) for j in range(15)) for i in range(6)]
    assert sorted(counts) == [2, 2, 2, 3, 3, 3]


def test_zero_init_new_units_have_zero_outgoing_and_fresh_incoming():
    model = build([5, 6, 4], act=nn.GELU)
    new, report = expand(model, Widen("0", size=10, init="zero"))
    assert torch.equal(new[2].weight[:, 6:], torch.zeros(4, 4))
    assert torch.equal(new[2].weight[:, :6], model[2].weight)
    fresh = new[0].weight[6:]
    assert fresh.abs().max() <= 1 / math.sqrt(5) and fresh.abs().min() > 0
    assert report.preserving and report.preservation_error <= TOL


# LayerNorm: the combinations the width module's docstring calls exact, and those it does not.
LN_EXACT = [
    ("ln first, net2net, integer factor", True, "net2net", 3.0),
    ("ln after act, net2net, integer factor", False, "net2net", 2.0),
    ("ln first, net2net, remainder -> mean units", True, "net2net", 1.7),
    ("ln first, zero -> mean units", True, "zero", 1.5),
]
LN_NOT_EXACT = [
    ("ln after act, net2net, remainder", False, "net2net", 1.5),
    ("ln after act, zero", False, "zero", 2.0),
]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("label,first,init,factor", LN_EXACT, ids=[c[0] for c in LN_EXACT])
def test_layernorm_exact_combinations(label, first, init, factor, seed):
    model = build([6, 8, 7, 3], act=nn.GELU, norm="ln", norm_first=first, seed=seed)
    new, report = expand(model, Widen("*", factor=factor, init=init), generator=torch.Generator().manual_seed(seed))
    assert report.preserving, report.summary()
    assert report.preservation_error <= TOL
    assert preservation_error(model, new, 5 * inputs(model, seed=seed)) <= 10 * TOL  # large inputs too


def test_layernorm_mean_units_rescale_eps_and_gain():
    model = build([6, 8, 3], act=nn.ReLU, norm="ln", norm_first=True)
    new, report = expand(model, Widen("0", size=12, init="zero"))
    assert new[1].eps == pytest.approx(model[1].eps * 8 / 12)
    assert torch.allclose(new[1].weight[:8], model[1].weight * math.sqrt(8 / 12))
    assert report.changes[0].detail["mean_units"] == 4
    assert torch.allclose(new[0].weight[8:], model[0].weight.mean(0).expand(4, -1))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("label,first,init,factor", LN_NOT_EXACT, ids=[c[0] for c in LN_NOT_EXACT])
def test_layernorm_inexact_combinations_are_reported(label, first, init, factor, seed):
    model = build([6, 8, 7, 3], act=nn.GELU, norm="ln", norm_first=first, seed=seed)
    new, report = expand(model, Widen("*", factor=factor, init=init), generator=torch.Generator().manual_seed(seed))
    assert not report.preserving and not any(c.exact for c in report.changes)
    # The docstring's measured range: a real change of the function, not a rounding effect.
    assert 1e-3 < report.preservation_error < 5.0
    assert report.preservation_error == preservation_error(model, new, inputs(model, seed=0))  # the default check inputs


# ---------------------------------------------------------------- depth


@FAST
@given(model=mlps(), data=st.data(), init=st.sampled_from(["identity", "random", "copy"]))
def test_deepen_shapes_and_claims(model, data, init):
    names = [n for n, _ in model.named_children()]
    lin_idx = [i for i, (_, m) in enumerate(model.named_children()) if isinstance(m, nn.Linear)]
    after = data.draw(st.sampled_from(names[lin_idx[0]:]))
    count = data.draw(st.integers(1, 3))
    k = names.index(after)
    prev = [m for m in list(model.children())[: k + 1] if isinstance(m, nn.Linear)][-1]
    snap = snapshot(model)
    if init == "copy" and prev.in_features != prev.out_features:
        with pytest.raises(ValueError, match="must be square"):
            expand(model, Deepen(after, count=count, init=init))
        return
    new, report = expand(model, Deepen(after, count=count, init=init))
    assert_untouched(model, snap)
    assert_consistent(new, model, report)
    assert len(report.changes) == count
    assert len(linears(new)) == len(linears(model)) + count
    w = prev.out_features
    for c in report.changes:
        assert c.after == [w, w] and new._modules[c.path].weight.shape == (w, w)
        if init == "identity":
            assert torch.equal(new._modules[c.path].weight, torch.eye(w))
    if report.preserving:
        assert init == "identity" and report.preservation_error <= tolerance(model)
    kids = list(model.children())
    relu_net = all(not isinstance(m, (nn.GELU, nn.Tanh, nn.Identity)) for m in kids)
    if init == "identity" and relu_net and isinstance(kids[k], nn.ReLU):
        assert report.preserving  # the documented ReLU case
        assert report.preservation_error == 0.0  # an identity product is exact


@FAST
@given(model=mlps(acts=(nn.ReLU,)), data=st.data())
def test_deepen_identity_after_relu_preserves(model, data):
    relus = [n for n, m in model.named_children() if isinstance(m, nn.ReLU)]
    after = data.draw(st.sampled_from(relus))
    new, report = expand(model, Deepen(after, count=data.draw(st.integers(1, 3))))
    assert report.preserving and report.preservation_error == 0.0


@pytest.mark.parametrize("init", ["random", "copy"])
def test_deepen_not_preserving_inits_differ(init):
    model = build([6, 6, 6, 3], act=nn.GELU)
    new, report = expand(model, Deepen("1", count=2, init=init))
    assert not report.preserving and report.preservation_error > 1e-3


def test_deepen_identity_claims():
    model = build([4, 5, 5, 3], act=nn.ReLU)  # 0 Linear, 1 ReLU, 2 Linear, 3 ReLU, 4 Linear
    assert expand(model, Deepen("0"))[1].preserving  # followed by a ReLU: relu(relu(h)) = relu(h)
    assert expand(model, Deepen("1"))[1].preserving  # after a ReLU output
    out = expand(model, Deepen("4"))[1]  # the output layer has no activation, so neither has the block
    assert out.preserving and out.changes[0].detail["activation"] is None and out.preservation_error == 0.0
    bn = build([4, 5, 5, 3], act=nn.ReLU, norm="bn", norm_first=False)  # Linear, ReLU, BN, ...
    r = expand(bn, Deepen("2"))[1]  # BatchNorm outputs can be negative: relu would clip them
    assert not r.preserving and "may be negative" in r.changes[0].note and r.preservation_error > 1e-3
    gelu = build([4, 5, 5, 3], act=nn.GELU)
    r = expand(gelu, Deepen("1"))[1]
    assert not r.preserving and "GELU" in r.changes[0].note and r.preservation_error > 1e-3


def test_deepen_keeps_custom_names_and_reports_final_paths():
    from collections import OrderedDict

    model = nn.Sequential(OrderedDict(fc1=nn.Linear(3, 4), act=nn.ReLU(), out=nn.Linear(4, 2)))
    new, report = expand(model, Deepen("act", count=2), Widen("fc1", size=6))
    assert list(dict(new.named_children())) == ["fc1", "act", "act_grow0", "act_grow0_act", "act_grow1",
                                                "act_grow1_act", "out"]
    assert [c.path for c in report.changes] == ["act_grow0", "act_grow1", "fc1"]
    assert report.preserving and report.preservation_error <= TOL


# ---------------------------------------------------------------- composition, report, determinism


@FAST
@given(model=mlps(), data=st.data())
def test_random_spec_sequences(model, data):
    specs = []
    for _ in range(data.draw(st.integers(1, 4))):
        if data.draw(st.booleans()):
            specs.append(Widen("*", factor=data.draw(st.sampled_from([1.0, 1.5, 2.0])),
                               init=data.draw(st.sampled_from(["net2net", "zero", "random"]))))
        else:
            specs.append(Deepen("0", count=data.draw(st.integers(1, 2)),
                                init=data.draw(st.sampled_from(["identity", "random"]))))
    snap = snapshot(model)
    new, report = expand(model, *specs, generator=torch.Generator().manual_seed(1))
    assert_untouched(model, snap)
    assert_consistent(new, model, report)
    assert [s["type"] for s in report.specs] == [type(s).__name__ for s in specs]
    if report.preserving:
        assert report.preservation_error <= tolerance(model)


def test_generator_makes_expansion_deterministic():
    model = build([5, 7, 6, 3], act=nn.GELU, norm="bn")
    specs = (Widen("*", factor=1.6), Widen("0", size=20, init="random", noise=0.01), Deepen("2", init="random"))
    a, ra = expand(model, *specs, generator=torch.Generator().manual_seed(7))
    b, rb = expand(model, *specs, generator=torch.Generator().manual_seed(7))
    c, _ = expand(model, *specs, generator=torch.Generator().manual_seed(8))
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert ra == rb
    assert any(not torch.equal(a.state_dict()[k], c.state_dict()[k]) for k in a.state_dict())


def test_report_json_and_explicit_check_inputs():
    model = build([5, 7, 3])
    x = torch.randn(10, 5)
    new, report = expand(model, Widen("0", factor=2), check_inputs=x)
    assert report.check_inputs_shape == [10, 5]
    assert report.preservation_error == preservation_error(model, new, x)
    again = ExpansionReport.from_json(report.to_json(indent=2))
    assert again == report and again.changes[0].op == "widen"
    assert "params 66 -> 129" in report.summary()


def test_report_to_json_takes_a_path(tmp_path):
    """``to_json(path)`` returns the JSON text and writes it to ``path``, as the other result
    classes do; ``to_json()`` and ``to_json(indent=2)`` are as before; ``from_json`` takes the
    text or the path."""
    _, report = expand(build([5, 7, 3]), Widen("0", factor=2), Deepen(after="1"))
    path = tmp_path / "expansion.json"
    text = report.to_json(path)
    assert path.read_text() == text == report.to_json()
    assert ExpansionReport.from_json(path) == report
    assert ExpansionReport.from_json(str(path)) == report
    assert ExpansionReport.from_json(text) == report
    indented = report.to_json(str(tmp_path / "indented.json"), indent=2)
    assert indented == report.to_json(indent=2) == (tmp_path / "indented.json").read_text()
    assert "\n  " in indented and ExpansionReport.from_json(indented) == report
    assert not list(tmp_path.glob("*.tmp"))  # written atomically, nothing left behind


def test_report_base_paths_and_weight_shapes():
    """Each change names its module in the base and the grown model, and the shapes of the weights
    it changed as torch stores them (nn.Linear: (out, in)); an inserted layer has no base path."""
    model = build([4, 5, 6, 3])
    _, report = expand(model, Deepen(after="1", init="identity"), Widen("*", factor=2))
    got = [(c.op, c.path, c.base_path, c.weights) for c in report.changes]
    assert got[0] == ("deepen", "2", None, {"weight": [[], [5, 5]], "bias": [[], [5]]})
    assert ("widen", "0", "0", {"weight": [[5, 4], [10, 4]], "bias": [[5], [10]]}) in got
    assert ("widen", "2", None, {"weight": [[5, 5], [10, 10]], "bias": [[5], [10]]}) in got
    assert ("widen", "4", "2", {"weight": [[6, 5], [12, 10]], "bias": [[6], [12]]}) in got
    assert "widen 4 (base: 2)" in report.summary() and "deepen 2 (new)" in report.summary()
    assert ExpansionReport.from_json(report.to_json()) == report


def test_base_train_mode_and_grad_flags_kept():
    model = build([5, 7, 3], norm="bn", dropout=True).train()
    model[0].weight.requires_grad_(False)
    new, _ = expand(model, Widen("0", factor=2))
    assert model.training and all(m.training for m in model.modules())
    assert new.training and not new[0].weight.requires_grad and new[-1].weight.requires_grad


def test_expanded_model_trains():
    model = build([5, 7, 6, 3], norm="ln", norm_first=False)
    new, _ = expand(model, Widen("*", factor=2), Deepen("1"))
    opt = torch.optim.SGD(new.parameters(), lr=0.1)
    loss = new(torch.randn(8, 5)).square().mean()
    loss.backward()
    opt.step()
    assert all(p.grad is not None for p in new.parameters())


# ---------------------------------------------------------------- errors


MLP = lambda: build([4, 5, 3])  # noqa: E731  (0 Linear, 1 ReLU, 2 Linear)


@pytest.mark.parametrize("make,exc,msg", [
    (lambda: Widen("0"), ValueError, r"give exactly one of factor or size, got factor=None, size=None"),
    (lambda: Widen("0", factor=2, size=8), ValueError, r"give exactly one of factor or size, got factor=2, size=8"),
    (lambda: Widen("0", factor=0.5), ValueError, r"factor must be a real number >= 1, got 0.5"),
    (lambda: Widen("0", size=0), ValueError, r"size must be a positive integer, got 0"),
    (lambda: Widen("0", size=2.5), ValueError, r"size must be a positive integer, got 2.5"),
    (lambda: Widen("0", factor=2, init="xavier"), ValueError,
     r"init must be one of \('net2net', 'zero', 'random'\), got 'xavier'"),
    (lambda: Widen("0", factor=2, noise=-1), ValueError, r"noise must be a real number >= 0.*got -1"),
    (lambda: Widen(0, factor=2), TypeError, r"target must be a non-empty module path"),
    (lambda: Deepen("0", count=0), ValueError, r"count must be an integer >= 1, got 0"),
    (lambda: Deepen("0", init="eye"), ValueError,
     r"init must be one of \('identity', 'zero', 'random', 'copy'\), got 'eye'"),
])
def test_spec_errors(make, exc, msg):
    with pytest.raises(exc, match=msg):
        make()


@pytest.mark.parametrize("model,spec,exc,msg", [
    (MLP(), Widen("9", factor=2), ValueError, r"target='9' matches no module; the model's paths are \['0', '1', '2'\]"),
    (MLP(), Widen("[12]", factor=2), ValueError, r"target='\[12\]' matches no hidden nn.Linear"),
    (MLP(), Widen("1", factor=2), TypeError, r"module '1' is ReLU, expected nn.Linear"),
    (MLP(), Widen("2", factor=2), ValueError, r"module '2' \(Linear, out_features=3\) is the output layer"),
    (MLP(), Widen("0", size=3), ValueError, r"module '0' \(Linear\) has width 5; size must be >= 5, got 3"),
    (nn.Sequential(nn.Linear(4, 5), nn.Softmax(-1), nn.Linear(5, 2)), Widen("0", factor=2), TypeError,
     r"module '1' \(Softmax\) is not supported between '0' and '2' when widening"),
    (nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(7), nn.Linear(7, 2)), Widen("0", factor=2), ValueError,
     r"module '1' \(BatchNorm1d\) has num_features=7, expected 5"),
    (MLP(), Deepen("5"), ValueError, r"after='5' matches no module"),
    (MLP(), Deepen("0", init="zero"), ValueError, r"init='zero' needs a residual block.*use init='identity'"),
    (MLP(), Deepen("1", init="copy"), ValueError,
     r"copies module '0' \(Linear\), which must be square; its shape is in_features=4, out_features=5"),
    (nn.Sequential(nn.Dropout(), nn.Linear(4, 2)), Deepen("0"), ValueError,
     r"no nn.Linear at or before module '0' \(Dropout\)"),
    (nn.Sequential(nn.Linear(4, 5), nn.Softmax(-1), nn.Linear(5, 2)), Deepen("1"), TypeError,
     r"module '1' \(Softmax\) is not supported between '0' and the insertion point '1'"),
    (nn.Linear(4, 2), Widen("0", factor=2), TypeError, r"model must be an nn.Sequential.*got Linear"),
    (MLP(), "widen", TypeError, r"each spec must be a Widen or Deepen, got str"),
])
def test_expand_errors(model, spec, exc, msg):
    snap = snapshot(model)
    with pytest.raises(exc, match=msg):
        expand(model, spec)
    assert_untouched(model, snap)
