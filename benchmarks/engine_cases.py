"""Whole-model line probes for the engine benchmarks: the baseline ladder of DESIGN.md section 7."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from manifold_ext import engine
from manifold_ext.data import load_digits


def mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 10))


def small_cnn(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1, stride=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(32 * 4 * 4, 10))


def line_case(arch="mlp", N=64, B=64, only=None):
    """Methods evaluating mean loss at B points of the line between two models, on N examples."""
    make = mlp if arch == "mlp" else small_cnn
    a, b = make(0), make(1)
    d = load_digits(test_fraction=0.5)
    x = torch.cat([d.x_train, d.x_test])[:N]
    y = torch.cat([d.y_train, d.y_test])[:N]
    if arch == "cnn":
        x = x.reshape(-1, 1, 8, 8)
    t = torch.linspace(0, 1, B)
    coeffs = torch.stack([1 - t, t], 1)
    sa, sb = a.state_dict(), b.state_dict()

    def naive():
        m = copy.deepcopy(a)
        out = []
        with torch.no_grad():
            for ti in t.tolist():
                m.load_state_dict({k: (1 - ti) * sa[k] + ti * sb[k] for k in sa})
                out.append(F.cross_entropy(m(x), y))
        return torch.stack(out)

    m_inplace = copy.deepcopy(a)
    pa = [p.detach().clone() for p in a.parameters()]
    pd = [pb.detach() - p for pb, p in zip(b.parameters(), pa)]

    def inplace():
        out = []
        with torch.no_grad():
            for ti in t.tolist():
                for p, p0, dp in zip(m_inplace.parameters(), pa, pd):
                    torch.add(p0, dp, alpha=ti, out=p)
                out.append(F.cross_entropy(m_inplace(x), y))
        return torch.stack(out)

    names = [n for n, _ in a.named_parameters()]
    stacked_ab = {n: torch.stack([sa[n], sb[n]]) for n in names}

    def vmapped():
        # B per-point parameter copies, then one vmapped forward.
        P = {n: torch.einsum("bk,k...->b...", coeffs, s) for n, s in stacked_ab.items()}
        with torch.no_grad():
            logits = vmap(lambda p: functional_call(a, p, (x,)))(P)
            return F.cross_entropy(logits.reshape(-1, 10), y.repeat(B), reduction="none").view(B, -1).mean(1)

    def fused():
        return engine.evaluate(a, [a, b], coeffs, (x, y), quiet=True).loss

    methods = {"naive": naive, "inplace": inplace, "vmap": vmapped, "fused": fused}
    if only is not None:
        methods = {only: methods[only]}
    n_mm = sum(m.weight.numel() for m in a.modules() if isinstance(m, nn.Linear))
    flops = 2.0 * B * N * n_mm if arch == "mlp" else None
    return methods, flops


def floor_case(arch="mlp", N=64, B=64):
    """The products no method can avoid, at the BLAS's best: every layer after the first (whose
    input all points share, so K products serve them all) at every point, with the per-point
    weights and inputs built beforehand, outside the timed call. Its time bounds from below what
    any evaluation of the line probe can take, and so bounds each speed-up from above."""
    make = mlp if arch == "mlp" else small_cnn
    a, b = make(0), make(1)
    t = torch.linspace(0, 1, B)
    sa, sb = a.state_dict(), b.state_dict()
    per_point = lambda name: torch.stack([(1 - ti) * sa[name] + ti * sb[name] for ti in t.tolist()])
    g = torch.Generator().manual_seed(0)
    if arch == "mlp":
        layers = [("2", 256), ("4", 256)]
        # One input for every point: its values do not change the cost, and B inputs would stream
        # from memory where an evaluation keeps each point's activations in cache.
        ins = [torch.rand(N, width, generator=g).expand(B, N, width) for _, width in layers]
        ws = [per_point(f"{n}.weight").transpose(1, 2) for n, _ in layers]
        bs = [per_point(f"{n}.bias").unsqueeze(1) for n, _ in layers]
        return lambda: [torch.baddbmm(bi, hi, wi) for hi, wi, bi in zip(ins, ws, bs)]
    # CNN: the second convolution point by point (on the CPU faster than one grouped convolution
    # of B groups, which is the roofline's job: the fastest form of each layer's work) and the
    # classifier as one batched product.
    h1 = torch.rand(N, 16, 8, 8, generator=g).expand(B, N, 16, 8, 8)
    w2, b2 = per_point("2.weight"), per_point("2.bias")
    h2 = torch.rand(N, 32 * 4 * 4, generator=g).expand(B, N, 32 * 4 * 4)
    w5, b5 = per_point("5.weight").transpose(1, 2), per_point("5.bias").unsqueeze(1)
    return lambda: ([F.conv2d(h1[i], w2[i], b2[i], stride=2, padding=1) for i in range(B)],
                    torch.baddbmm(b5, h2, w5))
