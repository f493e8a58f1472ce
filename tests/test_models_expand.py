"""manifold_ext.models (mlp, ResNetCNN, TinyTransformer): shapes, the engine on them, and Deepen on ResNetCNN."""

import json

import pytest
import torch
from torch import nn

from manifold_ext.engine import evaluate
from manifold_ext.expand import Deepen, ExpansionReport, Widen, expand, preservation_error
from manifold_ext.models import BasicBlock, ResNetCNN, TinyTransformer, mlp
from _untouched import assert_untouched, snapshot

TOL = 1e-5


def randomise_bn(model, seed=0):
    """Random running statistics and affine parameters, so that eval-mode BatchNorm is not trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model


def resnet(seed=0, **kw):
    torch.manual_seed(seed)
    return randomise_bn(ResNetCNN(**kw), seed).eval()


def images(n=32, c=1, seed=1):
    return torch.randn(n, c, 8, 8, generator=torch.Generator().manual_seed(seed))


def n_params(m):
    return sum(p.numel() for p in m.parameters())


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("norm", [None, "batch", "layer"])
@pytest.mark.parametrize("act", ["relu", "gelu", nn.Tanh])
def test_mlp_shapes(norm, act):
    m = mlp((64, 32, 16, 10), act=act, norm=norm)
    assert isinstance(m, nn.Sequential)
    assert sum(isinstance(x, nn.Linear) for x in m) == 3
    assert m.eval()(torch.randn(5, 64)).shape == (5, 10)
    assert mlp()(torch.randn(3, 64)).shape == (3, 10)


def test_mlp_errors():
    with pytest.raises(ValueError, match=r"act must be one of .* got 'swish'"):
        mlp(act="swish")
    with pytest.raises(ValueError, match=r"norm must be None or one of .* got 'group'"):
        mlp(norm="group")
    with pytest.raises(ValueError, match=r"at least two positive integers"):
        mlp((10,))


@pytest.mark.parametrize("widths,blocks,c", [((16, 32), (1, 1), 1), ((8, 8, 12), (2, 1, 2), 3)])
def test_resnet_shapes(widths, blocks, c):
    torch.manual_seed(0)
    m = ResNetCNN(in_channels=c, widths=widths, blocks=blocks, classes=7)
    assert [len(s) for s in m.stages] == list(blocks)
    assert all(isinstance(b, BasicBlock) for s in m.stages for b in s)
    # identity shortcut exactly where the shape is kept
    assert isinstance(m.stages[0][0].shortcut, nn.Identity)  # the stem already outputs widths[0] channels
    assert isinstance(m.stages[1][0].shortcut, nn.Sequential)  # stride 2
    assert m(images(4, c)).shape == (4, 7)
    assert m.eval()(images(4, c)).shape == (4, 7)
    with pytest.raises(ValueError, match="equally long"):
        ResNetCNN(widths=(8, 8), blocks=(1,))


@pytest.mark.parametrize("depth", [1, 2])
def test_transformer_shapes(depth):
    torch.manual_seed(0)
    m = TinyTransformer(vocab=13, length=6, width=16, heads=4, classes=5, depth=depth)
    assert len(m.blocks) == depth
    tok = torch.randint(0, 13, (3, 6))
    assert m(tok).shape == (3, 5)
    assert m(tok[:, :4]).shape == (3, 5)
    with pytest.raises(ValueError, match="width=16 must be divisible by heads=3"):
        TinyTransformer(13, 6, 16, 3, 5)
    with pytest.raises(ValueError, match="exceeds length=6"):
        m(torch.randint(0, 13, (2, 7)))


# ---------------------------------------------------------------- the engine on the zoo


def _engine_equal(make, x, y):
    m1, m2 = make(1), make(2)
    coeffs = torch.rand(3, 2, generator=torch.Generator().manual_seed(0))
    fused = evaluate(m1, [m1, m2], coeffs, (x, y), engine="fused", quiet=True)
    loop = evaluate(m1, [m1, m2], coeffs, (x, y), engine="loop", quiet=True)
    torch.testing.assert_close(fused.loss, loop.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.accuracy, loop.accuracy, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(fused.loss).all()


def test_engine_resnet():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(24, 1, 8, 8, generator=g), torch.randint(0, 10, (24,), generator=g)
    _engine_equal(lambda s: resnet(s, widths=(8, 12), blocks=(1, 1)), x, y)


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_engine_transformer():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randint(0, 13, (24, 6), generator=g), torch.randint(0, 5, (24,), generator=g)

    def make(s):
        torch.manual_seed(s)
        return TinyTransformer(13, 6, 16, 2, 5, depth=2).eval()

    _engine_equal(make, x, y)


def test_engine_mlp():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(24, 64, generator=g), torch.randint(0, 10, (24,), generator=g)

    def make(s):
        torch.manual_seed(s)
        return mlp(norm="layer").eval()

    _engine_equal(make, x, y)


# ---------------------------------------------------------------- Deepen on ResNetCNN

CASES = [
    (dict(), "stages.0", 1),
    (dict(), "stages.1", 2),
    (dict(), "stages.*", 1),
    (dict(in_channels=3, widths=(8, 8, 12), blocks=(2, 1, 1)), "stages.2", 3),
]


@pytest.mark.parametrize("kw,after,count", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_deepen_zero_preserves(kw, after, count, seed):
    base = resnet(seed, **kw)
    snap = snapshot(base)
    c = kw.get("in_channels", 1)
    x = images(32, c, seed=seed + 10)
    new, report = expand(base, Deepen(after, count=count, init="zero"), check_inputs=x)
    assert_untouched(base, snap)
    stages = [s for s in base.stages._modules] if after == "stages.*" else [after.split(".")[1]]
    for i, s in enumerate(new.stages):
        grown = count if str(i) in stages else 0
        assert len(s) == len(base.stages[i]) + grown
    assert report.preserving and all(ch.exact and ch.kind == "BasicBlock" for ch in report.changes)
    assert len(report.changes) == count * len(stages)
    err = preservation_error(base, new, x)
    assert err <= TOL and report.preservation_error <= TOL
    # the default check inputs (8x8) are used when none are given
    assert expand(base, Deepen(after, count=count, init="zero"))[1].preservation_error <= TOL
    # parameter counts: each new block is two 3x3 w->w convolutions and two BatchNorms
    added = 0
    for ch in report.changes:
        w = ch.after[0]
        assert ch.detail["params"] == 2 * 9 * w * w + 4 * w
        added += ch.detail["params"]
        assert isinstance(new.get_submodule(ch.path), BasicBlock)
    assert report.params_before == n_params(base)
    assert report.params_after == n_params(new) == n_params(base) + added
    assert ExpansionReport.from_json(report.to_json()) == report
    json.loads(report.to_json())
    assert new(x).shape == base(x).shape


def test_deepen_zero_preserves_in_train_mode_too():
    base = resnet(0)
    new, _ = expand(base, Deepen("stages.0", init="zero"))
    base.train(), new.train()
    x = images(16)
    assert (new(x) - base(x)).abs().max().item() <= TOL


@pytest.mark.parametrize("init", ["random", "copy"])
def test_deepen_random_copy_differ(init):
    base = resnet(0, blocks=(2, 1))
    snap = snapshot(base)
    x = images()
    new, report = expand(base, Deepen("stages.0", count=2, init=init), generator=torch.Generator().manual_seed(0))
    assert_untouched(base, snap)
    assert not report.preserving and not any(c.exact for c in report.changes)
    assert report.preservation_error > 1e-3
    assert preservation_error(base, new, x) > 1e-3
    assert [c.path for c in report.changes] == ["stages.0.2", "stages.0.3"]
    assert report.params_after == n_params(new) > report.params_before
    if init == "copy":
        last = base.stages[0][1]
        for t in (2, 3):
            blk = new.stages[0][t]
            assert torch.equal(blk.conv1.weight, last.conv1.weight)
            assert torch.equal(blk.bn2.running_var, last.bn2.running_var)
            assert blk.conv1.weight is not last.conv1.weight


def test_deepen_random_reproducible_with_generator():
    base = resnet(0)
    a, _ = expand(base, Deepen("stages.1", init="random"), generator=torch.Generator().manual_seed(5))
    b, _ = expand(base, Deepen("stages.1", init="random"), generator=torch.Generator().manual_seed(5))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_deepen_zero_with_noise_still_exact():
    base = resnet(0)
    new, report = expand(base, Deepen("stages.0", init="zero", noise=0.1))
    assert report.preserving and report.preservation_error <= TOL


def test_deepen_then_copy_of_stage_with_downsampling_block_fails_then_works():
    base = resnet(0)  # stages.1 holds one 16 -> 32 block
    with pytest.raises(ValueError, match=r"init='copy' copies module 'stages.1.0' \(BasicBlock\).*16 -> 32"):
        expand(base, Deepen("stages.1", init="copy"))
    new, report = expand(base, Deepen("stages.1", init="zero"), Deepen("stages.1", init="copy"))
    assert [c.path for c in report.changes] == ["stages.1.1", "stages.1.2"]
    assert not report.preserving


ERRORS = [
    (Deepen("stages.0"), ValueError, r"init='identity' inserts a plain layer.*use init='zero'"),
    (Deepen("stages.9", init="zero"), ValueError, r"'stages.9' matches no stage of ResNetCNN; its stages are \['stages.0', 'stages.1'\]"),
    (Deepen("stem", init="zero"), TypeError, r"module 'stem' \(Sequential\) is not a stage of ResNetCNN"),
    (Deepen("stages.0.0", init="zero"), TypeError, r"module 'stages.0.0' \(BasicBlock\) is not a stage"),
    (Deepen("head", init="zero"), TypeError, r"module 'head' \(Linear\) is not a stage"),
    (Widen("stages.0.0", factor=2), TypeError, r"module 'stages.0.0' \(BasicBlock\) cannot be widened on ResNetCNN"),
]


@pytest.mark.parametrize("spec,exc,msg", ERRORS)
def test_resnet_errors(spec, exc, msg):
    base = resnet(0)
    snap = snapshot(base)
    with pytest.raises(exc, match=msg):
        expand(base, spec)
    assert_untouched(base, snap)


def test_transformer_deepen_is_a_clear_error():
    torch.manual_seed(0)  # Deepen on TinyTransformer names a block (tests/test_expand_transformer_depth.py)
    with pytest.raises(TypeError, match=r"module 'blocks' \(ModuleList\) is not a TransformerBlock of TinyTransformer"):
        expand(TinyTransformer(13, 6, 16, 2, 5), Deepen("blocks", init="zero"))


def test_mlp_from_zoo_expands():
    torch.manual_seed(0)
    base = mlp((64, 32, 10), norm="batch")
    new, report = expand(base, Widen("0", factor=2), Deepen("2"))
    assert report.preserving and report.preservation_error <= TOL
    assert new.eval()(torch.randn(4, 64)).shape == (4, 10)
