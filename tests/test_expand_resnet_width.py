"""Widen a ResNetCNN stage's residual width (``Widen("stages.<i>", ...)``).

Preservation: max |expanded(x) - base(x)| <= 1e-5, float32, eval, random BatchNorm statistics.
"""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from manifold_ext.expand import Deepen, Widen, expand
from test_expand_transformer import assert_untouched, gen, images, resnet, snapshot

TOL = 1e-5
ARCHS = [dict(widths=(8, 16), blocks=(2, 2)), dict(widths=(4, 8, 8), blocks=(1, 2, 1)), dict(widths=(6,), blocks=(3,))]


def check_shapes(new, i, m):
    stage = new.stages[i]
    for j, blk in enumerate(stage):
        assert blk.conv2.out_channels == m and blk.bn2.num_features == m and blk.bn2.running_var.shape == (m,)
        if j > 0:
            assert blk.conv1.in_channels == m
    if i + 1 < len(new.stages):
        nxt = new.stages[i + 1][0]
        assert nxt.conv1.in_channels == m and nxt.shortcut[0].in_channels == m
    else:
        assert new.head.in_features == m


@pytest.mark.parametrize("init", ["net2net", "zero"])
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("how", [dict(factor=2), dict(factor=1.5), dict(size=9)])
def test_stage_width_preserves(init, arch, how):
    base = resnet(3, **arch)
    snap = snapshot(base)
    for i in range(len(arch["widths"])):
        if "size" in how and how["size"] < arch["widths"][i]:
            continue
        new, report = expand(base, Widen(f"stages.{i}", init=init, **how), generator=gen(i), check_inputs=images())
        assert_untouched(base, snap)
        (c,) = report.changes
        assert c.path == f"stages.{i}" and c.kind == "Stage" and c.exact and report.preserving
        assert report.preservation_error <= TOL
        check_shapes(new, i, c.after[0])
        assert report.params_after > report.params_before
        json.loads(report.to_json())


def test_stage0_identity_shortcut_widens_stem():
    base = resnet(1, widths=(8, 16), blocks=(2, 1))
    new, report = expand(base, Widen("stages.0", size=12), generator=gen())
    assert new.stem[0].out_channels == 12 and new.stem[1].num_features == 12
    assert new.stages[0][0].conv1.in_channels == 12
    assert "stem.0" in report.changes[0].detail["producers"]
    assert report.preservation_error <= TOL


def test_stage_with_shortcut_conv():
    base = resnet(1, widths=(4, 8), blocks=(1, 1))
    new, report = expand(base, Widen("stages.1", factor=2), generator=gen())
    sc = new.stages[1][0].shortcut
    assert sc[0].out_channels == 16 and sc[1].num_features == 16 and sc[0].in_channels == 4
    assert new.stem[0].out_channels == 4
    assert report.preservation_error <= TOL


def test_net2net_copies_bn_and_divides():
    base = resnet(2, widths=(4,), blocks=(2,))
    new, report = expand(base, Widen("stages.0", size=7, init="net2net"), generator=gen(5))
    src = torch.tensor(list(range(4)) + report.changes[0].detail["sources"])
    counts = torch.bincount(src, minlength=4)
    assert counts.max() - counts.min() <= 1
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(new.stages[0][1].bn2, name), getattr(base.stages[0][1].bn2, name)[src])
    torch.testing.assert_close(new.head.weight, base.head.weight[:, src] / counts[src])
    torch.testing.assert_close(new.stages[0][1].conv1.weight, base.stages[0][1].conv1.weight[:, src] / counts[src].view(1, -1, 1, 1))


def test_zero_new_channels_stay_zero():
    base = resnet(4, widths=(8, 8), blocks=(2, 2))
    new, _ = expand(base, Widen("stages.0", factor=2, init="zero"), generator=gen())
    outs = []
    new.stages[0].register_forward_hook(lambda mod, inp, out: outs.append(out))
    new.stages[0][0].register_forward_hook(lambda mod, inp, out: outs.append(out))
    new(images(8))
    for o in outs:
        assert o.shape[1] == 16 and torch.equal(o[:, 8:], torch.zeros_like(o[:, 8:]))


def test_zero_with_noise_still_exact_and_net2net_noise_differs():
    base = resnet(5)
    _, r = expand(base, Widen("stages.0", factor=2, init="zero", noise=0.1), generator=gen())
    assert r.preserving and r.preservation_error <= TOL
    _, r = expand(base, Widen("stages.0", factor=2, init="net2net", noise=0.1), generator=gen())
    assert not r.preserving and r.preservation_error > 1e-4


@pytest.mark.parametrize("i", [0, 1])
def test_random_differs(i):
    base = resnet(6)
    snap = snapshot(base)
    _, r = expand(base, Widen(f"stages.{i}", factor=2, init="random"), generator=gen())
    assert_untouched(base, snap)
    assert not r.preserving and r.preservation_error > 1e-4


def test_train_mode_exact_and_backward():
    base = resnet(7).train()
    snap = snapshot(base)
    new, report = expand(base, Widen("stages.0", factor=2, init="net2net"), generator=gen())
    assert_untouched(base, snap)
    assert new.training
    x = images(16)
    torch.testing.assert_close(new(x), base(x), atol=TOL, rtol=0)  # batch statistics of copies equal too
    new(x).sum().backward()


def test_composes_with_deepen_and_inner_widen():
    base = resnet(8, widths=(8, 16), blocks=(1, 1))
    new, report = expand(base, Widen("stages.0", factor=2), Deepen("stages.0", init="zero"),
                         Widen("stages.0.1.conv1", factor=2), Widen("stages.1", size=20, init="zero"), generator=gen())
    assert report.preserving and report.preservation_error <= TOL
    assert new.stages[0][1].conv1.in_channels == 16 and new.head.in_features == 20


@settings(max_examples=25, deadline=None)
@given(widths=st.lists(st.integers(1, 6), min_size=1, max_size=3), blocks=st.integers(1, 2),
       extra=st.integers(0, 7), init=st.sampled_from(["net2net", "zero", "random"]), seed=st.integers(0, 10**6),
       data=st.data())
def test_stage_width_property(widths, blocks, extra, init, seed, data):
    base = resnet(seed % 1000, widths=tuple(widths), blocks=(blocks,) * len(widths))
    i = data.draw(st.integers(0, len(widths) - 1))
    snap = snapshot(base)
    new, report = expand(base, Widen(f"stages.{i}", size=widths[i] + extra, init=init), generator=gen(seed))
    assert_untouched(base, snap)
    check_shapes(new, i, widths[i] + extra)
    assert new(images(4)).shape == (4, 10)
    if init != "random":
        assert report.preserving and report.preservation_error <= TOL
    else:
        assert not report.preserving


@pytest.mark.parametrize("spec,exc,msg", [
    (Widen("stages.3", factor=2), ValueError, r"'stages.3' matches no widenable module of ResNetCNN"),
    (Widen("stages.0", size=4), ValueError, r"has width 8; size must be >= 8, got 4"),
    (Widen("stages.0.0", factor=2), TypeError, r"module 'stages.0.0' \(BasicBlock\) cannot be widened on ResNetCNN.*'stages.<i>'"),
])
def test_stage_width_errors(spec, exc, msg):
    base = resnet(0, widths=(8, 16))
    snap = snapshot(base)
    with pytest.raises(exc, match=msg):
        expand(base, spec)
    assert_untouched(base, snap)
