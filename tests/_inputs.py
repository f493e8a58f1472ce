"""Random op inputs in the layouts the tests sweep: contiguous or not, shared or per-point x."""

import torch


def noncontig(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout (last dim strided)."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    out = wide[..., ::2]
    assert not out.is_contiguous() or t.numel() <= 1
    return out


def interp_inputs(B, N, I, O, K, *, device="cpu", dtype=torch.float32, bias=True, shared=False,
                  single=False, contiguous=True, seed=0, scale=1.0):
    """x, weight, bias, coeffs for interp_linear. Coefficients lie in [-0.5, 1.5]: outside the
    simplex too, since extrapolation is allowed."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dtype)
    x = r(N, I) if (shared or single) else r(B, N, I)
    w = r(K, O, I) / max(1, I) ** 0.5
    b = r(K, O) if bias else None
    c = (torch.rand(K if single else B, *(() if single else (K,)), generator=g) * 2 - 0.5)
    c = c.to(device=device, dtype=torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype)
    if not contiguous:
        x = noncontig(x)
        w = w.transpose(1, 2).contiguous().transpose(1, 2)
        b = None if b is None else b.t().contiguous().t()
        c = c.t().contiguous().t() if c.dim() == 2 else noncontig(c)
    return x, w, b, c


def targets(N, C, *, B=None, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (N,) if B is None else (B, N)
    return torch.randint(0, C, shape, generator=g).to(device)
