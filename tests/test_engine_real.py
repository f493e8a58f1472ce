"""The engine on the networks people grow: Hugging Face GPT-2 and LLaMA (tied parameters,
non-persistent buffers, ModelOutput results, integer tokens, Conv1D, RMSNorm, grouped-query
attention) and torchvision's ResNet-18, built from configs with random weights."""

import pytest
import torch
import torch.nn.functional as F

from manifold_ext import engine, params as P, probes

pytest.importorskip("transformers", reason="needs the 'models' extra: pip install 'manifold_ext[models]'")
pytest.importorskip("torchvision", reason="needs the 'models' extra: pip install 'manifold_ext[models]'")

from manifold_ext import real_models as R  # noqa: E402

LINE = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.25, 0.75], [-0.5, 1.5]])
MODELS = ["gpt2", "llama", "llama_tied", "resnet18"]


def _make(name, seed):
    if name == "gpt2":
        return R.gpt2(seed=seed)
    if name == "llama":
        return R.llama(seed=seed)
    if name == "llama_tied":
        return R.llama(tie=True, seed=seed)
    return R.resnet18(seed=seed)


def _data(name):
    g = torch.Generator().manual_seed(0)
    if name == "resnet18":
        return (torch.randn(6, 3, 32, 32, generator=g), torch.randint(0, 10, (6,), generator=g)), "cross_entropy"
    ids = torch.randint(0, 101, (4, 12), generator=g)
    return (ids, ids), "lm"


def _direct(model, data, loss):
    """The model's own loss, computed the way its library does."""
    with torch.no_grad():
        if loss == "lm":
            return model(data[0], labels=data[1]).loss.item()
        return F.cross_entropy(model(data[0]), data[1]).item()


def _vertices(a, b, form):
    return [a, b] if form == "module" else [a.state_dict(), b.state_dict()]


@pytest.mark.parametrize("form", ["module", "state_dict"])
@pytest.mark.parametrize("name", MODELS)
def test_both_engines_give_the_direct_loss_at_the_vertices_and_agree_on_a_line(name, form):
    a, b = _make(name, 0), _make(name, 1)
    data, loss = _data(name)
    verts = _vertices(a, b, form)
    # bn="interpolate" at a vertex is the vertex's own eval-mode forward.
    fused = engine.evaluate(a, verts, LINE, data, loss=loss, engine="fused", bn="interpolate")
    loop = engine.evaluate(a, verts, LINE, data, loss=loss, engine="loop", bn="interpolate")
    direct = torch.tensor([_direct(a, data, loss), _direct(b, data, loss)], dtype=torch.float64)
    torch.testing.assert_close(fused.loss[:2], direct, rtol=1e-4, atol=0)
    torch.testing.assert_close(loop.loss[:2], direct, rtol=1e-4, atol=0)
    torch.testing.assert_close(fused.loss, loop.loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(fused.accuracy, loop.accuracy)
    assert (fused.engine, loop.engine) == ("fused", "loop")
    # The interior of the line differs from its ends: the test sees interpolation at all.
    assert (fused.loss[2:4] - fused.loss[:2].mean()).abs().max() > 1e-3


def test_resnet_recomputed_batchnorm_agrees_between_engines():
    a, b = _make("resnet18", 0), _make("resnet18", 1)
    data, loss = _data("resnet18")
    fused = engine.evaluate(a, [a, b], LINE, data, engine="fused")
    loop = engine.evaluate(a, [a, b], LINE, data, engine="loop")
    torch.testing.assert_close(fused.loss, loop.loss, rtol=1e-5, atol=0)


@pytest.mark.parametrize("name", ["gpt2", "llama_tied"])
def test_a_tie_is_one_parameter_under_any_name(name):
    a, b = _make(name, 0), _make(name, 1)
    data, _ = _data(name)
    lay = P.layout(a)
    alias, canonical = next(iter(lay.aliases.items()))
    assert alias.endswith("lm_head.weight")
    ref = engine.evaluate(a, [a, b], LINE, data, loss="lm", engine="fused").loss
    # A state dict whose tied tensors were copied apart (no longer one storage), and one that
    # holds the tie only under the head's name: both are the same vertex.
    copied = [{k: v.clone() for k, v in m.state_dict().items()} for m in (a, b)]
    head_only = [{k: v for k, v in sd.items() if k != canonical} for sd in copied]
    for verts in (copied, head_only):
        for eng in ("fused", "loop"):
            got = engine.evaluate(a, verts, LINE, data, loss="lm", engine=eng).loss
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=0)


def test_non_persistent_buffers_come_from_the_model():
    a, b = _make("llama", 0), _make("llama", 1)
    sd = a.state_dict()
    assert "model.rotary_emb.inv_freq" in dict(a.named_buffers()) and "model.rotary_emb.inv_freq" not in sd
    assert "model.rotary_emb.inv_freq" in P.layout(a).non_persistent
    data, _ = _data("llama")
    ev = engine.evaluate(a, [sd, b.state_dict()], LINE[:2], data, loss="lm", engine="fused")
    torch.testing.assert_close(ev.loss[0].float(), torch.tensor(_direct(a, data, "lm")), rtol=1e-4, atol=0)


def test_lm_attention_mask_and_ignore_index_match_the_library():
    a, b = _make("gpt2", 0), _make("gpt2", 1)
    ids = torch.randint(0, 101, (4, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    mask[3, 5:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        want = a(ids, attention_mask=mask, labels=labels).loss.item()
    for eng in ("fused", "loop"):
        masked = engine.evaluate(a, [a, b], LINE[:2], (ids, ids, mask), loss="lm", engine=eng)
        ignored = engine.evaluate(a, [a, b], LINE[:2], (ids, labels), loss="lm", engine=eng)
        assert masked.loss[0].item() == pytest.approx(want, rel=1e-5)
        # Right padding under a causal model: ignoring the labels alone gives the same loss.
        assert ignored.loss[0].item() == pytest.approx(want, rel=1e-5)
    other = engine.evaluate(a, [a, b], LINE[:2], (ids, ids.masked_fill(mask == 0, 7)), loss="lm",
                            ignore_index=7, engine="fused")
    assert other.loss[0].item() == pytest.approx(want, rel=1e-5) or (ids == 7).any()


@pytest.mark.parametrize("data,msg", [
    ((torch.zeros(2, 5), torch.zeros(2, 5)), r"loss='lm' expects integer input_ids and labels of one shape \(N, T\)"),
    ((torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long)), r"labels \(2, 4\)"),
    ((torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long)), r"at least 2 tokens, got T = 1"),
    ((torch.zeros(2, 5, dtype=torch.long), torch.full((2, 5), -100)), r"every next-token target is ignored"),
    ((torch.zeros(2, 5, dtype=torch.long),) * 2 + (torch.ones(2, 4),), r"attention_mask must have the shape of input_ids \(2, 5\), got \(2, 4\)"),
    ((torch.zeros(2, 5, dtype=torch.long),), r"expected data to be a pair \(input_ids, labels\) or a triple"),
])
def test_lm_data_errors(data, msg):
    a = _make("gpt2", 0)
    with pytest.raises(ValueError, match=msg):
        engine.evaluate(a, [a], torch.ones(1, 1), data, loss="lm")


def test_lm_head_is_never_materialised_per_point():
    a = _make("gpt2", 0)
    fused = engine._Fused(a, P.stack([a, a], model=a), "lm", lay=P.layout(a))
    assert fused.head == "lm_head"
    # The tied table serves the embedding lookup and the fused head: no point holds a copy.
    assert "transformer.wte.weight" in fused.linear_names
    assert not any(n.endswith("c_attn.weight") for n in fused.materialise(torch.ones(3, 2)))


def test_head_argument_errors():
    a = _make("gpt2", 0)
    data, _ = _data("gpt2")
    with pytest.raises(ValueError, match=r"head 'nope' is not a module of GPT2LMHeadModel"):
        engine.evaluate(a, [a], torch.ones(1, 1), data, loss="lm", head="nope")
    with pytest.raises(ValueError, match=r"head 'transformer.ln_f' must be an nn.Linear, got LayerNorm"):
        engine.evaluate(a, [a], torch.ones(1, 1), data, loss="lm", head="transformer.ln_f")


def test_point_losses_gradient_on_gpt2_matches_a_direct_reference():
    a, b = _make("gpt2", 0).double(), _make("gpt2", 1).double()
    data, _ = _data("gpt2")
    stacked = P.stack([a, b], model=a)
    coeffs = torch.tensor([[0.3, 0.7], [0.6, 0.4]], dtype=torch.float64, requires_grad=True)
    got = engine.point_losses(a, stacked, coeffs, data, loss="lm")
    (g_got,) = torch.autograd.grad(got.sum(), coeffs)
    c2 = coeffs.detach().clone().requires_grad_(True)
    want = []
    for i in range(2):
        point = {n: torch.tensordot(c2[i], t, dims=1) for n, t in stacked.items()}
        logits = torch.func.functional_call(a, point, (data[0],)).logits  # float64 throughout
        want.append(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), data[1][:, 1:].reshape(-1)))
    want = torch.stack(want)
    (g_want,) = torch.autograd.grad(want.sum(), c2)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=0)
    torch.testing.assert_close(g_got, g_want, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_linear_path_probe_on_modules(name):
    a, b = _make(name, 0), _make(name, 1)
    data, loss = _data(name)
    path = probes.linear_path(a, b, data, steps=3, loss=loss)
    assert path.loss[0] == pytest.approx(_direct(a, data, loss), rel=1e-4)
    assert path.loss[-1] == pytest.approx(_direct(b, data, loss), rel=1e-4)


def test_auto_engine_names_the_engine_it_chose():
    a, b = _make("llama", 0), _make("llama", 1)
    data, _ = _data("llama")
    ev = engine.evaluate(a, [a, b], LINE, data, loss="lm")
    loop = engine.evaluate(a, [a, b], LINE, data, loss="lm", engine="loop")
    assert ev.engine in ("fused", "loop")
    torch.testing.assert_close(ev.loss, loop.loss, rtol=1e-5, atol=0)


def test_estimators_run_on_a_language_model():
    from manifold_ext import manifold as M

    a = _make("gpt2", 0)
    data, _ = _data("gpt2")
    tau = engine.evaluate(a, [a], torch.ones(1, 1), data, loss="lm").loss.item() * 1.5
    radius = M.radius(a, data, tau=tau, loss="lm", directions=2, grid=(1e-2, 10.0, 6), bisect=3, quiet=True)
    minima = M.minima(a, data, tau=tau, loss="lm", m=2, samples=8, quiet=True)
    assert -5 < radius.size < 5 and radius.n_evaluations > 0
    assert minima.size == minima.size  # finite or -inf, never NaN
    assert minima.n_evaluations > 0 and minima.anchor_loss == pytest.approx(tau / 1.5, rel=1e-5)


def test_baselines_on_a_language_model_and_a_resnet():
    from manifold_ext import baselines

    a = _make("gpt2", 0)
    data, _ = _data("gpt2")
    rep = baselines.compute_baselines(a, data, loss="lm", include=["loss", "accuracy", "grad_norm", "parameters"],
                               quiet=True)
    assert rep.values["loss"] == pytest.approx(_direct(a, data, "lm"), rel=1e-5)
    assert rep.values["parameters"] == sum(p.numel() for p in a.parameters())  # the tie counted once
    assert rep.values["grad_norm"] > 0
    with pytest.raises(ValueError, match=r"the baselines take no ignored labels"):
        baselines.compute_baselines(a, (data[0], data[1].masked_fill(data[1] > 50, -100)), loss="lm", quiet=True)
    with pytest.raises(ValueError, match=r"loss must be 'cross_entropy' or 'lm' for the baselines, got 'mse'"):
        baselines.compute_baselines(a, data, loss="mse", quiet=True)
    r = _make("resnet18", 0)
    data, _ = _data("resnet18")
    rep = baselines.compute_baselines(r, data, include=["loss", "snip"], quiet=True)
    assert rep.values["loss"] == pytest.approx(_direct(r, data, "cross_entropy"), rel=1e-5)
    assert rep.values["snip"] > 0


class _ScaledLM(torch.nn.Module):
    """A language model that scales its head's output: the head is not the logits."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(11, 8)
        self.head = torch.nn.Linear(8, 11)

    def forward(self, ids):
        return 0.5 * self.head(self.emb(ids))


def test_a_head_whose_output_is_changed_is_refused_by_the_fused_loss():
    m = _ScaledLM()
    ids = torch.randint(0, 11, (3, 6))
    with pytest.raises(ValueError, match=r"the model's logits are not the output of its head 'head' "
                                         r"\(called 1 times, or changed after it\): pass head="):
        engine.evaluate(m, [m], torch.ones(1, 1), (ids, ids), loss="lm", engine="fused")
    loop = engine.evaluate(m, [m], torch.ones(1, 1), (ids, ids), loss="lm", engine="loop")
    with pytest.warns(RuntimeWarning, match=r"engine='auto': the model's logits are not the output of its head"):
        auto = engine.evaluate(m, [m], torch.ones(1, 1), (ids, ids), loss="lm")
    assert auto.engine == "loop" and auto.loss.item() == loop.loss.item()
    with torch.no_grad():
        out = m(ids)
    want = F.cross_entropy(out[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1)).item()
    assert loop.loss.item() == pytest.approx(want, rel=1e-6)
