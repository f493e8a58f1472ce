"""The next-token loss of a language model at many points: the engine's ``loss="lm"`` (embeddings
mixed from the vertices, the LM head fused with the cross-entropy, so no point's logits are ever
held) against ``torch.func.vmap`` over B stacked parameter copies with materialised logits.

A GPT-2 config with a 32k-token vocabulary (random weights), B=16 points on a line, 8 sequences
of 128 tokens, float32, CPU.

    python -m benchmarks.lm_loss [--rounds 3] [--json results/bench_lm_loss.json]

Targets: peak extra memory at most 1/8 of the baseline's, time at most 1.0x.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

from benchmarks.harness import run_main, time_interleaved
from benchmarks.memory import peak_extra_bytes
from manifold_ext import engine, params as P

CONFIG = dict(vocab=32000, positions=128, width=256, layers=4, heads=4)
B, N, T = 16, 8, 128


def lm_case(only=None):
    """({"vmap", "fused"}, None): each returns the (B,) mean next-token losses."""
    from manifold_ext import real_models as R

    a, b = R.gpt2(seed=0, **CONFIG), R.gpt2(seed=1, **CONFIG)
    ids = torch.randint(0, CONFIG["vocab"], (N, T), generator=torch.Generator().manual_seed(0))
    t = torch.linspace(0, 1, B)
    coeffs = torch.stack([1 - t, t], 1)
    stacked = P.stack([a, b], model=a)

    def vmapped():
        with torch.no_grad():
            points = {n: torch.einsum("bk,k...->b...", coeffs, s) for n, s in stacked.items()}
            logits = vmap(lambda p: functional_call(a, p, (ids,)).logits)(points)  # (B, N, T, V)
            flat = logits[:, :, :-1].reshape(B, -1, logits.shape[-1])
            target = ids[:, 1:].reshape(-1)
            return torch.stack([F.cross_entropy(flat[i], target) for i in range(B)])

    def fused():
        return engine.evaluate(a, [a, b], coeffs, (ids, ids), loss="lm", engine="fused", quiet=True).loss

    methods = {"vmap": vmapped, "fused": fused}
    return ({only: methods[only]} if only else methods), None


def measure(rounds: int = 3) -> dict:
    methods, _ = lm_case()
    torch.testing.assert_close(methods["fused"]().float(), methods["vmap"]().float(), rtol=1e-4, atol=1e-5)
    t = time_interleaved(methods, rounds=rounds, warmup=1)
    mem = {m: peak_extra_bytes("lm_case", m, module="benchmarks.lm_loss") for m in methods}
    return {"config": CONFIG, "B": B, "N": N, "T": T, "seconds": t, "peak_extra_bytes": mem,
            "time_ratio": t["fused"] / t["vmap"], "memory_ratio": mem["fused"] / mem["vmap"]}


def table(res: dict) -> str:
    s, m = res["seconds"], res["peak_extra_bytes"]
    return "\n".join([
        f"GPT-2 {res['config']}, B={res['B']} points, {res['N']} x {res['T']} tokens, float32, CPU",
        f"vmap over stacked copies, logits materialised: {s['vmap']:.2f} s, peak extra {m['vmap'] / 2**20:.0f} MiB",
        f"engine loss='lm' (fused head):                 {s['fused']:.2f} s, peak extra {m['fused'] / 2**20:.0f} MiB",
        f"time ratio {res['time_ratio']:.2f}x (target <= 1.0), memory ratio {res['memory_ratio']:.3f} "
        f"(target <= 0.125)",
    ])


def main(argv=None) -> int:
    return run_main(__doc__, measure, table, "results/bench_lm_loss.json", argv)


if __name__ == "__main__":
    raise SystemExit(main())
