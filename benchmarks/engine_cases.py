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
