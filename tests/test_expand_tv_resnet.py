"""Growth of torchvision ResNets (manifold_ext/expand/tv_resnet.py): BasicBlock (resnet18) and
small Bottleneck models.

Preservation: max |grown(x) - base(x)| <= 1e-5 on the logits, float32, eval mode, with random
BatchNorm weights, biases and running statistics.
"""

import json
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

tv = pytest.importorskip("torchvision")
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet  # noqa: E402

from manifold_ext.expand import Deepen, ExpansionReport, Widen, expand  # noqa: E402
from manifold_ext.expand import tv_resnet  # noqa: E402
from manifold_ext.expand.registry import family_of  # noqa: E402
from _untouched import assert_untouched, snapshot  # noqa: E402

TOL = 1e-5
STAGES = ("layer1", "layer2", "layer3", "layer4")


def randomise_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return model.eval()


def build(block="basic", layers=(1, 1, 1, 1), seed=0, **kw):
    """A small torchvision ResNet with random weights and random BatchNorms, in eval mode.
    Bottleneck models get width_per_group=16 (inner widths 16..128, outputs 256..2048)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if block == "basic":
            model = ResNet(BasicBlock, list(layers), num_classes=10, **kw)
        else:
            kw.setdefault("width_per_group", 16)
            model = ResNet(Bottleneck, list(layers), num_classes=10, **kw)
    return randomise_bn(model, seed + 1)


def images(n=8, seed=1, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def err(a, b, x):
    with torch.no_grad():
        return (a(x) - b(x)).abs().max().item()


def check_weights(base, new, report, last_only=False):
    """The ``detail["weights"]`` records (a snapshot at each change, paths made final): every
    record names a module of the grown model and gives weight shapes as torch stores them. A
    module's last record's ``after`` is its weight shape now; its first ``before`` is the base
    model's (``[]`` for a module a Deepen created). Returns the number of records checked."""
    mods, old = dict(new.named_modules()), dict(base.named_modules())
    changes = report.changes[-1:] if last_only else report.changes
    first, last, n = {}, {}, 0
    renumbered = any(sp["type"] == "Deepen" for sp in report.specs)
    for c in changes:
        assert c.path in mods
        for rec in c.detail["weights"]:
            mod = mods[rec["path"]]
            assert rec["kind"] == type(mod).__name__ and len(rec["after"]) == mod.weight.dim()
            if c.op == "deepen":
                assert rec["before"] == []
            first.setdefault(rec["path"], rec["before"])
            last[rec["path"]] = rec["after"]
            n += 1
    for path, after in last.items():
        assert after == list(mods[path].weight.shape), path
    if not last_only and not renumbered:
        for path, before in first.items():
            assert before == list(old[path].weight.shape), path
    return n


def test_family_matches_and_default_inputs():
    base = build()
    assert family_of(base) is tv_resnet.FAMILY
    assert family_of(build("bottleneck")) is tv_resnet.FAMILY
    from manifold_ext.models import ResNetCNN

    assert family_of(ResNetCNN(3)) is not tv_resnet.FAMILY
    assert not tv_resnet.FAMILY.matches(nn.Sequential(nn.Linear(2, 2)))
    x = tv_resnet.FAMILY.default_inputs(base)
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(x, tv_resnet.FAMILY.default_inputs(base))  # a fixed seed
    _, report = expand(base, Deepen("layer1", init="zero"), generator=gen())
    assert report.check_inputs_shape == [8, 3, 32, 32] and report.preservation_error == 0.0
    gray = build(seed=3)
    gray.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    assert tv_resnet.FAMILY.default_inputs(gray).shape == (8, 1, 32, 32)


def test_module_import_does_not_import_torchvision():
    code = ("import sys; import manifold_ext.expand.tv_resnet as t; from torch import nn; "
            "t.FAMILY.matches(nn.Linear(1, 1)); print('torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- block-internal widths ------------------------------------------------------------------------

@pytest.mark.parametrize("init", ["net2net", "zero"])
@pytest.mark.parametrize("block,target,how,n_hits", [
    ("basic", "layer1.0.conv1", dict(factor=2), 1),
    ("basic", "layer*.*.conv1", dict(factor=1.5), 5),  # layers (2, 1, 1, 1)
    ("basic", "layer3.0.conv1", dict(size=300), 1),
    ("bottleneck", "layer1.0.conv1", dict(factor=2), 1),
    ("bottleneck", "layer2.0.conv2", dict(factor=1.5), 1),
    ("bottleneck", "*", dict(factor=1.5), 10),
    ("bottleneck", "layer4.*.conv2", dict(size=200), 1),
])
def test_inner_widen_preserving(init, block, target, how, n_hits):
    base = build(block, layers=(2, 1, 1, 1))
    snap = snapshot(base)
    x = images()
    new, report = expand(base, Widen(target, init=init, **how), generator=gen(1), check_inputs=x)
    assert_untouched(base, snap)
    assert len(report.changes) == n_hits
    assert report.preserving and all(c.exact and c.kind == "Conv2d" for c in report.changes)
    assert report.preservation_error <= TOL and err(new, base, x) <= TOL
    mods = dict(new.named_modules())
    for c in report.changes:
        a = mods[c.path]
        cons = mods[c.detail["consumer"]]
        m = c.after[1]
        assert a.out_channels == m and cons.in_channels == m and a.weight.shape[0] == m and cons.weight.shape[1] == m
        assert [r["path"] for r in c.detail["weights"]][0] == c.path
    assert check_weights(base, new, report) == 3 * n_hits
    assert report.params_after > report.params_before
    assert ExpansionReport.from_json(report.to_json()).to_dict() == report.to_dict()


def test_inner_widen_on_resnet18():
    from manifold_ext.real_models import resnet18

    base = resnet18(classes=10, seed=0)
    x = images()
    new, report = expand(base, Widen("layer2.*.conv1", factor=1.5), Widen("layer4.1.conv1", size=600, init="zero"),
                         generator=gen(2), check_inputs=x)
    assert [c.path for c in report.changes] == ["layer2.0.conv1", "layer2.1.conv1", "layer4.1.conv1"]
    assert new.layer2[1].conv1.weight.shape == (192, 128, 3, 3) and new.layer2[1].conv2.weight.shape == (128, 192, 3, 3)
    assert new.layer4[1].bn1.running_var.shape == (600,)
    assert report.preserving and report.preservation_error <= TOL


def test_inner_random_and_noise_not_exact():
    base = build("bottleneck")
    x = images()
    new, report = expand(base, Widen("layer1.0.conv2", factor=2, init="random"), generator=gen(), check_inputs=x)
    (c,) = report.changes
    assert not c.exact and not report.preserving and "not preserving" in c.note
    assert report.preservation_error > 1e-4
    _, report = expand(base, Widen("layer1.0.conv1", factor=2, noise=0.1), generator=gen(), check_inputs=x)
    assert not report.preserving and report.preservation_error > 1e-5


# --- stage depth ----------------------------------------------------------------------------------

@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_deepen_zero_append_and_insert(block):
    base = build(block, layers=(2, 1, 1, 2))
    snap = snapshot(base)
    x = images()
    new, report = expand(base, Deepen("layer1", count=2, init="zero"), Deepen("layer4.0", init="zero"),
                         Deepen("layer2", init="zero", noise=0.1), generator=gen(3), check_inputs=x)
    assert_untouched(base, snap)
    assert [len(new.layer1), len(new.layer2), len(new.layer3), len(new.layer4)] == [4, 2, 1, 3]
    assert [c.path for c in report.changes] == ["layer1.2", "layer1.3", "layer4.1", "layer2.1"]
    kind = "BasicBlock" if block == "basic" else "Bottleneck"
    assert all(c.kind == kind and c.exact and c.before == [] for c in report.changes)
    assert report.preservation_error <= TOL and err(new, base, x) <= TOL
    # layer4.0's old successor was renumbered to layer4.2 and kept its weights.
    assert new.layer4[2].conv1.weight.data_ptr() != base.layer4[1].conv1.weight.data_ptr()
    assert torch.equal(new.layer4[2].conv1.weight, base.layer4[1].conv1.weight)
    w_out = ({"layer1": 64, "layer2": 128, "layer4": 512} if block == "basic"
             else {"layer1": 256, "layer2": 512, "layer4": 2048})
    for c in report.changes:
        blk = dict(new.named_modules())[c.path]
        stage = c.path.split(".")[0]
        last_bn = blk.bn2 if block == "basic" else blk.bn3
        assert blk.downsample is None and c.after == [w_out[stage]] * 2
        assert torch.all(last_bn.weight == 0) and torch.all(last_bn.bias == 0)
        assert all(conv.stride == (1, 1) for conv in blk.modules() if isinstance(conv, nn.Conv2d))
        if block == "bottleneck":  # the inner width of the block it follows
            assert blk.conv2.weight.shape[:2] == getattr(new, stage)[0].conv2.weight.shape[:2]
    assert check_weights(base, new, report) == len(report.changes) * (4 if block == "basic" else 6)


def test_deepen_globs():
    base = build("basic", layers=(2, 2, 1, 1))
    x = images()
    new, report = expand(base, Deepen("layer*", init="zero"), generator=gen(), check_inputs=x)
    assert [c.path for c in report.changes] == ["layer1.2", "layer2.2", "layer3.1", "layer4.1"]
    new, report = expand(base, Deepen("layer*.0", init="zero"), generator=gen(), check_inputs=x)
    assert [c.path for c in report.changes] == ["layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    assert report.preservation_error <= TOL
    # Several insertion points in one stage: paths are the final ones.
    new, report = expand(base, Deepen("layer1.*", init="zero"), generator=gen(), check_inputs=x)
    assert [c.path for c in report.changes] == ["layer1.1", "layer1.3"] and len(new.layer1) == 4
    assert torch.equal(new.layer1[2].conv1.weight, base.layer1[1].conv1.weight)
    assert report.preservation_error <= TOL


def test_deepen_zero_exact_in_train_mode():
    base = build("bottleneck", layers=(1, 2, 1, 1)).train()
    x = images(16)
    new, _ = expand(base, Deepen("layer*", init="zero"), generator=gen())
    assert new.training and base.training
    assert err(new, base, x) <= TOL


def test_deepen_copy_and_random_not_exact():
    base = build("basic", layers=(2, 1, 1, 1))
    x = images()
    new, report = expand(base, Deepen("layer1", init="copy"), generator=gen(), check_inputs=x)
    (c,) = report.changes
    assert not c.exact and not report.preserving and c.path == "layer1.2" and report.preservation_error > 1e-4
    for k, v in base.layer1[1].state_dict().items():
        assert torch.equal(new.layer1[2].state_dict()[k], v)
    new, report = expand(base, Deepen("layer3", init="random", count=2), generator=gen(), check_inputs=x)
    assert not report.preserving and len(new.layer3) == 3 and report.preservation_error > 1e-4
    assert [c.path for c in report.changes] == ["layer3.1", "layer3.2"]
    # copy of a one-block stage needs its block free of downsample: add a block first.
    new, report = expand(base, Deepen("layer3", init="zero"), Deepen("layer3", init="copy"), generator=gen(),
                         check_inputs=x)
    assert [c.exact for c in report.changes] == [True, False] and len(new.layer3) == 3


# --- stage widths through the downsample path -----------------------------------------------------

def stage_shapes(new, block, stage, m):
    st_ = getattr(new, stage)
    for j, blk in enumerate(st_):
        conv, bn = (blk.conv2, blk.bn2) if block == "basic" else (blk.conv3, blk.bn3)
        assert conv.weight.shape[0] == m and bn.num_features == m and bn.running_mean.shape == (m,)
        if j > 0:
            assert blk.conv1.weight.shape[1] == m
    if st_[0].downsample is not None:
        assert st_[0].downsample[0].weight.shape[0] == m and st_[0].downsample[1].weight.shape == (m,)
    else:
        assert new.conv1.weight.shape[0] == m and new.bn1.num_features == m and st_[0].conv1.weight.shape[1] == m
    i = STAGES.index(stage)
    if i + 1 < 4:
        nxt = getattr(new, STAGES[i + 1])[0]
        assert nxt.conv1.weight.shape[1] == m and nxt.downsample[0].weight.shape[1] == m
    else:
        assert new.fc.weight.shape == (10, m)


@pytest.mark.parametrize("init", ["net2net", "zero"])
@pytest.mark.parametrize("block", ["basic", "bottleneck"])
@pytest.mark.parametrize("how", [dict(factor=1.5), dict(factor=2.25)])
def test_stage_widen_preserving(init, block, how):
    base = build(block, layers=(2, 1, 1, 2), seed=4)
    snap = snapshot(base)
    x = images()
    for i, stage in enumerate(STAGES):
        new, report = expand(base, Widen(stage, init=init, **how), generator=gen(i), check_inputs=x)
        assert_untouched(base, snap)
        (c,) = report.changes
        assert c.path == stage and c.kind == "Stage" and c.exact and report.preserving
        assert report.preservation_error <= TOL and err(new, base, x) <= TOL
        stage_shapes(new, block, stage, c.after[0])
        assert c.after[0] == round(c.before[0] * how["factor"])
        n_mod = len(c.detail["producers"]) + len(c.detail["batchnorms"]) + len(c.detail["consumers"])
        assert check_weights(base, new, report) == n_mod
        json.loads(report.to_json())


def test_stage_widen_resnet18_stem_and_composition():
    from manifold_ext.real_models import resnet18

    base = resnet18(classes=10, seed=1)
    x = images()
    new, report = expand(base, Widen("layer1", size=80), generator=gen())
    (c,) = report.changes
    assert "conv1" in c.detail["producers"] and "bn1" in c.detail["batchnorms"]
    assert "layer1.0.conv1" in c.detail["consumers"] and "layer2.0.downsample.0" in c.detail["consumers"]
    assert new.conv1.weight.shape == (80, 3, 7, 7) and report.preservation_error <= TOL
    specs = [Widen("layer2", factor=1.5), Deepen("layer2.0", init="zero"), Widen("layer2.*.conv1", factor=1.5),
             Widen("layer2", factor=1.5, init="zero"), Deepen("layer4", count=2, init="zero")]
    new, report = expand(base, *specs, generator=gen(5), check_inputs=x)
    assert report.preserving and report.preservation_error <= TOL
    assert new.layer2[1].conv1.weight.shape == (288, 288, 3, 3)  # the inserted block: 128 -> 192 -> inner 288, out 288
    assert new.layer3[0].downsample[0].weight.shape == (256, 288, 1, 1)
    mods = dict(new.named_modules())
    for c in report.changes:  # final paths, also inside details
        assert c.path in mods and all(r["path"] in mods for r in c.detail["weights"])
    check_weights(base, new, report, last_only=True)


def test_stage_widen_net2net_exact_in_train_mode():
    base = build("bottleneck", layers=(1, 2, 1, 1), seed=2).train()
    x = images(16)
    new, _ = expand(base, Widen("layer2", factor=1.5), generator=gen())
    assert err(new, base, x) <= 1e-4  # batch statistics: copies have their source's


def test_stage_widen_random_not_exact():
    base = build("bottleneck")
    _, report = expand(base, Widen("layer3", factor=1.5, init="random"), generator=gen(), check_inputs=images())
    assert not report.preserving and not report.changes[0].exact and report.preservation_error > 1e-4


# --- property test over random configurations ------------------------------------------------------

@st.composite
def configs(draw):
    block = draw(st.sampled_from(["basic", "bottleneck"]))
    layers = tuple(draw(st.integers(1, 2)) for _ in range(4))
    specs = []
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["inner", "stage", "deepen"]))
        s = draw(st.sampled_from(STAGES))
        if op == "deepen":
            where = draw(st.sampled_from([s, s + ".0", "layer*"]))
            noise = draw(st.sampled_from([0, 0.05]))
            specs.append(Deepen(where, count=draw(st.integers(1, 2)), init="zero", noise=noise))
            continue
        init = draw(st.sampled_from(["net2net", "zero"]))
        how = draw(st.sampled_from([dict(factor=1.25), dict(factor=2), dict(factor=1.5)]))
        if op == "stage":
            specs.append(Widen(s, init=init, **how))
        else:
            conv = draw(st.sampled_from(["conv1", "conv2"] if block == "bottleneck" else ["conv1"]))
            specs.append(Widen(f"{s}.*.{conv}", init=init, **how))
    return block, layers, specs, draw(st.integers(0, 10_000))


@settings(max_examples=12, deadline=None)
@given(configs())
def test_property_preserving(cfg):
    block, layers, specs, seed = cfg
    base = build(block, layers=layers, seed=seed)
    snap = snapshot(base)
    x = images(4, seed=seed)
    new, report = expand(base, *specs, generator=gen(seed), check_inputs=x)
    assert_untouched(base, snap)
    assert report.preserving and all(c.exact for c in report.changes)
    assert report.preservation_error <= TOL, (specs, report.preservation_error)
    mods = dict(new.named_modules())
    for c in report.changes:
        assert c.path in mods and all(r["path"] in mods for r in c.detail["weights"])
    check_weights(base, new, report, last_only=True)


# --- errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("block,spec,exc,msg", [
    ("basic", Widen("nope", factor=2), ValueError, "matches no widenable module of ResNet"),
    ("basic", Widen("fc", factor=2), TypeError, "module 'fc' (Linear) cannot be widened"),
    ("basic", Widen("layer1.0.conv2", factor=2), TypeError, "module 'layer1.0.conv2' (Conv2d) cannot be widened"),
    ("basic", Widen("layer1.0.conv1", size=10), ValueError, "has width 64; size must be >= 64, got 10"),
    ("basic", Widen("layer2", size=100), ValueError, "has width 128; size must be >= 128, got 100"),
    ("bottleneck", Widen("layer1.0.conv3", factor=2), TypeError, "'layer1.0.conv3' (Conv2d) cannot be widened"),
    ("basic", Deepen("layer1", init="identity"), ValueError, "init='identity' inserts a plain layer"),
    ("basic", Deepen("fc", init="zero"), TypeError, "module 'fc' (Linear) is not a stage 'layer<s>' or a block"),
    ("basic", Deepen("layer9", init="zero"), ValueError, "Deepen.after='layer9' matches no stage or block"),
    ("bottleneck", Deepen("layer2", init="copy"), ValueError,
     "init='copy' copies module 'layer2.0' (Bottleneck), which has a downsample"),
])
def test_errors(block, spec, exc, msg):
    base = build(block)
    with pytest.raises(exc) as e:
        expand(base, spec)
    assert msg in str(e.value)


def test_other_norm_layers_refused():
    base = build("basic", norm_layer=lambda c: nn.GroupNorm(1, c))
    for spec, where in [(Widen("layer1.0.conv1", factor=2), "layer1.0.bn1"), (Widen("layer2", factor=2), "layer2.0"),
                        (Deepen("layer1", init="zero"), "layer1.0.bn1")]:
        with pytest.raises(TypeError, match="need nn.BatchNorm2d normalisation layers") as e:
            expand(base, spec)
        assert repr(where)[:-1] in str(e.value)


def test_block_path_is_not_widenable():
    with pytest.raises(TypeError, match=r"module 'layer1.0' \(BasicBlock\) cannot be widened"):
        expand(build(), Widen("layer1.0", factor=2))


def test_grouped_inner_refused_stage_ok():
    base = build("bottleneck", groups=2, width_per_group=8)  # ResNeXt-like: conv2 has groups=2
    with pytest.raises(TypeError, match=r"groups=2\) is not supported"):
        expand(base, Widen("layer1.0.conv1", factor=2))
    new, report = expand(base, Widen("layer1", factor=1.5), Deepen("layer1", init="zero"), generator=gen(),
                         check_inputs=images())
    assert report.preservation_error <= TOL
    assert new.layer1[1].conv2.groups == 2 and new.layer1[1].conv2.weight.shape == (16, 8, 3, 3)


def test_dilated_bottleneck_new_block_keeps_dilation():
    # torchvision gives layer4.0 the previous dilation (1) and later blocks 2; a new block takes
    # the dilation of the block it follows.
    base = build("bottleneck", layers=(1, 1, 1, 2), replace_stride_with_dilation=[False, False, True])
    new, report = expand(base, Deepen("layer4", init="zero"), Widen("layer4.*.conv2", factor=1.5), generator=gen(),
                         check_inputs=images())
    assert new.layer4[2].conv2.dilation == (2, 2) and new.layer4[2].conv2.padding == (2, 2)
    assert report.preserving and report.preservation_error <= TOL


# --- torch.compile and the engine -----------------------------------------------------------------

def _grown():
    base = build("basic", seed=7)
    new, _ = expand(base, Widen("layer2", factor=1.5), Deepen("layer1.0", init="zero"), Widen("*", factor=1.5),
                    generator=gen())
    return new.eval()


def test_compile_aot_eager():
    # aot_eager runs the whole Dynamo and AOTAutograd tracing that a grown model must survive,
    # without inductor's code generation, which is slow on small machines: the slow test below.
    torch._dynamo.reset()
    new, x = _grown(), images(4)
    with torch.no_grad():
        out = torch.compile(new, backend="aot_eager")(x)
        assert (out - new(x)).abs().max().item() <= 1e-6


@pytest.mark.slow
def test_compile_inductor():
    torch._dynamo.reset()
    new, x = _grown(), images(4)
    with torch.no_grad():
        out = torch.compile(new)(x)
        assert (out - new(x)).abs().max().item() <= 1e-5


def test_engine_evaluate_matches_own_cross_entropy():
    from manifold_ext.engine import evaluate

    new = _grown()
    x, y = images(8, seed=3), torch.randint(0, 10, (8,), generator=gen(4))
    res = evaluate(new, [new], torch.ones(1, 1), (x, y), bn="interpolate", engine="loop", quiet=True)
    with torch.no_grad():
        ce = F.cross_entropy(new(x), y).item()
    assert res.engine == "loop" and abs(res.loss[0].item() - ce) <= 1e-5
