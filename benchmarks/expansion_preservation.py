"""Measured function preservation of every preserving expansion on the model zoo:
max |grown(x) - base(x)|, float32, eval mode, random inputs, random BatchNorm statistics and
LayerNorm parameters, over several seeds. Prints a table and saves JSON.

    python -m benchmarks.expansion_preservation [--seeds 10] [--json results/expansion_preservation.json]
"""

from __future__ import annotations


import torch
from torch import nn

from benchmarks.harness import run_main
from manifold_ext import models
from manifold_ext.expand import Deepen, Widen, expand


def _randomise_norms(model: nn.Module, g: torch.Generator) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model.eval()


CASES = [
    ("mlp 64-64-64-10, BatchNorm1d", lambda: models.mlp((64, 64, 64, 10), norm="batch"),
     lambda g: torch.randn(64, 64, generator=g),
     [Widen("*", factor=2, init="net2net"), Widen("*", factor=1.5, init="zero"),
      Deepen(after="2", init="identity")]),
    ("mlp 64-64-64-10, LayerNorm", lambda: models.mlp((64, 64, 64, 10), norm="layer"),
     lambda g: torch.randn(64, 64, generator=g),
     [Widen("*", factor=2, init="net2net")]),
    ("ResNetCNN (16, 32)", lambda: models.ResNetCNN(),
     lambda g: torch.randn(32, 1, 8, 8, generator=g),
     [Widen("stages.*", factor=2, init="net2net"), Widen("stages.0", factor=1.5, init="net2net"),
      Widen("stages.1", size=40, init="zero"), Deepen(after="stages.*", init="zero")]),
    ("TinyTransformer width 16, 2 heads, depth 2", lambda: models.TinyTransformer(13, 6, 16, 2, 5, depth=2),
     lambda g: torch.randint(0, 13, (32, 6), generator=g),
     [Widen("blocks.*.ff1", factor=1.5, init="net2net"), Widen("blocks.*.ff1", factor=2, init="zero"),
      Widen("blocks.*.qkv", size=3, init="net2net"), Widen("blocks.*.qkv", size=4, init="zero"),
      Widen("tok", factor=2, init="net2net"), Widen("tok", size=24, init="zero"),
      Deepen(after="blocks.*", init="zero")]),
]


def measure(seeds: int = 10) -> dict:
    rows = []
    for name, make, inputs, specs in CASES:
        for spec in specs:
            worst, exact = 0.0, True
            for seed in range(seeds):
                torch.manual_seed(seed)
                g = torch.Generator().manual_seed(seed)
                base = _randomise_norms(make(), g)
                _, report = expand(base, spec, generator=torch.Generator().manual_seed(seed),
                                   check_inputs=inputs(g))
                worst = max(worst, report.preservation_error)
                exact = exact and report.preserving
            rows.append({"model": name, "spec": repr(spec), "claimed_exact": exact, "max_error": worst})
    return {"seeds": seeds, "rows": rows}


def table(res: dict) -> str:
    """One line per expansion, and how many claimed exact are not."""
    lines = [f"{r['model']:44s} {r['spec'][:70]:70s} exact={r['claimed_exact']!s:5s} max err {r['max_error']:.2e}"
             for r in res["rows"]]
    lines.append(f"{len(res['rows'])} expansions, {len(_broken(res))} claimed exact with an error above 1e-5")
    return "\n".join(lines)


def _broken(res: dict) -> list:
    return [r for r in res["rows"] if r["claimed_exact"] and r["max_error"] > 1e-5]


def main(argv=None) -> int:
    results = {}

    def measured(seeds: int) -> dict:
        results.update(measure(seeds))
        return results

    run_main(__doc__, measured, table, "results/expansion_preservation.json", argv, rounds=10, count="seeds")
    return 1 if _broken(results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
