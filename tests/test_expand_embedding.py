"""Widen("tok", ...) on TinyTransformer: the embedding (residual) width with every init.

net2net (any factor / size, remainder units as mean units) and zero (mean units) are exact up to
float rounding (checked at 1e-5; measured <= 2.4e-7, see ``manifold_ext.expand.transformer``);
random is not preserving (measured 0.23 to 1.1 over 40 models, checked > 1e-2).
"""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from manifold_ext.expand import Deepen, ExpansionReport, Widen, expand
from test_expand_transformer import TOL, assert_untouched, gen, n_params, snapshot, tokens, transformer

D = 16


def lns(model):
    return [m for m in model.modules() if isinstance(m, nn.LayerNorm)]


def err(a, b, x):
    with torch.no_grad():
        return (a(x) - b(x)).abs().max().item()


def check_shapes_and_count(base, new, report, m, depth=2):
    assert new.tok.weight.shape == (13, m) and new.pos.weight.shape == (6, m)
    assert new.tok.embedding_dim == m and new.pos.embedding_dim == m
    assert new.ln_f.normalized_shape == (m,) and new.head.weight.shape == (5, m)
    for b in new.blocks:
        assert b.qkv.weight.shape == (48, m) and b.ff1.weight.shape == (64, m)
        assert b.proj.weight.shape == (m, D) and b.ff2.weight.shape == (m, 64)
        assert b.ln1.weight.shape == (m,) and b.ln2.bias.shape == (m,) and b.ln1.normalized_shape == (m,)
    d = m - D
    per_block = 2 * 2 * d + 3 * D * d + D * d + d + 64 * d + 64 * d + d
    assert report.params_before == n_params(base)
    assert report.params_after == n_params(new)
    assert report.params_after - report.params_before == (13 + 6) * d + 2 * d + 5 * d + depth * per_block


PRESERVING = [
    ("zero", {"factor": 2}, 32), ("zero", {"size": 17}, 17), ("zero", {"size": 40}, 40), ("zero", {"factor": 1.5}, 24),
    ("net2net", {"factor": 1.5}, 24), ("net2net", {"size": 20}, 20), ("net2net", {"size": 40}, 40),
    ("net2net", {"factor": 2.5}, 40),
]


@pytest.mark.parametrize("init,how,m", PRESERVING)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_preserving(init, how, m, seed):
    base = transformer(seed)
    eps = [ln.eps for ln in lns(base)]
    snap = snapshot(base)
    x = tokens(seed=seed + 5)
    new, report = expand(base, Widen("tok", init=init, **how), generator=gen(seed))
    assert_untouched(base, snap)
    assert [ln.eps for ln in lns(base)] == eps  # eps is an attribute, not in the state dict
    e = err(new, base, x)
    assert e <= TOL and report.preserving and report.preservation_error <= TOL
    (c,) = report.changes
    assert c.exact and c.path == "tok" and c.kind == "Embedding" and c.init == init and c.after == [m]
    k = m // D if init == "net2net" else 1
    n_mean = m - k * D
    shrink = k * D / m
    assert c.detail["copies"] == k and c.detail["mean_units"] == n_mean and c.detail["fresh"] == 0
    assert c.detail["eps_scale"] == pytest.approx(shrink)
    for ln_new, ln_old in zip(lns(new), lns(base)):
        assert ln_new.eps == pytest.approx(ln_old.eps * shrink)
        assert torch.allclose(ln_new.weight[:D], ln_old.weight * math.sqrt(shrink))
    g = torch.arange(k * D) % D
    assert torch.equal(new.tok.weight[:, : k * D], base.tok.weight[:, g])
    if n_mean:
        assert torch.allclose(new.tok.weight[:, k * D :], base.tok.weight.mean(1, keepdim=True).expand(-1, n_mean))
        assert torch.allclose(new.blocks[0].proj.weight[k * D :], base.blocks[0].proj.weight.mean(0).expand(n_mean, -1))
        assert torch.all(new.head.weight[:, k * D :] == 0) and torch.all(new.blocks[1].qkv.weight[:, k * D :] == 0)
        assert f"{n_mean} mean units" in c.note and c.note.endswith("exact")
    check_shapes_and_count(base, new, report, m)
    assert ExpansionReport.from_json(json.dumps(json.loads(report.to_json()))) == report
    new.train()
    new(x).sum().backward()


@pytest.mark.parametrize("how,m", [({"factor": 2}, 32), ({"size": 20}, 20), ({"factor": 1.25}, 20)])
def test_random_not_preserving(how, m):
    base = transformer(3)
    snap = snapshot(base)
    x = tokens(seed=3)
    new, report = expand(base, Widen("tok", init="random", **how), generator=gen(3))
    assert_untouched(base, snap)
    (c,) = report.changes
    assert not c.exact and not report.preserving and "not preserving" in c.note
    assert err(new, base, x) > 1e-2 and report.preservation_error > 1e-2
    assert c.detail["fresh"] == m - D and c.detail["mean_units"] == 0 and c.detail["eps_scale"] == 1.0
    assert [ln.eps for ln in lns(new)] == [ln.eps for ln in lns(base)]
    assert torch.equal(new.tok.weight[:, :D], base.tok.weight)
    assert torch.all(new.ln_f.weight[D:] == 1) and torch.all(new.ln_f.bias[D:] == 0)
    assert new.head.weight[:, D:].abs().max() <= 1 / math.sqrt(m) and new.head.weight[:, D:].abs().max() > 0
    check_shapes_and_count(base, new, report, m)


def test_zero_noise_not_preserving():
    base = transformer(0)
    _, report = expand(base, Widen("tok", size=24, init="zero", noise=0.05), generator=gen())
    assert not report.preserving and report.preservation_error > 1e-4 and "noise std 0.05" in report.changes[0].note


def test_zero_composes_with_deepen_heads_and_twice():
    base = transformer(1)
    new, report = expand(base, Widen("tok", size=20, init="zero"), Deepen("blocks.0", init="zero"),
                         Widen("blocks.*.ff1", factor=1.5), Widen("blocks.1.qkv", size=3, init="zero"),
                         Widen("tok", factor=1.5), generator=gen())
    assert report.preserving and report.preservation_error <= TOL
    assert new.tok.embedding_dim == 30 and new.blocks[1].ln1.normalized_shape == (30,)
    assert err(new, base, tokens(seed=9)) <= TOL


ERRORS = [
    (Widen("tok", size=8, init="zero"), ValueError, r"module 'tok' \(Embedding\) has width 16; size must be >= 16, got 8"),
    (Widen("tok", size=15, init="random"), ValueError, r"size must be >= 16, got 15"),
    (Widen("pos", factor=2, init="zero"), TypeError, r"module 'pos' \(Embedding\) cannot be widened on TinyTransformer"),
]


@pytest.mark.parametrize("spec,exc,msg", ERRORS)
def test_errors(spec, exc, msg):
    base = transformer(0)
    snap = snapshot(base)
    with pytest.raises(exc, match=msg):
        expand(base, spec)
    assert_untouched(base, snap)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), depth=st.integers(1, 3), heads=st.sampled_from([1, 2]),
       hd=st.sampled_from([4, 8]), extra=st.integers(0, 20), init=st.sampled_from(["net2net", "zero", "random"]))
def test_property(seed, depth, heads, hd, extra, init):
    width = heads * hd
    base = transformer(seed, width=width, heads=heads, depth=depth)
    snap = snapshot(base)
    x = tokens(n=4, seed=seed)
    new, report = expand(base, Widen("tok", size=width + extra, init=init), generator=gen(seed))
    assert_untouched(base, snap)
    with torch.no_grad():
        y = new(x)
    assert y.shape == (4, 5) and new.tok.embedding_dim == width + extra
    assert report.params_after == n_params(new)
    e = (y - base(x)).abs().max().item()
    if init != "random" or extra == 0:
        assert e <= TOL and report.preserving
    else:
        assert e > 1e-4 and not report.preserving
