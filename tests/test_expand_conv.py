"""Widen on convolutional nn.Sequential models: channels of Conv2d layers, read by a Conv2d or by a
Flatten + Linear head; BatchNorm2d statistics carried along; shapes, preservation, errors."""

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from manifold_ext.expand import ExpansionReport, Widen, expand, preservation_error
from _untouched import assert_untouched, snapshot

TOL = 1e-5
FAST = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def random_bn(bn):
    # Random (not default) statistics and affine parameters, so that copying them is tested.
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_(1.0, 0.5)
        bn.bias.normal_(0.0, 0.5)
    return bn


def build_cnn(in_ch, chans, act=nn.ReLU, bn=True, pools=(), dropout=False, head="linear", hidden=None,
              out=3, kernel=3, size=8, seed=0):
    """Conv blocks (Conv2d, [BN], act, [pool], [Dropout]) then a head: "linear" (Flatten, [Linear,
    act], Linear) or "conv" (a 1x1 Conv2d output layer). ``pools``: per block None/"max"/"avg"."""
    torch.manual_seed(seed)
    layers, c, s = [], in_ch, size
    for t, ch in enumerate(chans):
        layers.append(nn.Conv2d(c, ch, kernel, padding=kernel // 2))
        if bn:
            layers.append(random_bn(nn.BatchNorm2d(ch)))
        layers.append(act())
        pool = pools[t] if t < len(pools) else None
        if pool and s >= 2:
            layers.append(nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2))
            s //= 2
        if dropout:
            layers.append(nn.Dropout2d(0.2) if t % 2 else nn.Dropout(0.2))
        c = ch
    if head == "conv":
        layers.append(nn.Conv2d(c, out, 1))
    else:
        layers.append(nn.Flatten())
        f = c * s * s
        if hidden:
            layers += [nn.Linear(f, hidden), act()]
            f = hidden
        layers.append(nn.Linear(f, out))
    model = nn.Sequential(*layers)
    model.input_shape = (in_ch, size, size)  # for the tests' inputs only
    return model


@st.composite
def cnns(draw, acts=(nn.ReLU, nn.GELU, nn.Tanh)):
    depth = draw(st.integers(1, 3))
    return build_cnn(
        in_ch=draw(st.integers(1, 3)),
        chans=draw(st.lists(st.integers(1, 6), min_size=depth, max_size=depth)),
        act=draw(st.sampled_from(acts)),
        bn=draw(st.booleans()),
        pools=draw(st.lists(st.sampled_from([None, "max", "avg"]), min_size=depth, max_size=depth)),
        dropout=draw(st.booleans()),
        head=draw(st.sampled_from(["linear", "conv"])),
        hidden=draw(st.sampled_from([None, 5])),
        kernel=draw(st.sampled_from([1, 3])),
        size=draw(st.sampled_from([4, 6, 8])),
        seed=draw(st.integers(0, 2**16)),
    )


def inputs(model, n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *model.input_shape, generator=g)


def conv_targets(model):
    """Conv2d children that have a consumer after them (the widenable ones)."""
    kids = list(model.named_children())
    return [n for k, (n, m) in enumerate(kids)
            if isinstance(m, nn.Conv2d) and any(isinstance(x, (nn.Conv2d, nn.Linear)) for _, x in kids[k + 1:])]


def check_shapes(new, path, m):
    """The target has m output channels and every module up to its consumer agrees."""
    kids = list(new.named_children())
    k = [n for n, _ in kids].index(path)
    assert new._modules[path].out_channels == m and new._modules[path].weight.shape[0] == m
    for _, mod in kids[k + 1:]:
        if isinstance(mod, nn.BatchNorm2d):
            assert mod.num_features == m
            assert all(t.shape == (m,) for t in (mod.weight, mod.bias, mod.running_mean, mod.running_var))
        if isinstance(mod, nn.Conv2d):
            assert mod.in_channels == m and mod.weight.shape[1] == m
            return
        if isinstance(mod, nn.Linear):
            assert mod.in_features % m == 0 and mod.weight.shape[1] == mod.in_features
            return


# ---------------------------------------------------------------- preservation and shapes


@FAST
@given(model=cnns(), data=st.data(), init=st.sampled_from(["net2net", "zero", "random"]))
def test_widen_conv_shapes_preservation_and_base_untouched(model, data, init):
    path = data.draw(st.sampled_from(conv_targets(model)))
    n = model._modules[path].out_channels
    by_size = data.draw(st.booleans())
    spec = (Widen(path, size=data.draw(st.integers(n, 3 * n + 2)), init=init) if by_size
            else Widen(path, factor=data.draw(st.floats(1.0, 3.5)), init=init))
    m = spec.size if by_size else int(round(n * spec.factor))
    x = inputs(model)
    snap = snapshot(model)
    new, report = expand(model, spec, generator=torch.Generator().manual_seed(0), check_inputs=x)
    assert_untouched(model, snap)
    check_shapes(new, path, m)
    assert new.eval()(x).shape == model.eval()(x).shape
    (change,) = report.changes
    cin = model._modules[path].in_channels
    assert change.kind == "Conv2d" and change.before == [cin, n] and change.after == [cin, m]
    assert report.params_before == sum(p.numel() for p in model.parameters())
    assert report.params_after == sum(p.numel() for p in new.parameters())
    assert ExpansionReport.from_json(report.to_json()) == report
    assert change.exact == (init != "random")
    if change.exact:
        assert report.preservation_error <= TOL
        assert preservation_error(model, new, 4 * inputs(model, seed=2)) <= 10 * TOL  # large inputs too


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("init", ["net2net", "zero"])
@pytest.mark.parametrize("head", ["linear", "conv"])
def test_widen_all_conv_layers_preserves(seed, init, head):
    # Every Conv2d and the hidden Linear at once, with non-integer factors (net2net remainders).
    model = build_cnn(3, [4, 5, 3], act=nn.GELU, pools=("max", "avg", None), dropout=True, head=head,
                      hidden=6, seed=seed)
    x = inputs(model)
    new, report = expand(model, Widen("*", factor=1.6, init=init), generator=torch.Generator().manual_seed(seed),
                         check_inputs=x)
    kinds = [c.kind for c in report.changes]
    assert kinds == (["Conv2d"] * 3 + (["Linear"] if head == "linear" else []))
    assert report.preserving and report.preservation_error <= TOL, report.summary()


@pytest.mark.parametrize("init", ["net2net", "zero", "random"])
def test_flatten_linear_columns_split_by_channel_blocks(init):
    # Conv(2 -> 3), 4x4 maps, Flatten, Linear(48 -> 2): channel c is columns 16c .. 16c+15.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(48, 2))
    new, report = expand(model, Widen("0", size=5, init=init), generator=torch.Generator().manual_seed(1))
    lin, old = new[3].weight.view(2, 5, 16), model[3].weight.view(2, 3, 16)
    assert new[3].in_features == 80 and report.changes[0].detail["features_per_channel"] == 16
    conv_w = new[0].weight
    if init == "net2net":
        srcs = [next(i for i in range(3) if torch.equal(conv_w[j], model[0].weight[i])) for j in range(5)]
        counts = torch.bincount(torch.tensor(srcs), minlength=3)
        for j, s in enumerate(srcs):
            assert torch.equal(new[0].bias[j], model[0].bias[s])
            assert torch.allclose(lin[:, j], old[:, s] / counts[s])
        # Each source's column blocks sum back to the original block.
        for s in range(3):
            assert torch.allclose(sum(lin[:, j] for j in range(5) if srcs[j] == s), old[:, s])
    else:
        assert torch.equal(conv_w[:3], model[0].weight) and torch.equal(lin[:, :3], old)
        assert conv_w[3:].abs().min() > 0  # fresh kernels
        assert (lin[:, 3:].abs().max() == 0) == (init == "zero")
    x = torch.randn(4, 2, 4, 4)
    err = preservation_error(model, new, x)
    assert (err <= TOL) == (init != "random")


def test_batchnorm2d_statistics_copied_with_channels():
    model = build_cnn(2, [4, 3], pools=("max",), seed=3)  # 0 Conv, 1 BN, 2 ReLU, 3 MaxPool, 4 Conv ...
    new, report = expand(model, Widen("0", size=9), generator=torch.Generator().manual_seed(2),
                         check_inputs=inputs(model))
    bn, old = new[1], model[1]
    for j in range(9):
        (s,) = [i for i in range(4) if torch.equal(new[0].weight[j], model[0].weight[i])]
        for name in ("weight", "bias", "running_mean", "running_var"):
            assert getattr(bn, name)[j] == getattr(old, name)[s], name
    assert report.preserving and report.preservation_error <= TOL
    zero, _ = expand(model, Widen("0", size=9, init="zero"))
    assert torch.equal(zero[1].running_mean[4:], torch.zeros(5)) and torch.equal(zero[1].running_var[4:], torch.ones(5))
    assert torch.equal(zero[4].weight[:, 4:], torch.zeros(3, 5, 3, 3))


# ---------------------------------------------------------------- not preserving


@FAST
@given(model=cnns(acts=(nn.Tanh, nn.GELU)), data=st.data(), init=st.sampled_from(["net2net", "zero", "random"]))
def test_widen_conv_not_preserving_inits_differ(model, data, init):
    path = data.draw(st.sampled_from(conv_targets(model)))
    n = model._modules[path].out_channels
    noise = 0.0 if init == "random" else 0.1
    new, report = expand(model, Widen(path, size=n + data.draw(st.integers(1, 4)), init=init, noise=noise),
                         check_inputs=inputs(model))
    assert not report.preserving and not report.changes[0].exact
    # Differs, though not always by much: max pooling or saturated activations can hide most of
    # a perturbation (hypothesis found a 7e-6 change).
    assert report.preservation_error > 1e-7


def test_generator_makes_conv_expansion_deterministic():
    model = build_cnn(3, [4, 5], pools=("max", "avg"), hidden=6)
    specs = (Widen("*", factor=1.5), Widen("0", size=12, init="random", noise=0.01))
    a, ra = expand(model, *specs, generator=torch.Generator().manual_seed(7))
    b, rb = expand(model, *specs, generator=torch.Generator().manual_seed(7))
    c, _ = expand(model, *specs, generator=torch.Generator().manual_seed(8))
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict()) and ra == rb
    assert any(not torch.equal(a.state_dict()[k], c.state_dict()[k]) for k in a.state_dict())


# ---------------------------------------------------------------- report, training


def test_conv_report_parameter_counts_and_json():
    # Conv(3->4,3x3)+BN(4), ReLU, Flatten, Linear(4*8*8 -> 2): 112 + 8 + 514 = 634 parameters.
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(256, 2))
    x = torch.randn(5, 3, 8, 8)
    new, report = expand(model, Widen("0", factor=2), check_inputs=x)
    # Conv(3->8) 224 + BN(8) 16 + Linear(512 -> 2) 1026.
    assert (report.params_before, report.params_after) == (634, 1266)
    assert report.check_inputs_shape == [5, 3, 8, 8]
    assert "params 634 -> 1266" in report.summary()
    c = report.changes[0]
    assert c.detail == {"copied": 4, "mean_units": 0, "fresh": 0, "consumer": "Linear", "features_per_channel": 64}
    assert ExpansionReport.from_json(report.to_json(indent=2)) == report
    # Without check_inputs a conv model has no default inputs (its spatial size is unknown).
    assert expand(model, Widen("0", factor=2))[1].preservation_error is None


def test_expanded_cnn_trains_and_keeps_modes():
    model = build_cnn(3, [4, 5], pools=("max", None), dropout=True, hidden=6).train()
    model[0].weight.requires_grad_(False)
    new, _ = expand(model, Widen("*", factor=2))
    assert model.training and new.training and not new[0].weight.requires_grad
    loss = new(inputs(model, n=4)).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in new.parameters() if p.requires_grad)


# ---------------------------------------------------------------- errors


def conv_net(*mid, out=None):
    return nn.Sequential(nn.Conv2d(3, 4, 3), *mid, out if out is not None else nn.Conv2d(4, 2, 1))


@pytest.mark.parametrize("model,spec,exc,msg", [
    (nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.ReLU(), nn.Conv2d(4, 2, 1)), Widen("0", factor=2), TypeError,
     r"module '0' \(Conv2d, groups=2\) is not supported as a widening target: only groups=1"),
    (conv_net(nn.ReLU(), out=nn.Conv2d(4, 4, 3, groups=4)), Widen("0", factor=2), TypeError,
     r"module '2' \(Conv2d, groups=4\) is not supported as the consumer of widened channels"),
    (nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.ReLU(), nn.Conv2d(4, 2, 1)), Widen("*", factor=2), TypeError,
     r"module '0' \(Conv2d, groups=2\)"),
    (conv_net(nn.GroupNorm(2, 4)), Widen("0", factor=2), TypeError,
     r"module '1' \(GroupNorm\) is not supported between '0' and '2' when widening; supported: .*nn.Conv2d"),
    (conv_net(nn.BatchNorm2d(5)), Widen("0", factor=2), ValueError,
     r"module '1' \(BatchNorm2d\) has num_features=5, expected 4"),
    (conv_net(nn.BatchNorm1d(4)), Widen("0", factor=2), TypeError, r"module '1' \(BatchNorm1d\) is not supported"),
    (conv_net(nn.ReLU(), out=nn.Linear(4, 2)), Widen("0", factor=2), TypeError,
     r"module '2' \(Linear\) reads Conv2d channels without an nn.Flatten"),
    (conv_net(nn.Flatten(), nn.Flatten(), out=nn.Linear(36, 2)), Widen("0", factor=2), TypeError,
     r"module '2' \(Flatten, start_dim=1, end_dim=-1\) is not supported"),
    (conv_net(nn.Flatten(), out=nn.Conv2d(4, 2, 1)), Widen("0", factor=2), TypeError,
     r"module '1' \(Flatten.*followed by an nn.Linear"),
    (conv_net(nn.Flatten(2), out=nn.Linear(36, 2)), Widen("0", factor=2), TypeError,
     r"module '1' \(Flatten, start_dim=2, end_dim=-1\) is not supported"),
    (conv_net(nn.Flatten(), nn.BatchNorm1d(36), out=nn.Linear(36, 2)), Widen("0", factor=2), TypeError,
     r"module '2' \(BatchNorm1d\) is not supported between '0' and '3'"),
    (conv_net(nn.ReLU(), nn.Flatten(), out=nn.Linear(30, 2)), Widen("0", factor=2), ValueError,
     r"module '3' \(Linear\) has in_features=30, not a multiple of the 4 channels"),
    (conv_net(nn.ReLU()), Widen("2", factor=2), ValueError,
     r"module '2' \(Conv2d, out_channels=2\) is the output layer"),
    (conv_net(nn.ReLU()), Widen("0", size=3), ValueError, r"module '0' \(Conv2d\) has width 4; size must be >= 4"),
    (conv_net(nn.ReLU()), Widen("1", factor=2), TypeError, r"module '1' is ReLU, expected nn.Linear or nn.Conv2d"),
    (nn.Sequential(nn.ConvTranspose2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)), Widen("0", factor=2), TypeError,
     r"module '0' is ConvTranspose2d, expected nn.Linear or nn.Conv2d"),
])
def test_conv_expand_errors(model, spec, exc, msg):
    snap = snapshot(model)
    with pytest.raises(exc, match=msg):
        expand(model, spec)
    assert_untouched(model, snap)


def test_spatial_size_is_inferred_per_channel_not_required():
    # The same weights work whatever H*W is, as long as in_features / channels is an integer.
    model = conv_net(nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), out=nn.Linear(16, 2))
    new, report = expand(model, Widen("0", size=6), check_inputs=torch.randn(3, 3, 9, 9))
    assert new[4].in_features == 24 and report.changes[0].detail["features_per_channel"] == 4
    assert report.preserving and report.preservation_error <= TOL
    assert preservation_error(model, new, torch.randn(3, 3, 13, 7)) <= TOL


def test_base_copy_unchanged_by_deepcopy_semantics():
    model = build_cnn(2, [3, 3])
    before = copy.deepcopy(model)
    expand(model, Widen("*", factor=3, init="random", noise=0.5))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), before.state_dict().values()))
