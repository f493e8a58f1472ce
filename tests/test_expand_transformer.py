"""Widen on TinyTransformer (feed-forward units ``blocks.<i>.ff1``, attention heads ``blocks.<i>.qkv``)
and on ResNetCNN BasicBlock inner channels (``stages.<i>.<j>.conv1``).

Preservation: max |expanded(x) - base(x)| <= 1e-5, float32, eval mode, random LayerNorm /
BatchNorm parameters and statistics.
"""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from manifold_ext.expand import Deepen, ExpansionReport, Widen, expand, preservation_error
from manifold_ext.models import ResNetCNN, TinyTransformer
from _untouched import assert_untouched, snapshot

TOL = 1e-5
VOCAB, LENGTH = 13, 6


def randomise_norms(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
                n = m.weight.numel()
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
    return model


def transformer(seed=0, width=16, heads=2, depth=2, ff_width=None):
    torch.manual_seed(seed)
    return randomise_norms(TinyTransformer(VOCAB, LENGTH, width, heads, 5, depth=depth, ff_width=ff_width), seed).eval()


def resnet(seed=0, **kw):
    torch.manual_seed(seed)
    return randomise_norms(ResNetCNN(**kw), seed).eval()


def tokens(n=32, T=LENGTH, seed=1):
    return torch.randint(0, VOCAB, (n, T), generator=torch.Generator().manual_seed(seed))


def images(n=32, seed=1):
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --- feed-forward width -------------------------------------------------------------------------

@pytest.mark.parametrize("init", ["net2net", "zero"])
@pytest.mark.parametrize("target,how", [
    ("blocks.0.ff1", {"factor": 2}), ("blocks.1.ff1", {"factor": 1.3}), ("blocks.*.ff1", {"size": 100}),
    ("blocks.*.ff1", {"factor": 3}),
])
def test_ff_preserving(init, target, how):
    base = transformer(0)
    snap = snapshot(base)
    new, report = expand(base, Widen(target, init=init, **how), generator=gen())
    assert_untouched(base, snap)
    for x in (tokens(), tokens(T=3, seed=2)):
        assert preservation_error(base, new, x) <= TOL
    assert report.preserving and report.preservation_error <= TOL
    assert report.check_inputs_shape == [64, LENGTH]
    for c in report.changes:
        blk = new.blocks[int(c.path.split(".")[1])]
        m = c.after[1]
        assert blk.ff1.out_features == m and blk.ff2.in_features == m and c.kind == "Linear"
        assert c.before == [16, 64] and c.detail["consumer"] == c.path[:-3] + "ff2"
    d = 16 * 2 + 1  # per new unit: a row of ff1 (+ bias) and a column of ff2
    assert report.params_after == n_params(new) == n_params(base) + sum((c.after[1] - 64) * d for c in report.changes)


def test_ff_net2net_copies_and_splits():
    base = transformer(0)
    new, report = expand(base, Widen("blocks.0.ff1", size=96), generator=gen())
    c = report.changes[0]
    assert c.detail == {"copied": 32, "mean_units": 0, "fresh": 0, "consumer": "blocks.0.ff2"}
    w1, w2 = new.blocks[0].ff1.weight, new.blocks[0].ff2.weight
    b1 = base.blocks[0].ff1.weight
    assert torch.equal(w1[:64], b1)
    # every new row copies an old one; the ff2 columns of a copied unit sum to the old column
    for r in range(64, 96):
        src = [s for s in range(64) if torch.equal(w1[r], b1[s])]
        assert len(src) == 1
        s = src[0]
        assert torch.allclose(w2[:, s] + w2[:, r], base.blocks[0].ff2.weight[:, s])


def test_ff_random_and_noise_not_preserving():
    base = transformer(0)
    for spec in (Widen("blocks.*.ff1", factor=2, init="random"), Widen("blocks.0.ff1", factor=2, init="zero", noise=0.1)):
        new, report = expand(base, spec, generator=gen())
        assert not report.preserving
        assert preservation_error(base, new, tokens()) > 1e-3
        assert report.preservation_error > 1e-3


# --- attention heads ------------------------------------------------------------------------------

@pytest.mark.parametrize("heads,target,how", [
    (2, "blocks.0.qkv", {"size": 3}), (2, "blocks.*.qkv", {"size": 5}), (4, "blocks.1.qkv", {"factor": 2}),
    (1, "blocks.*.qkv", {"size": 1}),
])
def test_heads_zero_preserving(heads, target, how):
    base = transformer(0, heads=heads)
    snap = snapshot(base)
    hd = 16 // heads
    new, report = expand(base, Widen(target, init="zero", **how), generator=gen())
    assert_untouched(base, snap)
    assert all(b.heads == heads for b in base.blocks)
    for x in (tokens(), tokens(T=2, seed=3)):
        assert preservation_error(base, new, x) <= TOL
    assert report.preserving and report.preservation_error <= TOL
    extra = 0
    for c in report.changes:
        blk = new.blocks[int(c.path.split(".")[1])]
        m = c.detail["heads_after"]
        assert c.kind == "Attention" and c.before == [16, heads] and c.after == [16, m] and c.detail["head_dim"] == hd
        assert blk.heads == m and blk.qkv.out_features == 3 * m * hd and blk.proj.in_features == m * hd
        assert blk.proj.out_features == 16 and blk.qkv.in_features == 16
        # old heads' q/k/v rows are kept in place inside each of the q, k, v blocks
        E, E2 = heads * hd, m * hd
        for t in range(3):
            old = base.blocks[int(c.path.split(".")[1])].qkv.weight[t * E : (t + 1) * E]
            assert torch.equal(blk.qkv.weight[t * E2 : t * E2 + E], old)
        assert torch.count_nonzero(blk.proj.weight[:, E:]) == 0
        extra += (m - heads) * hd * (3 * 16 + 3 + 16)  # q/k/v rows + biases, proj columns
    assert report.params_after == n_params(new) == n_params(base) + extra
    assert new(tokens()).shape == (32, 5)


def test_heads_random_not_preserving_and_trainable():
    base = transformer(0)
    new, report = expand(base, Widen("blocks.0.qkv", size=4, init="random"), generator=gen())
    assert not report.preserving and report.preservation_error > 1e-3
    assert preservation_error(base, new, tokens()) > 1e-3
    assert torch.count_nonzero(new.blocks[0].proj.weight[:, 16:]) > 0
    new.train()
    new(tokens()).sum().backward()
    assert new.blocks[0].qkv.weight.grad.shape == (3 * 32, 16)


def test_heads_zero_with_noise_not_preserving():
    new, report = expand(transformer(0), Widen("blocks.0.qkv", size=4, init="zero", noise=0.1), generator=gen())
    assert not report.preserving and "noise" in report.changes[0].note and report.preservation_error > 1e-4


def test_ff_and_heads_composed_and_star():
    base = transformer(1, heads=4, ff_width=24)
    new, report = expand(base, Widen("blocks.*.ff1", factor=2.5), Widen("blocks.*.qkv", size=6, init="zero"),
                         Widen("*", factor=2, init="zero"), generator=gen())
    assert [c.path for c in report.changes] == ["blocks.0.ff1", "blocks.1.ff1", "blocks.0.qkv", "blocks.1.qkv"] + [
        "blocks.0.ff1", "blocks.0.qkv", "blocks.1.ff1", "blocks.1.qkv"]
    assert [b.heads for b in new.blocks] == [12, 12] and [b.ff1.out_features for b in new.blocks] == [120, 120]
    assert report.preserving and report.preservation_error <= TOL
    assert preservation_error(base, new, tokens(seed=5)) <= TOL
    r = ExpansionReport.from_json(report.to_json())
    assert r == report and json.loads(report.to_json())["changes"][2]["kind"] == "Attention"


@settings(max_examples=15, deadline=None)
@given(width_heads=st.sampled_from([(8, 1), (8, 2), (12, 3), (16, 4)]), depth=st.integers(1, 2),
       ff=st.integers(1, 20), ff_size=st.integers(0, 25), new_heads=st.integers(0, 3),
       init=st.sampled_from(["net2net", "zero", "random"]), seed=st.integers(0, 10**6))
def test_property_transformer(width_heads, depth, ff, ff_size, new_heads, init, seed):
    width, heads = width_heads
    base = transformer(seed % 1000, width=width, heads=heads, depth=depth, ff_width=ff)
    snap = snapshot(base)
    specs = [Widen("blocks.*.ff1", size=ff + ff_size, init=init),
             Widen("blocks.*.qkv", size=heads + new_heads, init=init)]
    new, report = expand(base, *specs, generator=gen(seed))
    assert_untouched(base, snap)
    assert new(tokens(4, T=3)).shape == (4, 5)
    if init == "random":  # reported not preserving even when nothing grew (as width.widen does)
        assert not report.preserving
    else:
        assert report.preserving and report.preservation_error <= TOL
    assert report.params_after == n_params(new)


# --- ResNetCNN block-internal channels ------------------------------------------------------------

@pytest.mark.parametrize("init", ["net2net", "zero"])
@pytest.mark.parametrize("target,how", [
    ("stages.0.0.conv1", {"factor": 2}), ("stages.1.0.conv1", {"factor": 1.5}), ("*", {"factor": 1.7}),
    ("stages.*.1.conv1", {"size": 40}),
])
def test_resnet_inner_preserving(init, target, how):
    base = resnet(0, widths=(8, 16), blocks=(2, 2))
    snap = snapshot(base)
    new, report = expand(base, Widen(target, init=init, **how), generator=gen())
    assert_untouched(base, snap)
    assert preservation_error(base, new, images()) <= TOL
    assert report.preserving and report.preservation_error <= TOL
    extra = 0
    for c in report.changes:
        s, b = c.path.split(".")[1:3]
        blk = new.stages[int(s)][int(b)]
        n, m = c.before[1], c.after[1]
        assert blk.conv1.out_channels == blk.bn1.num_features == blk.conv2.in_channels == m
        assert blk.conv2.out_channels == blk.bn2.num_features == n  # the residual width is unchanged
        assert c.kind == "Conv2d" and c.detail["consumer"] == c.path[:-5] + "conv2"
        extra += (m - n) * (blk.conv1.in_channels * 9 + 2 + n * 9)  # conv1 kernel, bn1 gamma/beta, conv2 slice
    assert report.params_after == n_params(new) == n_params(base) + extra


def test_resnet_inner_random_not_preserving_then_deepen():
    base = resnet(0)
    new, report = expand(base, Widen("*", factor=2, init="random"), generator=gen())
    assert not report.preserving and report.preservation_error > 1e-3
    new, report = expand(base, Widen("*", factor=2), Deepen("stages.*", init="zero"), generator=gen())
    assert report.preserving and report.preservation_error <= TOL
    assert [c.path for c in report.changes] == ["stages.0.0.conv1", "stages.1.0.conv1", "stages.0.1", "stages.1.1"]


def test_resnet_train_mode_and_base_mode_kept():
    base = resnet(0).train()
    snap = snapshot(base)
    new, report = expand(base, Widen("stages.0.0.conv1", factor=2, init="zero"), generator=gen())
    assert_untouched(base, snap)
    assert new.training and new.stages[0][0].bn1.training
    assert report.preservation_error <= TOL
    new(images(4)).sum().backward()


# --- errors -------------------------------------------------------------------------------------

T_ERRORS = [
    (Widen("blocks.0.ff2", factor=2), TypeError, r"module 'blocks.0.ff2' \(Linear\) cannot be widened on TinyTransformer; widenable"),
    (Widen("blocks.0.proj", factor=2, init="zero"), TypeError, r"module 'blocks.0.proj' \(Linear\) cannot be widened"),
    (Widen("pos", factor=2), TypeError, r"module 'pos' \(Embedding\) cannot be widened on TinyTransformer.*'tok' \(the embedding/residual width"),
    (Widen("blocks.9.ff1", factor=2), ValueError, r"'blocks.9.ff1' matches no widenable module of TinyTransformer.*\['blocks.0.ff1', 'blocks.0.qkv'"),
    (Widen("blocks.0.ff1", size=10), ValueError, r"module 'blocks.0.ff1' \(Linear\) has width 64; size must be >= 64, got 10"),
    (Widen("blocks.0.qkv", size=1, init="zero"), ValueError, r"module 'blocks.0.qkv' \(attention heads\) has width 2; size must be >= 2, got 1"),
    (Deepen("blocks", init="zero"), TypeError, r"module 'blocks' \(ModuleList\) is not a TransformerBlock of TinyTransformer"),
]


@pytest.mark.parametrize("spec,exc,msg", T_ERRORS)
def test_transformer_errors(spec, exc, msg):
    base = transformer(0)
    snap = snapshot(base)
    with pytest.raises(exc, match=msg):
        expand(base, spec)
    assert_untouched(base, snap)


R_ERRORS = [
    (Widen("stages.0.0", factor=2), TypeError, r"module 'stages.0.0' \(BasicBlock\) cannot be widened on ResNetCNN; widenable: BasicBlock inner channels"),
    (Widen("stages.0.0.conv2", factor=2), TypeError, r"module 'stages.0.0.conv2' \(Conv2d\) cannot be widened"),
    (Widen("stem.0", factor=2), TypeError, r"module 'stem.0' \(Conv2d\) cannot be widened on ResNetCNN"),
    (Widen("stages.5.0.conv1", factor=2), ValueError, r"matches no widenable module of ResNetCNN.*\['stages.0.0.conv1', 'stages.1.0.conv1'\]"),
    (Widen("stages.0.0.conv1", size=4), ValueError, r"has width 16; size must be >= 16, got 4"),
]


@pytest.mark.parametrize("spec,exc,msg", R_ERRORS)
def test_resnet_widen_errors(spec, exc, msg):
    base = resnet(0)
    snap = snapshot(base)
    with pytest.raises(exc, match=msg):
        expand(base, spec)
    assert_untouched(base, snap)
