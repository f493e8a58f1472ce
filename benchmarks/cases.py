"""The benchmark cases of the fused-ops issue: inputs and the competing implementations."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import manifold_ext as mx


def interp_linear_case(B=64, K=2, N=256, I=512, O=512, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(device, dtype)
    x, xs = r(B, N, I), r(N, I)
    w, b = r(K, O, I) / I**0.5, r(K, O)
    c = torch.rand(B, K, generator=g).to(device, torch.float32 if dtype != torch.float64 else dtype)
    # The BLAS ceiling: per-point weights materialised beforehand (B copies), one torch.bmm.
    wb = torch.einsum("bk,koi->boi", c.to(dtype), w).transpose(1, 2).contiguous().transpose(1, 2)
    bb = (c.to(dtype) @ b).unsqueeze(1)

    def loop():
        out = []
        for i in range(B):
            wi = sum(c[i, k] * w[k] for k in range(K))
            out.append(torch.addmm(c[i].to(dtype) @ b, x[i], wi.t()))
        return torch.stack(out)

    methods = {
        "fused": lambda: mx.interp_linear(x, w, b, c),
        "bmm": lambda: torch.baddbmm(bb, x, wb.transpose(1, 2)),
        "loop": loop,
        "fused_shared": lambda: mx.interp_linear(xs, w, b, c),
        "bmm_shared": lambda: torch.baddbmm(bb, xs.expand(B, N, I), wb.transpose(1, 2)),
    }
    flops = 2.0 * B * N * I * O
    return methods, flops


def cross_entropy_case(B=16, N=512, I=256, C=32_000, K=2, device="cpu", seed=0, only=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, I, generator=g).to(device)
    w = (torch.randn(K, C, I, generator=g) / I**0.5).to(device)
    b = torch.randn(K, C, generator=g).to(device)
    c = torch.rand(B, K, generator=g).to(device)
    t = torch.randint(0, C, (N,), generator=g).to(device)
    # The baseline gets its B per-point weights for free (built here, outside the timed call).
    if only in (None, "materialised"):
        wb = torch.einsum("bk,koi->boi", c, w)
        bb = (c @ b).unsqueeze(1)

    def materialised():
        logits = torch.baddbmm(bb, x, wb.transpose(1, 2))
        return F.cross_entropy(logits.reshape(B * N, C), t.repeat(B), reduction="none").view(B, N).sum(1)

    methods = {
        "fused": lambda: mx.interp_linear_cross_entropy(x, w, b, c, t),
        "materialised": materialised,
    }
    return methods, 2.0 * B * N * I * C
