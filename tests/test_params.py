"""Parameter-space utilities (manifold_ext.params): states, stacking and combining vertices,
flattening, random directions (Li et al. 2018), distances, and simplex volumes."""

import math
import re

import pytest
import torch

from manifold_ext import params as P

from _models import TinyTransformer, cnn, mlp, randomise_bn


def raises_exactly(exc, message):
    """pytest.raises for exactly this message (not a pattern, not a substring)."""
    return pytest.raises(exc, match="^" + re.escape(message) + "$")


def states(*vertices):
    return [P.state_of(v) for v in vertices]


def const(value, n):
    return {"w": torch.full((n,), value, dtype=torch.float64)}


# ------------------------------------------------------------------------------------ state_of

CNN_PARAMS = ["0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias",
              "4.weight", "4.bias", "7.weight", "7.bias"]
CNN_BUFFERS = ["1.running_mean", "1.running_var", "1.num_batches_tracked",
               "4.running_mean", "4.running_var", "4.num_batches_tracked"]


def test_state_of_module_is_params_then_buffers_detached():
    model = randomise_bn(cnn(seed=1), seed=2)
    st = P.state_of(model)
    assert list(st) == CNN_PARAMS + CNN_BUFFERS
    for name, t in st.items():
        assert not t.requires_grad
        src = model.get_parameter(name) if name in CNN_PARAMS else model.get_buffer(name)
        assert t.data_ptr() == src.data_ptr()  # a view of the module's tensor, not a copy
        assert torch.equal(t, src.detach())
    assert st["1.num_batches_tracked"].dtype == torch.int64


def test_state_of_state_dict_keeps_tensors_in_order_and_detaches():
    w = torch.randn(3, 2, requires_grad=True)
    sd = {"w": w, "step": 7, "b": torch.arange(3.0), "note": "x", "n": torch.tensor(4)}
    st = P.state_of(sd)
    assert list(st) == ["w", "b", "n"]
    assert not st["w"].requires_grad and torch.equal(st["w"], w.detach())
    assert torch.equal(st["n"], torch.tensor(4))
    # A module's state dict gives the same tensors as the module.
    model = cnn(seed=3)
    assert set(P.state_of(model.state_dict())) == set(P.state_of(model))


@pytest.mark.parametrize("bad,typename", [(42, "int"), ([torch.zeros(2)], "list"), (None, "NoneType")])
def test_state_of_rejects_other_inputs(bad, typename):
    with raises_exactly(TypeError, f"expected a vertex to be an nn.Module or a state dict, got {typename}"):
        P.state_of(bad)


# ---------------------------------------------------------------------- check_same_architecture

def test_same_architecture_passes():
    assert P.check_same_architecture(states(mlp(0), mlp(1), mlp(2))) is None
    assert P.check_same_architecture(states(cnn(0))) is None


def test_missing_parameter_message():
    a, b, c = states(mlp(0), mlp(1), mlp(2))
    del c["2.bias"]
    with raises_exactly(ValueError, "vertex 2 has no parameter '2.bias' (vertex 0 has it, shape (24,))"):
        P.check_same_architecture([a, b, c])


def test_extra_parameter_message():
    a, b = states(mlp(0), mlp(1))
    b["extra"] = torch.zeros(2, 3)
    with raises_exactly(ValueError, "vertex 1 has a parameter 'extra' that vertex 0 lacks (shape (2, 3))"):
        P.check_same_architecture([a, b])


def test_shape_mismatch_names_first_parameter_in_module_order():
    # Widths 24 -> 25 change 2.weight, 2.bias and 4.weight; the first in module order is named.
    a, b = states(mlp(0, widths=(64, 32, 24, 10)), mlp(1, widths=(64, 32, 25, 10)))
    msg = "parameter '2.weight' has shape (25, 32) in vertex 1 but (24, 32) in vertex 0"
    with raises_exactly(ValueError, msg):
        P.check_same_architecture([a, b])
    with raises_exactly(ValueError, msg):
        P.stack([mlp(0, widths=(64, 32, 24, 10)), mlp(1, widths=(64, 32, 25, 10))])


def test_dtype_mismatch_message():
    msg = "parameter '0.weight' has dtype torch.float32 in vertex 1 but torch.float64 in vertex 0"
    with raises_exactly(ValueError, msg):
        P.check_same_architecture(states(mlp(0).double(), mlp(1)))


def test_empty_list_message():
    with raises_exactly(ValueError, "expected at least one vertex, got none"):
        P.check_same_architecture([])
    with raises_exactly(ValueError, "expected at least one vertex, got none"):
        P.stack([])


# ------------------------------------------------------------------------------ stack / combine

def _bn_vertices():
    a, b = randomise_bn(cnn(seed=0), seed=10), randomise_bn(cnn(seed=1), seed=11)
    for i in (1, 4):
        a[i].num_batches_tracked.fill_(5)
        b[i].num_batches_tracked.fill_(9)
    return a, b


def test_stack_shapes_and_values():
    a, b = _bn_vertices()
    sa, sb = states(a, b)
    stacked = P.stack([a, b.state_dict()])  # modules and state dicts mix
    assert list(stacked) == list(sa)
    for n, t in stacked.items():
        assert t.shape == (2, *sa[n].shape) and t.dtype == sa[n].dtype
        assert torch.equal(t[0], sa[n]) and torch.equal(t[1], sb[n])


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0, -0.5, 1.7])
def test_combine_is_linear_interpolation(t):
    a, b = _bn_vertices()
    sa, sb = states(a, b)
    point = P.combine(P.stack([a, b]), torch.tensor([1 - t, t]))
    assert list(point) == list(sa)
    for n, x in point.items():
        assert x.shape == sa[n].shape and x.dtype == sa[n].dtype
        if sa[n].is_floating_point():
            expected = (1 - t) * sa[n].double() + t * sb[n].double()
            torch.testing.assert_close(x.double(), expected, rtol=1e-6, atol=1e-6)
        else:  # num_batches_tracked: from vertex 0, whatever the coefficients
            assert torch.equal(x, sa[n]) and x.item() == 5
    if t in (0.0, 1.0):  # the vertices themselves, exactly (the counter still from vertex 0)
        for n in sa:
            if sa[n].is_floating_point():
                assert torch.equal(point[n], (sa if t == 0.0 else sb)[n])


def test_combine_extrapolates_outside_the_segment():
    a, b = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, -2.0])}
    stacked = P.stack([a, b])
    assert torch.equal(P.combine(stacked, torch.tensor([-1.0, 2.0]))["w"], torch.tensor([5.0, -6.0]))
    assert torch.equal(P.combine(stacked, torch.tensor([1.5, -0.5]))["w"], torch.tensor([0.0, 4.0]))


def test_combine_three_vertices_float64():
    vs = [{"w": torch.tensor([[1.0, 0.0]], dtype=torch.float64) * k} for k in (1, 2, 4)]
    out = P.combine(P.stack(vs), torch.tensor([0.5, 0.25, 0.25]))["w"]
    assert out.dtype == torch.float64
    assert torch.equal(out, torch.tensor([[0.5 + 0.5 + 1.0, 0.0]], dtype=torch.float64))


# --------------------------------------------------------------------------- flatten / unflatten

def _hand_state():
    return {"a": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "n": torch.tensor([7, 8]),
            "b": torch.tensor([5.0, 6.0])}


def test_flatten_order_and_names():
    st = _hand_state()
    assert torch.equal(P.flatten(st), torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))  # int skipped
    assert torch.equal(P.flatten(st, ["b", "a"]), torch.tensor([5.0, 6.0, 1.0, 2.0, 3.0, 4.0]))
    assert torch.equal(P.flatten(st, ["b", "n"]), torch.tensor([5.0, 6.0]))


def test_unflatten_round_trip_on_a_model():
    st = P.state_of(randomise_bn(cnn(seed=4), seed=5))
    vec = P.flatten(st)
    floats = [n for n in st if st[n].is_floating_point()]
    assert vec.shape == (sum(st[n].numel() for n in floats),)
    back = P.unflatten(vec, st)
    assert list(back) == floats  # num_batches_tracked is not part of the vector
    for n in floats:
        assert back[n].shape == st[n].shape and torch.equal(back[n], st[n])
    # And the other way: a vector survives unflatten then flatten.
    v = torch.randn_like(vec)
    assert torch.equal(P.flatten(P.unflatten(v, st)), v)


def test_unflatten_names_subset():
    st = _hand_state()
    out = P.unflatten(torch.tensor([9.0, 10.0]), st, names=["b"])
    assert list(out) == ["b"] and torch.equal(out["b"], torch.tensor([9.0, 10.0]))
    out = P.unflatten(torch.arange(6.0), st, names=["b", "a"])
    assert torch.equal(out["b"], torch.tensor([0.0, 1.0]))
    assert torch.equal(out["a"], torch.tensor([[2.0, 3.0], [4.0, 5.0]]))


def test_flatten_unflatten_errors():
    st = _hand_state()
    msg = "expected at least one floating-point tensor to flatten, got none"
    with raises_exactly(ValueError, msg):
        P.flatten(st, ["n"])
    with raises_exactly(ValueError, msg):
        P.flatten(st, [])
    with raises_exactly(ValueError, "expected vector of shape (6,), got (5,)"):
        P.unflatten(torch.zeros(5), st)
    with raises_exactly(ValueError, "expected vector of shape (6,), got (2, 3)"):
        P.unflatten(torch.zeros(2, 3), st)
    with raises_exactly(ValueError, "expected vector of shape (2,), got (6,)"):
        P.unflatten(torch.zeros(6), st, names=["b"])


# ------------------------------------------------------------------------------ random_direction

MODELS = {"mlp": lambda: mlp(0), "cnn": lambda: randomise_bn(cnn(0), seed=1),
          "transformer": lambda: TinyTransformer(seed=0)}


def _filter_norms(t):
    return t.double().reshape(t.shape[0], -1).norm(dim=1)


def test_parameter_names():
    assert P.parameter_names(cnn(0)) == CNN_PARAMS


def test_random_direction_is_deterministic_with_a_generator():
    st = P.state_of(cnn(0))
    for kind in ("filter", "gaussian"):
        d1 = P.random_direction(st, kind=kind, generator=torch.Generator().manual_seed(3))
        d2 = P.random_direction(st, kind=kind, generator=torch.Generator().manual_seed(3))
        d3 = P.random_direction(st, kind=kind, generator=torch.Generator().manual_seed(4))
        assert all(torch.equal(d1[n], d2[n]) for n in st)
        assert not torch.equal(d1["0.weight"], d3["0.weight"])


@pytest.mark.parametrize("model", list(MODELS))
def test_filter_normalised_biasbn(model):
    st = P.state_of(MODELS[model]())
    d = P.random_direction(st, generator=torch.Generator().manual_seed(0))
    assert list(d) == list(st)
    for n, w in st.items():
        assert d[n].shape == w.shape and d[n].dtype == w.dtype and d[n].device == w.device
        if w.dim() >= 2:
            torch.testing.assert_close(_filter_norms(d[n]), _filter_norms(w), rtol=1e-6, atol=0)
            assert not torch.allclose(d[n], w)  # a new direction, not the centre
        else:  # biases, norm parameters, BN statistics and counter
            assert torch.count_nonzero(d[n]) == 0


@pytest.mark.parametrize("model", list(MODELS))
def test_filter_normalised_ignore_none(model):
    st = P.state_of(MODELS[model]())
    d = P.random_direction(st, ignore="none", generator=torch.Generator().manual_seed(0))
    for n, w in st.items():
        if not w.is_floating_point():
            assert torch.count_nonzero(d[n]) == 0
        elif w.dim() >= 2:
            torch.testing.assert_close(_filter_norms(d[n]), _filter_norms(w), rtol=1e-6, atol=0)
        else:  # a 1-D tensor is normalised as a whole (LayerNorm biases start at 0: so do theirs)
            assert torch.count_nonzero(d[n]) == (w.numel() if w.abs().sum() > 0 else 0)
            assert d[n].double().norm().item() == pytest.approx(w.double().norm().item(), rel=1e-6)


def test_filter_direction_is_the_gaussian_rescaled_per_filter():
    st = P.state_of(mlp(0))
    g = P.random_direction(st, kind="gaussian", generator=torch.Generator().manual_seed(7))
    f = P.random_direction(st, kind="filter", generator=torch.Generator().manual_seed(7))
    for n, w in st.items():
        if w.dim() >= 2:
            expected = g[n].double() * (_filter_norms(w) / _filter_norms(g[n]))[:, None]
            torch.testing.assert_close(f[n].double(), expected, rtol=1e-6, atol=1e-8)


def test_names_parameter_names_leaves_buffers_alone():
    model = randomise_bn(cnn(0), seed=1)
    st = P.state_of(model)
    moved_all = P.random_direction(st, ignore="none", generator=torch.Generator().manual_seed(0))
    moved_params = P.random_direction(st, names=P.parameter_names(model), ignore="none",
                                      generator=torch.Generator().manual_seed(0))
    for n in CNN_BUFFERS:
        assert torch.count_nonzero(moved_params[n]) == 0
    for n in ("1.running_mean", "1.running_var"):  # by default, float buffers are moved too
        assert torch.count_nonzero(moved_all[n]) == st[n].numel()
    for n in CNN_PARAMS:
        assert torch.count_nonzero(moved_params[n]) == st[n].numel()
    # A subset of names: only those move.
    only = P.random_direction(st, names=["3.weight"], generator=torch.Generator().manual_seed(0))
    assert [n for n in st if torch.count_nonzero(only[n])] == ["3.weight"]


def test_gaussian_is_not_normalised():
    st = P.state_of(mlp(0))
    d = P.random_direction(st, kind="gaussian", generator=torch.Generator().manual_seed(0))
    w = st["0.weight"]  # Linear(64, 32): U(-1/8, 1/8) entries, filter norms about 0.58
    x = d["0.weight"].double()
    assert abs(x.mean().item()) < 0.1 and 0.9 < x.std().item() < 1.1  # i.i.d. N(0, 1)
    assert x.norm().item() > 5 * w.double().norm().item()
    assert not torch.allclose(_filter_norms(x), _filter_norms(w), rtol=0.1)
    assert torch.count_nonzero(d["0.bias"]) == 0  # biasbn still applies
    d = P.random_direction(st, kind="gaussian", ignore="none", generator=torch.Generator().manual_seed(0))
    assert torch.count_nonzero(d["0.bias"]) == 32


def test_random_direction_keeps_float64():
    st = P.state_of(mlp(0).double())
    d = P.random_direction(st, generator=torch.Generator().manual_seed(0))
    assert d["0.weight"].dtype == torch.float64
    torch.testing.assert_close(_filter_norms(d["0.weight"]), _filter_norms(st["0.weight"]),
                               rtol=1e-12, atol=0)


def test_random_direction_errors():
    st = P.state_of(mlp(0))
    with raises_exactly(ValueError, "kind must be 'gaussian' or 'filter', got 'layer'"):
        P.random_direction(st, kind="layer")
    with raises_exactly(ValueError, "ignore must be 'biasbn' or 'none', got 'bn'"):
        P.random_direction(st, ignore="bn")


# -------------------------------------------------------------------------------------- distance

def test_distance_known_value():
    a = {"w": torch.zeros(2, 2), "b": torch.zeros(1), "n": torch.tensor(0)}
    b = {"w": torch.tensor([[3.0, 0.0], [0.0, 0.0]]), "b": torch.tensor([4.0]), "n": torch.tensor(100)}
    assert P.distance(a, b) == 5.0  # the integer tensor is not part of the space
    assert P.distance(a, b, names=["w"]) == 3.0
    assert P.distance(a, b, names=["b", "n"]) == 4.0


def test_distance_scaled_is_layer_normalised():
    a = {"w": torch.zeros(2), "b": torch.zeros(1)}
    b = {"w": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0])}
    scale = {"w": torch.tensor([0.0, 2.0]), "b": torch.tensor([0.5])}  # norms 2 and 0.5
    assert P.distance(a, b, scale=scale) == pytest.approx(math.sqrt((3 / 2) ** 2 + (4 / 0.5) ** 2), rel=1e-15)
    # Scaling by the state itself: each tensor contributes its relative change.
    c = {"w": torch.tensor([6.0, 0.0]), "b": torch.tensor([8.0])}
    assert P.distance(b, c, scale=b) == pytest.approx(math.sqrt(2.0), rel=1e-15)


def test_distance_symmetric_zero_and_matches_flatten():
    a, b = states(randomise_bn(cnn(0), seed=1), randomise_bn(cnn(1), seed=2))
    d = P.distance(a, b)
    assert d > 0 and d == P.distance(b, a)
    assert P.distance(a, a) == 0.0 and P.distance(b, dict(b)) == 0.0
    expected = (P.flatten(a).double() - P.flatten(b).double()).norm().item()
    assert d == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------------- gram / simplex_log_volume

def _points(*coords, dtype=torch.float64):
    """Vertices as states split over two tensors, so flattening across tensors is exercised."""
    out = []
    for c in coords:
        c = torch.tensor(c, dtype=dtype)
        out.append({"a": c[:2].clone(), "n": torch.tensor(1), "b": c[2:].clone()})
    return out


def test_standard_2_simplex():
    vs = _points([0, 0, 0], [1, 0, 0], [0, 1, 0])
    G = P.gram(vs)
    assert G.dtype == torch.float64 and torch.equal(G, torch.eye(2, dtype=torch.float64))
    assert P.simplex_log_volume(vs) == pytest.approx(math.log(0.5), abs=1e-14)


def test_gram_is_edge_inner_products():
    vs = _points([1, 1, 1], [2, 1, 1], [2, 2, 1], [1, 1, 4])
    G = P.gram(vs)
    assert torch.equal(G, torch.tensor([[1.0, 1, 0], [1, 2, 0], [0, 0, 9]], dtype=torch.float64))
    # Its volume: area 1/2 triangle times height 3, over 3.
    assert P.simplex_log_volume(vs) == pytest.approx(math.log(0.5 * 3 / 3), abs=1e-14)


def test_segment_length():
    vs = _points([1, 2, 0], [4, 6, 0])  # length 5
    assert P.simplex_log_volume(vs) == pytest.approx(math.log(5.0), abs=1e-14)
    for L in (1e-3, 0.37, 2.0, 1e4):
        assert P.simplex_log_volume([const(0.0, 1), const(L, 1)]) == pytest.approx(math.log(L), abs=1e-14)


@pytest.mark.parametrize("a,b", [(3.0, 7.0), (0.01, 250.0), (1.0, 1.0)])
def test_right_triangle(a, b):
    # Right angle at (1, -2, 5, 0.5), legs along two non-axis orthogonal directions.
    o = torch.tensor([1.0, -2.0, 5.0, 0.5], dtype=torch.float64)
    u = torch.tensor([0.6, 0.8, 0.0, 0.0], dtype=torch.float64)
    w = torch.tensor([0.0, 0.0, 0.8, -0.6], dtype=torch.float64)
    vs = [{"x": o}, {"x": o + a * u}, {"x": o + b * w}]
    assert P.simplex_log_volume(vs) == pytest.approx(math.log(a * b / 2), abs=1e-12)


def test_higher_dimensional_simplices():
    # 0, e1, ..., ek: volume 1/k!.
    for k in (1, 3, 5):
        vs = [{"x": torch.zeros(k + 2, dtype=torch.float64)}]
        vs += [{"x": torch.eye(k + 2, dtype=torch.float64)[i]} for i in range(k)]
        assert P.simplex_log_volume(vs) == pytest.approx(-math.lgamma(k + 1), abs=1e-13)
    # e1, ..., e4 in R^4: the regular 3-simplex of side sqrt(2), volume sqrt(4)/3! = 1/3.
    vs = [{"x": torch.eye(4, dtype=torch.float64)[i]} for i in range(4)]
    assert P.simplex_log_volume(vs) == pytest.approx(math.log(1 / 3), abs=1e-13)


def test_degenerate_simplices_are_minus_inf():
    v = torch.randn(50, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert P.simplex_log_volume([{"x": 0 * v}, {"x": v}, {"x": 2 * v}]) == -math.inf  # collinear
    assert P.simplex_log_volume([{"x": v}, {"x": v}]) == -math.inf  # repeated vertex
    assert P.simplex_log_volume([{"x": v}, {"x": 2 * v}, {"x": -v}, {"x": 0.5 * v}]) == -math.inf
    e = torch.eye(3, dtype=torch.float64)
    coplanar = [{"x": e[0]}, {"x": e[1]}, {"x": e[2]}, {"x": (e[0] + e[1] + e[2]) / 3}]
    assert P.simplex_log_volume(coplanar) == -math.inf
    more_vertices_than_dims = [{"x": torch.tensor(c, dtype=torch.float64)}
                               for c in ([0, 0], [1, 0], [0, 1], [1, 1])]
    assert P.simplex_log_volume(more_vertices_than_dims) == -math.inf


def test_numerically_collinear_vertices_are_minus_inf():
    # 0.3 * v is v's multiple up to one rounding: no real area. Forming the Gram matrix left
    # about half of these with a finite log volume around -13 (area ~1e-6) instead.
    for seed in range(20):
        v = torch.randn(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        assert P.simplex_log_volume([{"x": 0 * v}, {"x": v}, {"x": 0.3 * v}]) == -math.inf


def test_scaling_and_translation():
    g = torch.Generator().manual_seed(0)
    vs = [{"x": torch.randn(20, dtype=torch.float64, generator=g)} for _ in range(4)]  # k = 3
    base = P.simplex_log_volume(vs)
    assert math.isfinite(base)
    for s in (0.1, 2.5, 1e3):
        scaled = [{"x": s * v["x"]} for v in vs]
        assert P.simplex_log_volume(scaled) == pytest.approx(base + 3 * math.log(s), abs=1e-10)
    shift = torch.randn(20, dtype=torch.float64, generator=g)
    assert P.simplex_log_volume([{"x": v["x"] + shift} for v in vs]) == pytest.approx(base, abs=1e-12)
    # The order of the vertices does not matter.
    assert P.simplex_log_volume(vs[::-1]) == pytest.approx(base, abs=1e-12)


def test_float64_accuracy_large_p_from_float32_states():
    # P = 10^5 float32 parameters, edges a * 1 on the first half and b * 1 on the second half:
    # orthogonal, lengths a sqrt(P/2) and b sqrt(P/2), area a b P / 4 exactly.
    n = 100_000
    a, b = 0.1, 3.3
    ones = torch.ones(n // 2)
    v0 = {"w": torch.zeros(n), "b": torch.zeros(3)}
    v1 = {"w": torch.cat([a * ones, 0 * ones]), "b": torch.zeros(3)}
    v2 = {"w": torch.cat([0 * ones, b * ones]), "b": torch.zeros(3)}
    a32, b32 = float(torch.tensor(a)), float(torch.tensor(b))  # the stored float32 values
    expected = math.log(a32 * b32 * n / 4)
    assert P.simplex_log_volume([v0, v1, v2]) == pytest.approx(expected, abs=1e-12)
    G = P.gram([v0, v1, v2])
    assert G[0, 0].item() == pytest.approx(a32 * a32 * n / 2, rel=1e-12)
    assert G[0, 1].item() == 0.0


@pytest.mark.parametrize("h", [1e-2, 1e-5, 1e-8])
def test_float64_accuracy_large_p_slivers(h):
    # A sliver triangle off a random base point in R^(10^5): unit leg u, height h along w, u ⟂ w.
    # Through the Gram matrix the condition number is squared, so at h = 1e-5 only ~4 digits
    # were left and at h = 1e-8 the area was off by a factor 2.6.
    n = 100_000
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(n, 2, dtype=torch.float64, generator=g))
    u, w = Q[:, 0], Q[:, 1]
    base = torch.randn(n, dtype=torch.float64, generator=g)
    vs = [{"x": base}, {"x": base + u}, {"x": base + u + h * w}]
    assert P.simplex_log_volume(vs) == pytest.approx(math.log(h / 2), abs=1e-6)


def test_names_select_the_subspace():
    vs = _points([0, 0, 0], [1, 0, 0], [0, 1, 5])
    assert P.simplex_log_volume(vs, names=["a"]) == pytest.approx(math.log(0.5), abs=1e-14)
    assert P.simplex_log_volume(vs, names=["b"]) == -math.inf  # the triangle projects to a segment
    # names may be any iterable, read once per call.
    assert torch.equal(P.gram(vs, names=(n for n in ["a"])), torch.eye(2, dtype=torch.float64))
    assert P.simplex_log_volume(vs, names=iter(["a"])) == pytest.approx(math.log(0.5), abs=1e-14)


def test_fewer_than_two_vertices():
    for vs in ([], _points([1, 2, 3])):
        msg = f"expected at least 2 vertices for a simplex, got {len(vs)}"
        with raises_exactly(ValueError, msg):
            P.gram(vs)
        with raises_exactly(ValueError, msg):
            P.simplex_log_volume(vs)
