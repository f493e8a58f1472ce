"""Growth of Hugging Face LLaMA models (manifold_ext/expand/hf_llama.py): feed-forward width,
attention heads by whole key-value groups, decoder-layer insertion, config updates.

Preservation: max |grown(x) - base(x)| <= 1e-5 on the logits and on the LM loss, float32, eval
mode, random RMSNorm weights (fresh ones are 1 and hide bugs), tied and untied embeddings,
kv_heads < heads.
"""

import tempfile

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from manifold_ext.expand import Deepen, ExpansionReport, Widen, expand  # noqa: E402
from manifold_ext.real_models import llama  # noqa: E402
from _untouched import assert_untouched, snapshot  # noqa: E402

TOL = 1e-5
VOCAB = 53

# (width, heads, kv_heads, inner, layers, tie): group sizes 2, 3 and 4.
CONFIGS = [
    dict(width=32, heads=4, kv_heads=2, inner=48, layers=2, tie=False),
    dict(width=24, heads=6, kv_heads=2, inner=40, layers=2, tie=True),
    dict(width=32, heads=4, kv_heads=1, inner=20, layers=3, tie=True),
]


def build(cfg, seed=0):
    model = llama(vocab=VOCAB, positions=32, seed=seed, **cfg)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__ == "LlamaRMSNorm":
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
    return model.eval()


def ids_for(n=8, t=12, seed=3):
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def greedy(model, ids):
    mask = torch.ones_like(ids)
    return model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)


@torch.no_grad()
def errors(base, new, ids):
    a, b = base(ids, labels=ids), new(ids, labels=ids)
    return (a.logits - b.logits).abs().max().item(), (a.loss - b.loss).abs().item()


def check_config(new):
    cfg, layers = new.config, new.model.layers
    a, f = layers[0].self_attn, layers[0].mlp
    assert cfg.num_hidden_layers == len(layers)
    assert cfg.intermediate_size == f.gate_proj.out_features
    assert cfg.head_dim == a.head_dim
    assert cfg.num_attention_heads == a.q_proj.out_features // a.head_dim
    assert cfg.num_key_value_heads == a.k_proj.out_features // a.head_dim
    for j, layer in enumerate(layers):
        assert layer.self_attn.layer_idx == j
        assert layer.self_attn.config is cfg and layer.mlp.config is cfg


@torch.no_grad()
def check_roundtrip(new, ids):
    with tempfile.TemporaryDirectory() as d:
        new.save_pretrained(d)
        back = type(new).from_pretrained(d).eval()
    a, b = back.config.to_dict(), new.config.to_dict()
    a.pop("_name_or_path", None), b.pop("_name_or_path", None)
    assert a == b
    assert torch.equal(back(ids).logits, new(ids).logits)
    if new.config.tie_word_embeddings:
        assert back.lm_head.weight is back.model.embed_tokens.weight


PRESERVING = [
    [Widen("model.layers.*.mlp", factor=1.5, init="net2net")],
    [Widen("model.layers.*.mlp", factor=2, init="net2net")],
    [Widen("model.layers.*.mlp", factor=2, init="zero")],
    [Deepen("model.layers.0", count=2, init="zero")],
    [Deepen("model.layers.*", init="zero")],
]


def heads_specs(cfg):
    g = cfg["heads"] // cfg["kv_heads"]
    # the next head count that is a multiple of the group size and divides the width
    m = next(h for h in range(cfg["heads"] + g, 4 * cfg["heads"] + 1, g) if cfg["width"] % h == 0)
    return [[Widen("model.layers.*.self_attn", size=m, init="net2net")],
            [Widen("model.layers.*.self_attn", size=m, init="zero")]], m


@pytest.mark.parametrize("ci", range(len(CONFIGS)))
def test_preserving_operators(ci):
    cfg = CONFIGS[ci]
    base = build(cfg, seed=ci)
    snap = snapshot(base)
    ids = ids_for()
    hspecs, m = heads_specs(cfg)
    combo = [Widen("model.layers.*.mlp", size=cfg["inner"] + 5, init="net2net"), hspecs[0][0],
             Deepen("model.layers.1", count=1, init="zero"), Widen("model.layers.*.mlp", factor=2, init="zero"),
             Widen("model.embed_tokens", size=cfg["width"] + m, init="zero")]
    residual = [[Widen("model.embed_tokens", factor=2, init="zero")],
                [Widen("model.embed_tokens", size=cfg["width"] + cfg["heads"], init="zero")]]
    if not cfg["tie"]:
        residual += [[Widen("model.embed_tokens", factor=2, init="net2net")],
                     [Widen("model.embed_tokens", size=2 * cfg["width"] + cfg["heads"], init="net2net")]]
    base_tokens = greedy(base, ids)
    for specs in PRESERVING + hspecs + residual + [combo]:
        new, rep = expand(base, *specs, generator=torch.Generator().manual_seed(7))
        assert rep.preserving, rep.summary()
        assert rep.preservation_error is not None and rep.preservation_error <= TOL, rep.summary()
        assert rep.check_inputs_shape == [64, 16]
        e_logits, e_loss = errors(base, new, ids)
        assert e_logits <= TOL and e_loss <= TOL, (specs, e_logits, e_loss)
        check_config(new)
        check_roundtrip(new, ids)
        assert torch.equal(greedy(new, ids), base_tokens), specs
        if cfg["tie"]:
            assert new.lm_head.weight is new.model.embed_tokens.weight
        assert ExpansionReport.from_json(rep.to_json()) == rep
    assert_untouched(base, snap)


def test_mlp_report_and_shapes():
    cfg = CONFIGS[0]
    base = build(cfg)
    new, rep = expand(base, Widen("model.layers.*.mlp", size=60, init="net2net"),
                      generator=torch.Generator().manual_seed(0))
    assert [c.path for c in rep.changes] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    for c in rep.changes:
        assert (c.op, c.kind, c.init, c.exact) == ("widen", "LlamaMLP", "net2net", True)
        assert c.before == [32, 48] and c.after == [32, 60]
        # torch's (out, in) weight shapes
        assert c.detail["weights_before"] == {"gate_proj": [48, 32], "up_proj": [48, 32], "down_proj": [32, 48]}
        assert c.detail["weights_after"] == {"gate_proj": [60, 32], "up_proj": [60, 32], "down_proj": [32, 60]}
        assert c.detail["copied"] == 12 and c.detail["fresh"] == 0
    assert new.model.layers[1].mlp.down_proj.weight.shape == (32, 60)
    assert new.config.intermediate_size == 60 and base.config.intermediate_size == 48
    assert rep.params_after - rep.params_before == 2 * 3 * 32 * 12


def test_heads_report_and_shapes():
    cfg = CONFIGS[1]  # 6 heads, 2 kv heads: groups of 3, head_dim 4
    base = build(cfg)
    new, rep = expand(base, Widen("model.layers.*.self_attn", size=12, init="net2net"),
                      generator=torch.Generator().manual_seed(0))
    c = rep.changes[0]
    assert c.path == "model.layers.0.self_attn" and c.kind == "Attention" and c.exact
    assert c.before == [24, 6] and c.after == [24, 12]
    d = c.detail
    assert (d["kv_heads_before"], d["kv_heads_after"], d["group_size"], d["head_dim"]) == (2, 4, 3, 4)
    assert sorted(d["copied_groups"]) == [0, 1]
    assert d["weights_before"] == {"q_proj": [24, 24], "k_proj": [8, 24], "v_proj": [8, 24], "o_proj": [24, 24]}
    assert d["weights_after"] == {"q_proj": [48, 24], "k_proj": [16, 24], "v_proj": [16, 24], "o_proj": [24, 48]}
    attn = new.model.layers[0].self_attn
    assert attn.num_key_value_groups == 3 and attn.head_dim == 4
    assert (new.config.num_attention_heads, new.config.num_key_value_heads, new.config.head_dim) == (12, 4, 4)


def test_deepen_report_and_layer_idx():
    base = build(CONFIGS[0])
    new, rep = expand(base, Deepen("model.layers.0", count=2, init="zero"))
    assert [c.path for c in rep.changes] == ["model.layers.1", "model.layers.2"]
    assert all(c.kind == "LlamaDecoderLayer" and c.exact and c.after == [32, 4] for c in rep.changes)
    assert [layer.self_attn.layer_idx for layer in new.model.layers] == [0, 1, 2, 3]
    assert new.config.num_hidden_layers == 4 and base.config.num_hidden_layers == 2
    assert new.model.layers[3] is not base.model.layers[1]
    # a later Deepen renumbers earlier changes
    new2, rep2 = expand(base, Widen("model.layers.*.mlp", factor=2, init="zero"), Deepen("model.layers.0", init="zero"))
    assert [c.path for c in rep2.changes] == ["model.layers.0.mlp", "model.layers.2.mlp", "model.layers.1"]
    assert new2.model.layers[1].mlp.gate_proj.out_features == 96  # the new layer has the grown width


@pytest.mark.parametrize("spec", [
    Widen("model.layers.*.mlp", factor=2, init="random"),
    Widen("model.layers.*.self_attn", size=8, init="random"),
    Widen("model.layers.*.mlp", factor=2, init="zero", noise=0.1),
    Deepen("model.layers.0", init="copy"),
    Deepen("model.layers.0", init="random"),
    Deepen("model.layers.0", init="zero", noise=0.1),
    Widen("model.embed_tokens", factor=2, init="random"),
    Widen("model.embed_tokens", factor=2, init="zero", noise=0.1),
])
def test_not_preserving_reported(spec):
    base = build(CONFIGS[0])
    ids = ids_for()
    new, rep = expand(base, spec, generator=torch.Generator().manual_seed(0))
    assert not rep.preserving and not any(c.exact for c in rep.changes)
    assert all("not preserving" in c.note for c in rep.changes)
    assert rep.preservation_error > 1e-4
    check_config(new)
    check_roundtrip(new, ids)
    assert greedy(new, ids).shape == (8, 15)


def test_engine_evaluate_gives_own_loss():
    from manifold_ext import engine

    base = build(CONFIGS[1])
    ids = ids_for()
    new, _ = expand(base, Widen("model.layers.*.mlp", factor=2, init="net2net"),
                    Widen("model.layers.*.self_attn", size=12, init="zero"), Deepen("model.layers.*", init="copy"),
                    Widen("model.embed_tokens", size=36, init="zero"), generator=torch.Generator().manual_seed(0))
    ev = engine.evaluate(new, [new], torch.ones(1, 1), (ids, ids), loss="lm", engine="fused")
    with torch.no_grad():
        own = new(ids, labels=ids).loss
    assert abs(ev.loss[0].item() - own.item()) <= 1e-5


def test_llama_model_without_head():
    base = build(CONFIGS[0]).model  # a LlamaModel: paths layers.<i>
    ids = ids_for()
    new, rep = expand(base, Widen("layers.*.mlp", factor=2, init="net2net"), Widen("layers.*.self_attn", size=8, init="zero"),
                      Deepen("layers.1", init="zero"), generator=torch.Generator().manual_seed(0))
    assert type(new).__name__ == "LlamaModel"
    assert rep.preserving and rep.preservation_error <= TOL  # compared on last_hidden_state
    assert [c.path for c in rep.changes][-1] == "layers.2"
    with torch.no_grad():
        err = (new(ids).last_hidden_state - base(ids).last_hidden_state).abs().max().item()
    assert err <= TOL
    assert new.config.num_hidden_layers == 3 and new.config.intermediate_size == 96


def test_matches_without_importing_transformers_at_import():
    import sys

    import manifold_ext.expand.hf_llama as hl

    src = open(hl.__file__).read()
    assert "import transformers" not in src and "from transformers" not in src
    assert hl.FAMILY.matches(build(CONFIGS[0])) and not hl.FAMILY.matches(nn.Linear(2, 2))
    assert "transformers" in sys.modules  # (imported by the builder, not by the family)


@pytest.mark.parametrize("spec,err,msg", [
    (Widen("model.layers.0.mlp", factor=2), ValueError, "selects 1 of the 2 decoder layers"),
    (Widen("model.layers.1.self_attn", size=8), ValueError, "LlamaConfig.num_attention_heads is one number"),
    (Widen("model.layers.*.self_attn", size=5), ValueError, "must be a multiple of 2, got 5"),
    (Widen("model.layers.*.self_attn", size=6), ValueError, "hidden_size (32) to be a multiple of num_attention_heads"),
    (Widen("model.layers.*.mlp", size=40), ValueError, "size must be >= 48"),
    (Widen("model.layers.*", factor=2), ValueError, "selects both feed-forward and attention"),
    (Widen("model.embed_tokens", size=34), ValueError, "hidden_size to be a multiple of num_attention_heads (4)"),
    (Widen("model.norm", factor=2), TypeError, "cannot be widened"),
    (Widen("model.layers.0.mlp.gate_proj", factor=2), TypeError, "cannot be widened"),
    (Widen("nothing", factor=2), ValueError, "matches no widenable module"),
    (Deepen("model.layers.0", init="identity"), ValueError, "use init='zero'"),
    (Deepen("model.layers.0.mlp", init="zero"), TypeError, "is not a LlamaDecoderLayer"),
    (Deepen("model.layers.9", init="zero"), ValueError, "matches no decoder layer"),
])
def test_errors(spec, err, msg):
    base = build(CONFIGS[0])
    snap = snapshot(base)
    with pytest.raises(err) as info:
        expand(base, spec)
    assert msg in str(info.value)
    assert_untouched(base, snap)


def test_residual_width_report_and_tied():
    base = build(CONFIGS[1])  # tied, width 24, 6 heads
    new, rep = expand(base, Widen("model.embed_tokens", size=36, init="zero"), generator=torch.Generator().manual_seed(0))
    c = rep.changes[0]
    assert (c.path, c.kind, c.before, c.after, c.exact) == ("model.embed_tokens", "Embedding", [24], [36], True)
    assert c.detail["tied"] and c.detail["zero_units"] == 12 and c.detail["eps_scale"] == 24 / 36
    assert new.lm_head.weight is new.model.embed_tokens.weight and new.lm_head.weight.shape == (VOCAB, 36)
    assert new.config.hidden_size == 36 and new.config.head_dim == 4
    assert new.config.rms_norm_eps == pytest.approx(base.config.rms_norm_eps * 24 / 36)
    layer = new.model.layers[0]
    assert layer.self_attn.q_proj.weight.shape == (24, 36) and layer.self_attn.o_proj.weight.shape == (36, 24)
    assert layer.mlp.down_proj.weight.shape == (36, 40) and layer.input_layernorm.weight.shape == (36,)
    # net2net would have to divide the tied lm_head's columns
    with pytest.raises(ValueError, match="tied to lm_head"):
        expand(base, Widen("model.embed_tokens", factor=2, init="net2net"))


@torch.no_grad()
def test_residual_zero_padding_without_rescale_is_not_exact():
    """Why the RMSNorm eps/gain rescale is needed: plain zero units change the RMS (measured ~0.3)."""
    base = build(CONFIGS[0])
    ids = ids_for()
    new, rep = expand(base, Widen("model.embed_tokens", factor=2, init="zero"))
    s = rep.changes[0].detail["eps_scale"]
    assert s == 0.5 and errors(base, new, ids)[0] <= TOL
    for m in new.modules():
        if type(m).__name__ == "LlamaRMSNorm":
            m.weight /= s ** 0.5
            m.variance_epsilon /= s
    assert errors(base, new, ids)[0] > 1e-2


def test_layer_types_follow_inserted_layers():
    base = build(CONFIGS[0])
    # (LlamaConfig has no layer_types; configs that do list one entry per layer)
    base.config.layer_types = ["full_attention", "full_attention"]
    new, rep = expand(base, Deepen("model.layers.*", count=2, init="zero"))
    assert new.config.layer_types == ["full_attention"] * 6 and rep.preservation_error == 0
    assert base.config.layer_types == ["full_attention", "full_attention"]
    assert greedy(new, ids_for()).shape == (8, 15)


def test_heads_net2net_partial_rounds():
    """Heads 4 -> 6 with kv 2: one of the two groups, drawn at random, is copied (and its q heads' o_proj
    columns halved)."""
    cfg = dict(width=48, heads=4, kv_heads=2, inner=24, layers=2, tie=False)
    base = build(cfg, seed=5)
    ids = ids_for()
    seen = set()
    for seed in range(6):
        new, rep = expand(base, Widen("model.layers.*.self_attn", size=6, init="net2net"),
                          generator=torch.Generator().manual_seed(seed))
        seen.update(g for c in rep.changes for g in c.detail["copied_groups"])
        assert rep.preserving and max(errors(base, new, ids)) <= TOL
        assert (new.config.num_attention_heads, new.config.num_key_value_heads) == (6, 3)
    assert seen == {0, 1}
