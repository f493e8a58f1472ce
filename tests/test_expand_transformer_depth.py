"""Deepen on TinyTransformer: insert pre-LN TransformerBlocks after ``blocks.<i>``.

``zero`` (proj and ff2 zero) is exact: max |expanded(x) - base(x)| <= 1e-5 in float32, eval mode,
random LayerNorm parameters (measured: 0). ``random`` and ``copy`` are not preserving.
"""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from manifold_ext.expand import Deepen, ExpansionReport, Widen, expand
from manifold_ext.models import TransformerBlock

from test_expand_transformer import TOL, assert_untouched, gen, n_params, snapshot, tokens, transformer


def block_params(width, heads, ff):
    return n_params(TransformerBlock(width, heads, ff))


@pytest.mark.parametrize("after,count", [("blocks.0", 1), ("blocks.0", 3), ("blocks.1", 2), ("blocks.*", 2)])
def test_zero_preserves(after, count):
    base = transformer(0)
    snap = snapshot(base)
    x = tokens()
    new, report = expand(base, Deepen(after, count=count, init="zero"), generator=gen())
    assert_untouched(base, snap)
    hits = 2 if after == "blocks.*" else 1
    assert len(new.blocks) == 2 + hits * count
    assert all(isinstance(b, TransformerBlock) for b in new.blocks)
    with torch.no_grad():
        err = (new(x) - base(x)).abs().max().item()
    assert err <= TOL
    assert report.preserving and report.preservation_error <= TOL
    assert len(report.changes) == hits * count
    for c in report.changes:
        assert c.op == "deepen" and c.kind == "TransformerBlock" and c.init == "zero" and c.exact
        assert c.after == [16, 2] and c.before == []
        assert c.detail["params"] == block_params(16, 2, 64)
        blk = new.get_submodule(c.path)
        assert isinstance(blk, TransformerBlock) and blk not in list(base.blocks)
        for lin in (blk.proj, blk.ff2):
            assert not lin.weight.any() and not lin.bias.any()
        assert blk.qkv.weight.abs().sum() > 0 and blk.ff1.weight.abs().sum() > 0
    assert report.params_after - report.params_before == hits * count * block_params(16, 2, 64)
    assert report.params_after == n_params(new) and report.params_before == n_params(base)


def test_positions_and_renumbering():
    base = transformer(0, depth=3)
    new, report = expand(base, Deepen("blocks.1", count=2, init="zero"), generator=gen())
    assert [c.path for c in report.changes] == ["blocks.2", "blocks.3"]
    assert [c.detail["index"] for c in report.changes] == [2, 3]
    assert all(c.detail["after"] == "blocks.1" for c in report.changes)
    # the original blocks keep their weights, now at 0, 1, 4
    for i_new, i_old in ((0, 0), (1, 1), (4, 2)):
        for k, v in base.blocks[i_old].state_dict().items():
            assert torch.equal(new.blocks[i_new].state_dict()[k], v)
    # a later spec sees the renumbered model; the report gives final paths
    new2, rep2 = expand(base, Deepen("blocks.0", init="zero"), Deepen("blocks.0", init="zero"), generator=gen())
    assert len(new2.blocks) == 5
    assert sorted(c.path for c in rep2.changes) == ["blocks.1", "blocks.2"]
    assert rep2.preservation_error <= TOL


@pytest.mark.parametrize("init", ["random", "copy"])
def test_not_preserving(init):
    base = transformer(0)
    snap = snapshot(base)
    x = tokens()
    new, report = expand(base, Deepen("blocks.0", count=2, init=init), generator=gen())
    assert_untouched(base, snap)
    with torch.no_grad():
        assert (new(x) - base(x)).abs().max().item() > 1e-3
    assert not report.preserving and report.preservation_error > 1e-3
    assert all(not c.exact for c in report.changes)
    assert report.params_after - report.params_before == 2 * block_params(16, 2, 64)
    if init == "copy":
        for blk in (new.blocks[1], new.blocks[2]):
            for k, v in base.blocks[0].state_dict().items():
                assert torch.equal(blk.state_dict()[k], v)
            assert blk is not new.blocks[0]
    else:
        b1, b2 = new.blocks[1], new.blocks[2]
        assert not torch.equal(b1.qkv.weight, b2.qkv.weight)
        assert b1.proj.weight.abs().sum() > 0 and b1.ff2.weight.abs().sum() > 0
        assert torch.equal(b1.ln1.weight, torch.ones(16)) and not b1.ln1.bias.any()


@pytest.mark.parametrize("init", ["zero", "random", "copy"])
def test_noise_not_preserving(init):
    base = transformer(0)
    new, report = expand(base, Deepen("blocks.1", init=init, noise=0.05), generator=gen())
    assert not report.preserving and "noise std 0.05" in report.changes[0].note
    assert report.preservation_error > 1e-4


def test_generator_reproducible_and_training_continues():
    base = transformer(0).train()
    a, _ = expand(base, Deepen("blocks.0", init="zero"), generator=gen(3))
    b, _ = expand(base, Deepen("blocks.0", init="zero"), generator=gen(3))
    for (k, v), (k2, v2) in zip(a.state_dict().items(), b.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert base.training and all(m.training for m in a.modules())
    loss = a(tokens()).sum()
    loss.backward()
    assert a.blocks[1].ff2.weight.grad.abs().sum() > 0  # zero projections still learn


def test_after_added_heads_and_widened_ff():
    base = transformer(0)
    grown, _ = expand(base, Widen("blocks.0.qkv", size=3, init="zero"), Widen("blocks.0.ff1", size=80), generator=gen())
    for init in ("zero", "random", "copy"):
        new, report = expand(grown, Deepen("blocks.0", init=init), generator=gen())
        blk = new.blocks[1]
        assert blk.heads == 3 and blk.qkv.out_features == 3 * 3 * 8 and blk.ff1.out_features == 80
        assert report.changes[0].detail["head_dim"] == 8 and report.changes[0].after == [16, 3]
        if init == "zero":
            assert report.preservation_error <= TOL
    new, report = expand(base, Widen("blocks.0.qkv", size=3, init="zero"), Deepen("blocks.0", init="zero"),
                         Widen("blocks.1.ff1", factor=2), generator=gen())
    assert report.preserving and report.preservation_error <= TOL


def test_report_json_roundtrip():
    base = transformer(0)
    _, report = expand(base, Deepen("blocks.*", init="zero"), generator=gen())
    again = ExpansionReport.from_json(report.to_json())
    assert again == report
    assert json.loads(report.to_json())["changes"][0]["kind"] == "TransformerBlock"


ERRORS = [
    (Deepen("blocks.0", init="identity"), ValueError, r"init='identity' inserts a plain layer, which TinyTransformer does not take"),
    (Deepen("blocks", init="zero"), TypeError, r"module 'blocks' \(ModuleList\) is not a TransformerBlock of TinyTransformer"),
    (Deepen("blocks.0.ff1", init="zero"), TypeError, r"module 'blocks.0.ff1' \(Linear\) is not a TransformerBlock.*\['blocks.0', 'blocks.1'\]"),
    (Deepen("tok", init="random"), TypeError, r"module 'tok' \(Embedding\) is not a TransformerBlock"),
    (Deepen("blocks.7", init="zero"), ValueError, r"'blocks.7' matches no block of TinyTransformer; its blocks are \['blocks.0', 'blocks.1'\]"),
]


@pytest.mark.parametrize("spec,exc,msg", ERRORS)
def test_errors(spec, exc, msg):
    base = transformer(0)
    snap = snapshot(base)
    with pytest.raises(exc, match=msg):
        expand(base, spec)
    assert_untouched(base, snap)


def test_spec_errors():
    with pytest.raises(ValueError, match=r"count must be an integer >= 1, got 0"):
        Deepen("blocks.0", count=0, init="zero")
    with pytest.raises(ValueError, match=r"init must be one of"):
        Deepen("blocks.0", init="net2net")


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000), depth=st.integers(1, 3), heads=st.sampled_from([1, 2, 4]),
    hd=st.sampled_from([2, 4]), count=st.integers(1, 3), init=st.sampled_from(["zero", "random", "copy"]),
    where=st.integers(0, 2),
)
def test_property(seed, depth, heads, hd, count, init, where):
    width = heads * hd
    base = transformer(seed, width=width, heads=heads, depth=depth)
    snap = snapshot(base)
    after = f"blocks.{where % depth}"
    x = tokens(seed=seed + 1)
    new, report = expand(base, Deepen(after, count=count, init=init), generator=gen(seed))
    assert_untouched(base, snap)
    assert len(new.blocks) == depth + count
    y = new(x)
    assert y.shape == base(x).shape and torch.isfinite(y).all()
    assert report.params_after - report.params_before == count * block_params(width, heads, 4 * width)
    err = (y - base(x)).abs().max().item()
    if init == "zero":
        assert report.preserving and err <= TOL
    else:
        assert not report.preserving and err > 1e-6


# --- embedding (residual) width: Widen("tok", factor=k), net2net ---------------------------------

@pytest.mark.parametrize("depth,heads", [(1, 2), (2, 2), (3, 4)])
@pytest.mark.parametrize("how", [{"factor": 2}, {"factor": 3}, {"factor": 2.0}, {"size": 48}, {"factor": 1}])
def test_embedding_net2net_preserves(depth, heads, how):
    base = transformer(depth, heads=heads, depth=depth)
    snap = snapshot(base)
    x = tokens(seed=depth)
    new, report = expand(base, Widen("tok", **how), generator=gen())
    assert_untouched(base, snap)
    k = int(how.get("factor", 3) if "factor" in how else how["size"] // 16)
    m = 16 * k
    with torch.no_grad():
        err = (new(x) - base(x)).abs().max().item()
    assert err <= TOL and report.preserving and report.preservation_error <= TOL
    (c,) = report.changes
    assert c.op == "widen" and c.kind == "Embedding" and c.path == "tok" and c.exact
    assert c.before == [16] and c.after == [m] and c.detail["copies"] == k
    assert new.tok.weight.shape == (13, m) and new.pos.weight.shape == (6, m) and new.tok.embedding_dim == m
    assert new.ln_f.normalized_shape == (m,) and new.head.weight.shape == (5, m)
    g = torch.arange(m) % 16
    assert torch.equal(new.tok.weight, base.tok.weight[:, g])
    assert torch.equal(new.ln_f.weight, base.ln_f.weight[g]) and torch.equal(new.ln_f.bias, base.ln_f.bias[g])
    for b_new, b_old in zip(new.blocks, base.blocks):
        assert b_new.qkv.weight.shape == (3 * 16, m) and b_new.ff1.weight.shape == (64, m)
        assert b_new.proj.weight.shape == (m, 16) and b_new.ff2.weight.shape == (m, 64)
        assert b_new.ln1.weight.shape == (m,) and b_new.ln2.bias.shape == (m,)
        assert torch.equal(b_new.proj.weight, b_old.proj.weight[g]) and torch.equal(b_new.ff2.bias, b_old.ff2.bias[g])
        assert torch.allclose(b_new.qkv.weight, b_old.qkv.weight[:, g] / k)
        assert torch.equal(b_new.qkv.bias, b_old.qkv.bias) and b_new.heads == b_old.heads
    # parameter count: embeddings, LayerNorms and the residual-facing sides of every Linear grow by k
    D, d = 16, m - 16
    per_block = 2 * 2 * d + 3 * D * d + D * d + d + 64 * d + 64 * d + d
    assert report.params_after - report.params_before == (13 + 6) * d + 2 * d + 5 * d + depth * per_block
    assert report.params_after == n_params(new)
    new.train()
    new(x).sum().backward()  # trains


def test_embedding_composes_with_deepen_and_heads():
    base = transformer(0)
    new, report = expand(base, Widen("tok", factor=2), Deepen("blocks.0", count=2, init="zero"),
                         Widen("blocks.*.ff1", factor=2), Widen("blocks.1.qkv", size=3, init="zero"), generator=gen())
    assert report.preserving and report.preservation_error <= TOL
    assert len(new.blocks) == 4 and new.blocks[1].ln1.normalized_shape == (32,)
    _, rep2 = expand(base, Deepen("blocks.1", init="zero"), Widen("tok", factor=3), generator=gen())
    assert rep2.preserving and rep2.preservation_error <= TOL
    assert ExpansionReport.from_json(rep2.to_json()) == rep2


def test_embedding_noise_not_preserving_and_glob_skips_it():
    base = transformer(0)
    _, report = expand(base, Widen("tok", factor=2, noise=0.05), generator=gen())
    assert not report.preserving and report.preservation_error > 1e-4 and "noise std 0.05" in report.changes[0].note
    new, report = expand(base, Widen("*", factor=2, init="zero"), generator=gen())
    assert new.tok.embedding_dim == 16 and all(c.path != "tok" for c in report.changes)


EMB_ERRORS = [
    (Widen("tok", size=8), ValueError, r"module 'tok' \(Embedding\) has width 16; size must be >= 16, got 8"),
    (Widen("pos", factor=2), TypeError, r"module 'pos' \(Embedding\) cannot be widened on TinyTransformer.*'tok'"),
    (Widen("ln_f", factor=2), TypeError, r"module 'ln_f' \(LayerNorm\) cannot be widened on TinyTransformer"),
]


@pytest.mark.parametrize("spec,exc,msg", EMB_ERRORS)
def test_embedding_errors(spec, exc, msg):
    base = transformer(0)
    snap = snapshot(base)
    with pytest.raises(exc, match=msg):
        expand(base, spec)
    assert_untouched(base, snap)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), depth=st.integers(1, 3), heads=st.sampled_from([1, 2]),
       hd=st.sampled_from([4, 8]), k=st.integers(1, 4), n=st.integers(1, 6))
def test_embedding_property(seed, depth, heads, hd, k, n):
    width = heads * hd  # >= 4: a LayerNorm over 2 units is ill-conditioned (see expand.transformer)
    base = transformer(seed, width=width, heads=heads, depth=depth)
    snap = snapshot(base)
    x = tokens(n=n, T=min(n, 6), seed=seed)
    new, report = expand(base, Widen("tok", factor=k), generator=gen(seed))
    assert_untouched(base, snap)
    with torch.no_grad():
        y = new(x)
        assert y.shape == (n, 5) and (y - base(x)).abs().max().item() <= TOL
    assert report.preserving and report.preservation_error <= TOL
    assert new.tok.embedding_dim == k * width
