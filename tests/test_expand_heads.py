"""Widen attention heads with init='net2net' (copied heads, proj columns divided among copies).

Preservation: max |expanded(x) - base(x)| <= 1e-5, float32, eval, random LayerNorm parameters.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from manifold_ext.expand import Widen, expand, preservation_error
from test_expand_transformer import assert_untouched, gen, snapshot, tokens, transformer

TOL = 1e-5


@pytest.mark.parametrize("how", [dict(factor=2), dict(factor=1.5), dict(size=3), dict(size=7), dict(factor=3)])
def test_heads_net2net_preserves(how):
    base = transformer(0, width=16, heads=2)
    snap = snapshot(base)
    new, report = expand(base, Widen("blocks.*.qkv", init="net2net", **how), generator=gen(1), check_inputs=tokens())
    assert_untouched(base, snap)
    assert report.preserving and all(c.exact for c in report.changes)
    assert report.preservation_error <= TOL
    for blk, c in zip(new.blocks, report.changes):
        m = c.after[1]
        assert blk.heads == m and c.detail["copied"] == m - 2 and c.detail["fresh"] == 0
        assert blk.qkv.weight.shape == (3 * m * 8, 16) and blk.proj.weight.shape == (16, m * 8)
    assert report.params_after > report.params_before


def test_heads_net2net_copies_and_divides():
    base = transformer(3, width=12, heads=3, depth=1)
    new, report = expand(base, Widen("blocks.0.qkv", size=8, init="net2net"), generator=gen(2))
    c = report.changes[0]
    src = torch.tensor(list(range(3)) + c.detail["sources"])
    counts = torch.bincount(src, minlength=3)
    assert counts.max() - counts.min() <= 1  # balanced: 8 = 3 + 3 + 2
    b, e = base.blocks[0], new.blocks[0]
    hd, E, E2 = 4, 12, 32
    for t in range(3):
        ow = b.qkv.weight[t * E:(t + 1) * E].reshape(3, hd, 12)
        nw = e.qkv.weight[t * E2:(t + 1) * E2].reshape(8, hd, 12)
        ob = b.qkv.bias[t * E:(t + 1) * E].reshape(3, hd)
        nb = e.qkv.bias[t * E2:(t + 1) * E2].reshape(8, hd)
        for j in range(8):
            assert torch.equal(nw[j], ow[src[j]]) and torch.equal(nb[j], ob[src[j]])
    op, np_ = b.proj.weight.reshape(12, 3, hd), e.proj.weight.reshape(12, 8, hd)
    for j in range(8):
        torch.testing.assert_close(np_[:, j], op[:, src[j]] / counts[src[j]])
    assert torch.equal(e.proj.bias, b.proj.bias)


@settings(max_examples=25, deadline=None)
@given(heads=st.sampled_from([1, 2, 4]), depth=st.integers(1, 3), extra=st.integers(1, 6), seed=st.integers(0, 10**6))
def test_heads_net2net_property(heads, depth, extra, seed):
    base = transformer(seed % 1000, width=8, heads=heads, depth=depth)
    snap = snapshot(base)
    new, report = expand(base, Widen("blocks.*.qkv", size=heads + extra, init="net2net"), generator=gen(seed))
    assert_untouched(base, snap)
    assert report.preserving and report.preservation_error <= TOL
    assert preservation_error(base, new, tokens(8, seed=seed)) <= TOL
    assert all(b.heads == heads + extra for b in new.blocks)


def test_heads_net2net_with_other_widening_and_default_init():
    base = transformer(1)
    new, report = expand(base, Widen("*", factor=2), generator=gen())  # default init net2net: ff and heads
    assert report.preserving and report.preservation_error <= TOL
    assert [c.kind for c in report.changes].count("Attention") == 2


def test_heads_net2net_noise_differs():
    base = transformer(2)
    snap = snapshot(base)
    new, report = expand(base, Widen("blocks.0.qkv", factor=2, init="net2net", noise=0.05), generator=gen())
    assert_untouched(base, snap)
    assert not report.preserving and "noise" in report.changes[0].note
    assert report.preservation_error > 1e-4


def test_heads_net2net_reproducible_and_train_mode():
    base = transformer(4).train()
    snap = snapshot(base)
    a, _ = expand(base, Widen("blocks.0.qkv", size=5, init="net2net"), generator=gen(7))
    b, _ = expand(base, Widen("blocks.0.qkv", size=5, init="net2net"), generator=gen(7))
    assert_untouched(base, snap)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert a.training
    a(tokens(4)).sum().backward()


def test_heads_net2net_same_size_is_noop():
    base = transformer(0)
    new, report = expand(base, Widen("blocks.0.qkv", size=2, init="net2net"), generator=gen())
    assert report.preservation_error == 0 and report.params_after == report.params_before


@pytest.mark.parametrize("spec,msg", [
    (Widen("blocks.0.qkv", size=1, init="net2net"), r"module 'blocks.0.qkv' \(attention heads\) has width 2; size must be >= 2, got 1"),
    (Widen("blocks.5.qkv", factor=2, init="net2net"), r"'blocks.5.qkv' matches no widenable module of TinyTransformer"),
])
def test_heads_net2net_errors(spec, msg):
    base = transformer(0)
    snap = snapshot(base)
    with pytest.raises(ValueError, match=msg):
        expand(base, spec)
    assert_untouched(base, snap)
