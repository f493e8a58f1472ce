"""Growth operators on Hugging Face GPT-2 (manifold_ext/expand/hf_gpt2.py)."""

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from manifold_ext.expand import Deepen, Widen, expand  # noqa: E402
from manifold_ext.real_models import gpt2  # noqa: E402

TOL = 1e-5
# (vocab, width, layers, heads, inner, seed): small random configs; inner None = 4 * width.
CONFIGS = [(53, 16, 2, 2, 24, 0), (71, 24, 3, 4, None, 1), (37, 8, 1, 1, 12, 2)]


def _model(vocab, width, layers, heads, inner, seed, base=False):
    m = gpt2(vocab=vocab, positions=32, width=width, layers=layers, heads=heads, inner=inner, seed=seed)
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for mod in m.modules():  # fresh LayerNorms are 1 and 0, which hide bugs
            if isinstance(mod, nn.LayerNorm):
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=g) + 0.5)
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.3)
        for mod in m.modules():  # non-zero Conv1D biases too
            if type(mod).__name__ == "Conv1D":
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)
    return m.transformer.eval() if base else m


def _ids(m, n=6, t=12, seed=0):
    vocab = m.config.vocab_size
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def _out(m, ids):
    with torch.no_grad():
        if hasattr(m, "lm_head"):
            o = m(ids, labels=ids)
            return o.logits, o.loss
        return m(ids).last_hidden_state, None


def _errors(base, grown, ids):
    lb, sb = _out(base, ids)
    lg, sg = _out(grown, ids)
    assert lg.shape == lb.shape
    err_loss = None if sb is None else (sg - sb).abs().item()
    return (lg - lb).abs().max().item(), err_loss


def _greedy(m, ids):
    with torch.no_grad():
        return m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                          pad_token_id=0)


def _inner(m):
    return m.transformer.h[0].mlp.c_fc.weight.shape[1]


PRESERVING = {
    "ff net2net x1.5": lambda p, m: [Widen(f"{p}.*.mlp", factor=1.5, init="net2net")],
    "ff net2net x2": lambda p, m: [Widen(f"{p}.*.mlp", factor=2, init="net2net")],
    "ff zero size+5": lambda p, m: [Widen(f"{p}.*.mlp", size=_inner(m) + 5, init="zero")],
    "depth zero": lambda p, m: [Deepen(f"{p}.0", count=2, init="zero")],
    "depth zero all": lambda p, m: [Deepen(f"{p}.*", init="zero")],
    "ff then depth": lambda p, m: [Widen(f"{p}.*.mlp", factor=2, init="net2net"), Deepen(f"{p}.0", init="zero"),
                                   Widen(f"{p}.*.mlp", factor=1.25, init="zero")],
}


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("name", list(PRESERVING))
def test_preserving_ops(cfg, name):
    m = _model(*cfg)
    ids = _ids(m)
    grown, rep = expand(m, *PRESERVING[name]("transformer.h", m), generator=torch.Generator().manual_seed(7))
    assert rep.preserving and all(c.exact for c in rep.changes)
    assert rep.preservation_error is not None and rep.preservation_error <= TOL
    assert rep.check_inputs_shape == [64, 16]
    err_logits, err_loss = _errors(m, grown, ids)
    assert err_logits <= TOL and err_loss <= TOL, (err_logits, err_loss)
    # greedy decoding (with the KV cache) is unchanged
    assert torch.equal(_greedy(grown, ids), _greedy(m, ids))
    # the base is untouched
    assert m.config.n_layer == cfg[2]


def test_report_paths_shapes_and_config():
    m = _model(53, 16, 2, 2, 24, 0)
    grown, rep = expand(m, Widen("transformer.h.*.mlp", factor=2, init="net2net"),
                        Deepen("transformer.h.0", count=1, init="zero"), generator=torch.Generator().manual_seed(0))
    # a later Deepen renumbers: the second widened MLP is now block 2
    assert [(c.op, c.path, c.kind) for c in rep.changes] == [
        ("widen", "transformer.h.0.mlp", "GPT2MLP"), ("widen", "transformer.h.2.mlp", "GPT2MLP"),
        ("deepen", "transformer.h.1", "GPT2Block")]
    w = rep.changes[0]
    assert w.before == [16, 24] and w.after == [16, 48]
    assert w.detail["weights_before"] == {"c_fc": [16, 24], "c_proj": [24, 16]}
    assert w.detail["weights_after"] == {"c_fc": [16, 48], "c_proj": [48, 16]}
    blk = grown.transformer.h[2]
    assert list(blk.mlp.c_fc.weight.shape) == [16, 48] and list(blk.mlp.c_proj.weight.shape) == [48, 16]
    assert blk.mlp.c_fc.nf == 48 and blk.mlp.c_proj.nx == 48
    d = rep.changes[2]
    assert d.after == [16, 2] and d.detail["index"] == 1
    assert d.detail["weights"]["mlp.c_fc"] == [16, 48] and d.detail["weights"]["attn.c_attn"] == [16, 48]
    assert grown.config.n_inner == 48 and grown.config.n_layer == 3 and grown.config.n_head == 2
    assert grown.transformer.config is grown.config
    assert [b.attn.layer_idx for b in grown.transformer.h] == [0, 1, 2]
    assert m.config.n_inner == 24 and m.config.n_layer == 2 and len(m.transformer.h) == 2
    assert grown.lm_head.weight is grown.transformer.wte.weight  # still tied
    assert rep.params_after > rep.params_before
    assert "GPT2MLP" in rep.summary()
    # paths in the base, and weight shapes as torch stores them (Conv1D: (in, out))
    assert [c.base_path for c in rep.changes] == ["transformer.h.0.mlp", "transformer.h.1.mlp", None]
    assert rep.changes[1].weights == {"c_fc.weight": [[16, 24], [16, 48]], "c_fc.bias": [[24], [48]],
                                      "c_proj.weight": [[24, 16], [48, 16]]}
    assert d.weights["attn.c_attn.weight"] == [[], [16, 48]] and d.weights["mlp.c_fc.weight"] == [[], [16, 48]]
    assert "transformer.h.2.mlp (base: transformer.h.1.mlp)" in rep.summary()
    assert "transformer.h.1 (new)" in rep.summary()


def test_default_inner_config():
    m = _model(71, 24, 3, 4, None, 1)  # n_inner None = 4 * 24 = 96
    grown, _ = expand(m, Widen("transformer.h.*.mlp", size=100, init="zero"))
    assert grown.config.n_inner == 100
    grown, _ = expand(m, Deepen("transformer.h.2", init="zero"))
    assert grown.config.n_inner is None and grown.config.n_layer == 4


@pytest.mark.parametrize("specs", [
    lambda: [Widen("transformer.h.*.mlp", factor=2, init="net2net"), Deepen("transformer.h.*", init="zero")],
    lambda: [Deepen("transformer.h.1", count=2, init="copy")],
])
def test_save_load_roundtrip_and_generate(tmp_path, specs):
    m = _model(53, 16, 2, 2, 24, 0)
    ids = _ids(m)
    grown, _ = expand(m, *specs(), generator=torch.Generator().manual_seed(3))
    grown.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(back).__name__ == "GPT2LMHeadModel"
    assert back.config.n_inner == grown.config.n_inner and back.config.n_layer == grown.config.n_layer
    lg, _ = _out(grown, ids)
    lb, _ = _out(back, ids)
    assert torch.equal(lg, lb)
    assert torch.equal(_greedy(back, ids), _greedy(grown, ids))


def test_gpt2model_paths_and_roundtrip(tmp_path):
    m = _model(53, 16, 2, 2, 24, 0, base=True)
    assert type(m).__name__ == "GPT2Model"
    ids = _ids(m)
    grown, rep = expand(m, Widen("h.*.mlp", factor=2, init="net2net"), Deepen("h.1", init="zero"),
                        generator=torch.Generator().manual_seed(0))
    assert [c.path for c in rep.changes] == ["h.0.mlp", "h.1.mlp", "h.2"]
    assert rep.preserving and rep.preservation_error <= TOL  # measured on last_hidden_state
    assert rep.check_inputs_shape == [64, 16]
    err, _ = _errors(m, grown, ids)
    assert err <= TOL
    assert grown.config.n_inner == 48 and grown.config.n_layer == 3
    grown.save_pretrained(tmp_path)
    back = transformers.AutoModel.from_pretrained(tmp_path).eval()
    assert torch.equal(_out(back, ids)[0], _out(grown, ids)[0])


@pytest.mark.parametrize("spec", [
    Widen("transformer.h.*.mlp", factor=2, init="random"),
    Deepen("transformer.h.0", init="random"),
    Deepen("transformer.h.0", init="copy"),
    Deepen("transformer.h.0", init="zero", noise=0.01),
    Widen("transformer.h.*.mlp", factor=2, init="net2net", noise=0.01),
])
def test_non_preserving_reported(spec):
    m = _model(53, 16, 2, 2, 24, 0)
    grown, rep = expand(m, spec, generator=torch.Generator().manual_seed(0))
    assert not rep.preserving and not any(c.exact for c in rep.changes)
    assert rep.preservation_error > 1e-4
    assert "not preserving" in rep.changes[0].note
    _greedy(grown, _ids(m))  # still generates


def test_random_generator_reproducible():
    m = _model(53, 16, 2, 2, 24, 0)
    a, _ = expand(m, Deepen("transformer.h.0", init="random"), generator=torch.Generator().manual_seed(5))
    b, _ = expand(m, Deepen("transformer.h.0", init="random"), generator=torch.Generator().manual_seed(5))
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)


def test_errors():
    m = _model(53, 16, 2, 2, 24, 0)
    with pytest.raises(ValueError, match="matches no widenable module of GPT2LMHeadModel"):
        expand(m, Widen("transformer.h.9.mlp", factor=2))
    with pytest.raises(TypeError, match=r"module 'transformer.h.0.attn.c_attn' \(Conv1D\) cannot be widened"):
        expand(m, Widen("transformer.h.0.attn.c_attn", factor=2))
    with pytest.raises(TypeError, match=r"module 'transformer.h.0.mlp.c_fc' \(Conv1D\) cannot be widened"):
        expand(m, Widen("transformer.h.0.mlp.c_fc", factor=2))
    with pytest.raises(TypeError, match=r"'transformer.ln_f' \(LayerNorm\) cannot be widened"):
        expand(m, Widen("transformer.ln_f", factor=2))
    with pytest.raises(ValueError, match="must be a multiple of n_head=2, got 17"):
        expand(m, Widen("transformer.wte", size=17))
    with pytest.raises(ValueError, match="size must be >= 16"):
        expand(m, Widen("transformer.wte", size=8))
    with pytest.raises(ValueError, match="the residual width of a GPT2Model is its output"):
        expand(m.transformer, Widen("wte", factor=2))
    with pytest.raises(ValueError, match="more heads grow n_embd, which is its output"):
        expand(m.transformer, Widen("h.*.attn", size=4))
    with pytest.raises(ValueError, match=r"selects 1 of the 2 blocks' attention; GPT2Config.n_head is one number"):
        expand(m, Widen("transformer.h.0.attn", size=4, init="zero"))
    with pytest.raises(ValueError, match="size must be >= 2"):
        expand(m, Widen("transformer.h.*.attn", size=1))
    with pytest.raises(ValueError, match=r"GPT2Config.n_inner is one feed-forward width for every block"):
        expand(m, Widen("transformer.h.0.mlp", factor=2))
    with pytest.raises(ValueError, match="size must be >= 24"):
        expand(m, Widen("transformer.h.*.mlp", size=10))
    with pytest.raises(ValueError, match="matches no block of GPT2LMHeadModel"):
        expand(m, Deepen("transformer.h.7", init="zero"))
    with pytest.raises(TypeError, match=r"'transformer.h.0.mlp' \(GPT2MLP\) is not a GPT2Block"):
        expand(m, Deepen("transformer.h.0.mlp", init="zero"))
    with pytest.raises(ValueError, match="init='identity' inserts a plain layer, which GPT-2 does not take"):
        expand(m, Deepen("transformer.h.0", init="identity"))
    # a glob skips the attention modules
    grown, rep = expand(m, Widen("*", factor=2, init="zero"))
    assert [c.path for c in rep.changes] == ["transformer.h.0.mlp", "transformer.h.1.mlp"]
    assert m.config.n_inner == 24 and len(m.transformer.h) == 2  # errors left the base alone


def test_scale_attn_by_inverse_layer_idx():
    cfg = transformers.GPT2Config(vocab_size=53, n_positions=32, n_embd=16, n_layer=2, n_head=2, n_inner=24,
                                  scale_attn_by_inverse_layer_idx=True, resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0)
    torch.manual_seed(0)
    m = transformers.GPT2LMHeadModel(cfg).eval()
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx is set"):
        expand(m, Deepen("transformer.h.0", init="zero"))
    grown, rep = expand(m, Deepen("transformer.h.1", count=2, init="zero"))
    assert rep.preservation_error == 0.0
    assert grown.transformer.h[3].attn.scaling == pytest.approx(8 ** -0.5 / 4)


def test_engine_evaluate_on_grown():
    from manifold_ext import engine

    m = _model(53, 16, 2, 2, 24, 0)
    grown, _ = expand(m, Widen("transformer.wte", factor=2), Widen("transformer.h.*.mlp", factor=2, init="net2net"),
                      Deepen("transformer.h.0", init="zero"), generator=torch.Generator().manual_seed(0))
    assert grown.config.n_embd == 32 and grown.config.n_layer == 3
    ids = _ids(m, n=4, t=10)
    ev = engine.evaluate(grown, [grown], torch.ones(1, 1), (ids, ids), loss="lm", engine="fused")
    with torch.no_grad():
        own = grown(ids, labels=ids).loss.item()
    loss = torch.as_tensor(ev.loss).reshape(-1)[0].item()
    assert loss == pytest.approx(own, abs=1e-5)


RESIDUAL = [
    lambda D, n: Widen("transformer.wte", factor=2, init="net2net"),
    lambda D, n: Widen("transformer.wte", size=D + 2 * n, init="net2net"),  # mean units
    lambda D, n: Widen("transformer.wte", factor=3, init="zero"),
]


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("which", range(len(RESIDUAL)))
def test_residual_width_preserving(cfg, which, tmp_path):
    m = _model(*cfg)
    D, n = cfg[1], cfg[3]
    ids = _ids(m)
    spec = RESIDUAL[which](D, n)
    grown, rep = expand(m, spec, generator=torch.Generator().manual_seed(1))
    m2 = spec.new_width("transformer.wte", "Embedding", D)
    (c,) = rep.changes
    assert (c.path, c.kind, c.before, c.after, c.exact) == ("transformer.wte", "Embedding", [D], [m2], True)
    assert rep.preservation_error <= TOL
    err_logits, err_loss = _errors(m, grown, ids)
    assert err_logits <= TOL and err_loss <= TOL, (err_logits, err_loss)
    assert torch.equal(_greedy(grown, ids), _greedy(m, ids))
    blk = grown.transformer.h[0]
    assert c.detail["weights_after"]["c_attn"] == [m2, 3 * m2] == list(blk.attn.c_attn.weight.shape)
    assert list(blk.attn.c_proj.weight.shape) == [m2, m2] and blk.attn.head_dim == m2 // n
    assert grown.lm_head.weight is grown.transformer.wte.weight
    assert grown.config.n_embd == m2 and grown.config.n_head == n
    assert grown.config.layer_norm_epsilon == pytest.approx(m.config.layer_norm_epsilon * c.detail["eps_scale"])
    grown.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(_out(back, ids)[0], _out(grown, ids)[0])


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("init", ["net2net", "zero"])
def test_heads_preserving(cfg, init, tmp_path):
    m = _model(*cfg)
    D, n = cfg[1], cfg[3]
    hd, n2 = D // n, n + 3
    ids = _ids(m)
    grown, rep = expand(m, Widen("transformer.h.*.attn", size=n2, init=init), generator=torch.Generator().manual_seed(2))
    assert rep.preserving and rep.preservation_error <= TOL
    assert [(c.path, c.base_path, c.kind, c.before, c.after) for c in rep.changes] == [
        (f"transformer.h.{i}.attn", f"transformer.h.{i}.attn", "GPT2Attention", [D, n], [D + 3 * hd, n2])
        for i in range(cfg[2])]
    m2 = D + 3 * hd
    assert rep.changes[0].weights == {"c_attn.weight": [[D, 3 * D], [m2, 3 * m2]], "c_attn.bias": [[3 * D], [3 * m2]],
                                      "c_proj.weight": [[D, D], [m2, m2]], "c_proj.bias": [[D], [m2]]}
    err_logits, err_loss = _errors(m, grown, ids)
    assert err_logits <= TOL and err_loss <= TOL, (err_logits, err_loss)
    assert torch.equal(_greedy(grown, ids), _greedy(m, ids))
    blk = grown.transformer.h[0]
    assert blk.attn.num_heads == n2 and blk.attn.head_dim == hd
    assert grown.config.n_head == n2 and grown.config.n_embd == m2
    grown.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert back.config.n_head == n2
    assert torch.equal(_out(back, ids)[0], _out(grown, ids)[0])
    assert torch.equal(_greedy(back, ids), _greedy(m, ids))


def test_heads_random_reported():
    m = _model(53, 16, 2, 2, 24, 0)
    grown, rep = expand(m, Widen("transformer.h.*.attn", factor=2, init="random"),
                        generator=torch.Generator().manual_seed(0))
    assert not rep.preserving and rep.preservation_error > 1e-4
    assert "not preserving" in rep.changes[0].note and grown.config.n_head == 4


def test_residual_width_untied_then_more():
    cfg = transformers.GPT2Config(vocab_size=41, n_positions=32, n_embd=12, n_layer=2, n_head=3, n_inner=20,
                                  tie_word_embeddings=False, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    m = transformers.GPT2LMHeadModel(cfg).eval()
    assert m.lm_head.weight is not m.transformer.wte.weight
    ids = _ids(m)
    grown, rep = expand(m, Widen("transformer.wte", factor=2), Widen("transformer.h.*.mlp", factor=2),
                        Deepen("transformer.h.1", init="zero"), generator=torch.Generator().manual_seed(0))
    assert rep.preserving and rep.preservation_error <= TOL
    err_logits, err_loss = _errors(m, grown, ids)
    assert err_logits <= TOL and err_loss <= TOL
    assert list(grown.lm_head.weight.shape) == [41, 24] and grown.lm_head.weight is not grown.transformer.wte.weight
    r, _ = expand(m, Widen("transformer.wte", factor=2, init="random"), generator=torch.Generator().manual_seed(0))
    assert r.config.n_embd == 24


def test_residual_width_random_reported():
    m = _model(53, 16, 2, 2, 24, 0)
    grown, rep = expand(m, Widen("transformer.wte", factor=2, init="random"), generator=torch.Generator().manual_seed(0))
    assert not rep.preserving and rep.preservation_error > 1e-3
    assert "not preserving" in rep.changes[0].note
    _greedy(grown, _ids(m))
