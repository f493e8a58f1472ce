"""Every baseline metric against a case small enough to compute exactly (float64 models, explicit
loops, exact Hessians), plus chunking invariance, determinism, the model left untouched, the
registry and its JSON report, and the error messages."""

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from manifold_ext import baselines
from manifold_ext import params as P

from _untouched import assert_untouched, snapshot

F64 = torch.float64


def tanh_mlp(seed=0, widths=(5, 4, 3)):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(widths[0], widths[1]), nn.Tanh(), nn.Linear(widths[1], widths[2])).double()


def bn_mlp(seed=0):
    """With running statistics far from a fresh BatchNorm's, so eval and train mode differ."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)).double()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        m[1].running_mean.copy_(torch.randn(4, generator=g, dtype=F64))
        m[1].running_var.copy_(torch.rand(4, generator=g, dtype=F64) + 0.5)
        m[1].weight.copy_(torch.rand(4, generator=g, dtype=F64) + 0.5)
        m[1].bias.copy_(torch.randn(4, generator=g, dtype=F64) * 0.3)
    return m


def make_data(n=23, d=5, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=F64), torch.randint(0, classes, (n,), generator=g)


DATA = make_data()
MODELS = {"tanh": tanh_mlp, "bn": bn_mlp}


def ce(model, x, y):
    """The eval-mode mean cross-entropy, by plain module calls (the reference)."""
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        return F.cross_entropy(model(x), y).item()


def full_batch_grad(model, x, y):
    m = copy.deepcopy(model).eval()
    params = [p for p in m.parameters() if p.requires_grad]
    loss = F.cross_entropy(m(x), y)
    return loss.item(), params, torch.autograd.grad(loss, params)


def exact_hessian(model, x, y):
    """The full (P, P) Hessian of the eval-mode mean loss by torch.autograd.functional.hessian."""
    names = [n for n, p in model.named_parameters()]
    like = [p.detach() for p in model.parameters()]
    buffers = {n: b for n, b in model.named_buffers()}
    theta = torch.cat([t.reshape(-1) for t in like])
    model = copy.deepcopy(model).eval()

    def loss(flat):
        parts = flat.split([t.numel() for t in like])
        state = {n: p.reshape(t.shape) for n, p, t in zip(names, parts, like)}
        return F.cross_entropy(functional_call(model, (state, buffers), (x,)), y)

    return torch.autograd.functional.hessian(loss, theta)


# ----------------------------------------------------------------------------- exact cases


def test_parameter_count_counts_trainable_parameters_once():
    m = tanh_mlp()
    assert baselines.parameter_count(m) == 5 * 4 + 4 + 4 * 3 + 3 == 39
    m[0].weight.requires_grad_(False)
    assert baselines.parameter_count(m) == 19
    tied = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False))
    tied[1].weight = tied[0].weight
    assert baselines.parameter_count(tied) == 9
    assert baselines.parameter_count(bn_mlp()) == 39 + 8  # BatchNorm's weight and bias, not its buffers


@pytest.mark.parametrize("make", list(MODELS))
def test_loss_and_accuracy_match_cross_entropy_in_eval_mode(make):
    model = MODELS[make]().train()
    x, y = DATA
    loss, acc = baselines.loss_and_accuracy(model, DATA)
    ref = copy.deepcopy(model).eval()
    with torch.no_grad():
        logits = ref(x)
    assert loss == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-12)
    assert acc == pytest.approx((logits.argmax(1) == y).double().mean().item(), abs=0)
    assert model.training


@pytest.mark.parametrize("make", list(MODELS))
def test_gradient_norm_and_snip_match_autograd_on_the_full_batch(make):
    model = MODELS[make]()
    _, params, grads = full_batch_grad(model, *DATA)
    norm = torch.sqrt(sum(g.pow(2).sum() for g in grads)).item()
    saliency = sum((p * g).abs().sum() for p, g in zip(params, grads)).item()
    assert baselines.gradient_norm(model, DATA) == pytest.approx(norm, rel=1e-10)
    assert baselines.snip(model, DATA) == pytest.approx(saliency, rel=1e-10)
    assert norm > 0.05 and saliency > 0.05


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_synflow_is_depth_times_R_on_a_bias_free_linear_network(dtype):
    torch.manual_seed(1)
    widths = [5, 6, 7, 4, 3]
    net = nn.Sequential(*[nn.Linear(a, b, bias=False) for a, b in zip(widths[:-1], widths[1:])]).to(dtype)
    h = torch.ones(1, 5, dtype=F64)
    for layer in net:
        h = h @ layer.weight.detach().double().abs().T
    R = h.sum().item()
    assert baselines.synflow(net, input_shape=(5,)) == pytest.approx(len(net) * R, rel=1e-12)
    assert R > 1.0


@pytest.mark.parametrize("make", ["relu_bias", "bn"])
def test_synflow_matches_a_manual_autograd_computation(make):
    if make == "bn":
        model = bn_mlp().train()
    else:
        torch.manual_seed(2)
        model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    snap = snapshot(model)
    m = copy.deepcopy(model).double().eval()  # BatchNorm with its (absolute) running statistics
    with torch.no_grad():
        for t in m.state_dict().values():
            if t.is_floating_point():
                t.abs_()
    m(torch.ones(1, 5, dtype=F64)).sum().backward()
    expected = sum((p * p.grad).sum() for p in m.parameters()).item()
    assert baselines.synflow(model, input_shape=[5]) == pytest.approx(expected, rel=1e-12)
    assert_untouched(model, snap)


@pytest.mark.parametrize("make", list(MODELS))
def test_fisher_matches_a_loop_over_examples(make):
    model = MODELS[make]()
    x, y = DATA
    m = copy.deepcopy(model).eval()
    params = list(m.parameters())
    total = 0.0
    for i in range(len(x)):
        gs = torch.autograd.grad(F.cross_entropy(m(x[i:i + 1]), y[i:i + 1]), params)
        total += sum(g.pow(2).sum() for g in gs).item()
    assert baselines.fisher(model, DATA) == pytest.approx(total / len(x), rel=1e-10)
    assert baselines.fisher(model, DATA, batch_size=4) == pytest.approx(total / len(x), rel=1e-10)


def jacob_cov_reference(model, x, idx, k=1e-5):
    """np.corrcoef of per-example input gradients (one autograd.grad each), eigvalsh."""
    m = copy.deepcopy(model).eval()
    rows = []
    for i in idx.tolist():
        xi = x[i:i + 1].clone().requires_grad_()
        rows.append(torch.autograd.grad(m(xi).sum(), xi)[0].reshape(-1).numpy())
    sigma = np.linalg.eigvalsh(np.corrcoef(np.stack(rows)))
    return -np.sum(np.log(sigma + k) + 1 / (sigma + k))


JX = make_data(n=11, d=24, seed=3)  # more input dimensions than examples: C has full rank


@pytest.mark.parametrize("n,seed", [(7, 0), (7, 5), (11, 0), (50, 0)])
def test_jacob_cov_matches_an_explicit_computation(n, seed):
    model = tanh_mlp(4, widths=(24, 32, 3))
    x, _ = JX
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[: min(n, len(x))]
    expected = jacob_cov_reference(model, x, idx)
    assert baselines.jacob_cov(model, JX, n=n, seed=seed) == pytest.approx(expected, rel=1e-9)
    worst = -min(n, len(x)) * (math.log(1e-5) + 1e5)
    assert expected > worst / 10  # far from degenerate, so the comparison means something


class Gated(nn.Module):
    """Outputs zero (a zero Jacobian) wherever the first input feature is <= 0."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.lin = nn.Linear(24, 3).double()

    def forward(self, x):
        return self.lin(x) * (x[:, :1] > 0)


def test_jacob_cov_gives_degenerate_rows_a_zero_eigenvalue_not_nan():
    model = Gated()
    x, _ = JX
    idx = torch.arange(len(x))
    alive = idx[x[:, 0] > 0]
    dead = len(x) - len(alive)
    assert 2 <= len(alive) and dead >= 2
    k = 1e-5
    expected = jacob_cov_reference(model, x, alive) - dead * (math.log(k) + 1 / k)
    got = baselines.jacob_cov(model, JX, n=len(x))
    assert math.isfinite(got)
    assert got == pytest.approx(expected, rel=1e-9)
    zero = nn.Sequential(nn.Linear(24, 3)).double()
    nn.init.zeros_(zero[0].weight)
    assert baselines.jacob_cov(zero, JX, n=len(x)) == pytest.approx(-len(x) * (math.log(k) + 1 / k), rel=1e-12)


def test_hessian_trace_is_within_hutchinson_error_of_the_exact_trace():
    model = tanh_mlp(1)
    x, y = DATA
    H = exact_hessian(model, x, y)
    exact = H.trace().item()
    off = (H.pow(2).sum() - H.diagonal().pow(2).sum()).item()
    assert off > 1e-4  # the estimator has variance here; no luck involved in passing
    for probes in (256, 2048):
        se = math.sqrt(2 * off / probes)  # Var(v^T H v) = 2 sum_{i != j} H_ij^2 for Rademacher v
        est = baselines.hessian_trace(model, DATA, probes=probes, seed=0)
        assert est.samples == probes
        assert abs(est.value - exact) < 4 * se, (probes, est, exact, se)
        if probes == 2048:  # a bound sqrt(8) times tighter than at 256 probes; the reported error is right
            assert est.stderr == pytest.approx(se, rel=0.2)


class Quadratic(nn.Module):
    """Logits (p^T A p / 2, 0) for every example; with every target 1 the loss is
    softplus(p^T A p / 2), whose Hessian at p = 0 is exactly A / 2."""

    def __init__(self, A):
        super().__init__()
        self.register_buffer("A", A)
        self.p = nn.Parameter(torch.zeros(len(A), dtype=A.dtype))

    def forward(self, x):
        q = 0.5 * self.p @ self.A @ self.p
        return torch.stack([x.new_zeros(len(x)) + q, x.new_zeros(len(x))], 1)


def test_hessian_trace_is_exact_for_a_diagonal_hessian():
    A = torch.diag(torch.tensor([3.0, -1.0, 0.5, 2.0], dtype=F64))
    est = baselines.hessian_trace(Quadratic(A), (DATA[0], torch.ones(23, dtype=torch.long)), probes=5, seed=3)
    assert est.value == pytest.approx(A.trace().item() / 2, rel=1e-12)
    assert est.stderr == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("make", list(MODELS))
def test_hessian_top_eigenvalue_matches_eigvalsh(make):
    model = MODELS[make](2)
    H = exact_hessian(model, *DATA)
    evals = torch.linalg.eigvalsh(H)
    got = baselines.hessian_top_eigenvalue(model, DATA)
    assert got == pytest.approx(evals[-1].item(), rel=1e-3)
    assert baselines.hessian_top_eigenvalue(model, DATA, tol=1e-10) == pytest.approx(evals[-1].item(), rel=1e-8)


def test_hessian_top_eigenvalue_is_the_largest_algebraic_not_largest_magnitude():
    Q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=F64))
    A = Q @ torch.diag(torch.tensor([-8.0, 1.0, 0.6, -0.2], dtype=F64)) @ Q.T
    got = baselines.hessian_top_eigenvalue(Quadratic(A), (DATA[0], torch.ones(23, dtype=torch.long)))
    assert got == pytest.approx(0.5, rel=1e-6)  # eigenvalues of A / 2: -4, 0.5, 0.3, -0.1


def test_hessian_top_eigenvalue_warns_when_iters_run_out():
    model = tanh_mlp(2)
    with pytest.warns(RuntimeWarning, match=r"did not converge in iters=3"):
        baselines.hessian_top_eigenvalue(model, DATA, iters=3)


@pytest.mark.parametrize("make", list(MODELS))
@pytest.mark.parametrize("rho", [0.05, 0.5])
def test_sam_sharpness_matches_a_manual_ascent_step(make, rho):
    model = MODELS[make]()
    x, y = DATA
    loss, params, grads = full_batch_grad(model, x, y)
    norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
    m = copy.deepcopy(model).eval()
    with torch.no_grad():
        for (n, p), g in zip(m.named_parameters(), grads):
            p += rho * g / norm
    expected = ce(m, x, y) - loss
    got = baselines.sam_sharpness(model, DATA, rho=rho)
    assert got == pytest.approx(expected, rel=1e-10)
    assert got > 0


@pytest.mark.parametrize("make", list(MODELS))
@pytest.mark.parametrize("kind", ["filter", "gaussian"])
def test_perturbation_flatness_matches_loading_each_perturbed_state(make, kind):
    model = MODELS[make]().train()
    x, y = DATA
    sigma, n, seed = 0.1, 5, 7
    state = P.state_of(model)
    names = [k for k, p in model.named_parameters()]
    g = torch.Generator().manual_seed(seed)
    base = ce(model, x, y)
    diffs = []
    for _ in range(n):
        d = P.random_direction(state, names=names, kind=kind, generator=g)
        m = copy.deepcopy(model)
        m.load_state_dict({k: v + sigma * d[k] if v.is_floating_point() else v for k, v in state.items()})
        diffs.append(ce(m, x, y) - base)
    diffs = torch.tensor(diffs, dtype=F64)
    est = baselines.perturbation_flatness(model, DATA, sigma=sigma, n=n, seed=seed, kind=kind)
    assert est.value == pytest.approx(diffs.mean().item(), rel=1e-8, abs=1e-12)
    assert est.stderr == pytest.approx((diffs.std() / math.sqrt(n)).item(), rel=1e-6, abs=1e-12)
    assert float(est) == est.value and est.samples == n
    assert diffs.abs().max() > 1e-4
    assert model.training


# ----------------------------------------------------------------------------- properties

METRICS = {
    "loss": lambda m, d, **kw: baselines.loss_and_accuracy(m, d, **kw).loss,
    "accuracy": lambda m, d, **kw: baselines.loss_and_accuracy(m, d, **kw).accuracy,
    "grad_norm": baselines.gradient_norm,
    "snip": baselines.snip,
    "fisher": baselines.fisher,
    "jacob_cov": lambda m, d, **kw: baselines.jacob_cov(m, d, n=16, **kw),
    "hessian_trace": lambda m, d, **kw: baselines.hessian_trace(m, d, probes=8, **kw).value,
    "hessian_top_eig": lambda m, d, **kw: baselines.hessian_top_eigenvalue(m, d, **kw),
    "sam_sharpness": baselines.sam_sharpness,
    "perturbation_flatness": lambda m, d, **kw: baselines.perturbation_flatness(m, d, n=4, **kw).value,
}


@pytest.mark.parametrize("make", list(MODELS))
@pytest.mark.parametrize("name", list(METRICS))
def test_chunking_does_not_change_the_result(name, make):
    model = MODELS[make]()
    whole = METRICS[name](model, DATA)
    chunked = METRICS[name](model, DATA, batch_size=7)
    assert chunked == pytest.approx(whole, rel=1e-9, abs=1e-12)
    assert chunked != 0.0


RANDOM = {
    "jacob_cov": lambda m, seed: baselines.jacob_cov(m, DATA, n=10, seed=seed),
    "hessian_trace": lambda m, seed: baselines.hessian_trace(m, DATA, probes=4, seed=seed).value,
    "perturbation_flatness": lambda m, seed: baselines.perturbation_flatness(m, DATA, n=3, seed=seed).value,
    "hessian_top_eig": lambda m, seed: baselines.hessian_top_eigenvalue(m, DATA, iters=4, tol=1e-12, seed=seed),
}


@pytest.mark.filterwarnings("ignore:hessian_top_eigenvalue did not converge")
@pytest.mark.parametrize("name", list(RANDOM))
def test_seeded_metrics_are_deterministic_and_leave_the_global_rng_alone(name):
    model = tanh_mlp()
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    a, b, c = RANDOM[name](model, 0), RANDOM[name](model, 0), RANDOM[name](model, 1)
    assert torch.equal(torch.get_rng_state(), rng)
    assert a == b
    assert a != c  # (top eig: a stopped-early estimate, so the start vector shows)


ALL = dict(METRICS, parameters=lambda m, d, **kw: baselines.parameter_count(m),
           synflow=lambda m, d, **kw: baselines.synflow(m, input_shape=(5,)))


@pytest.mark.parametrize("name", list(ALL))
def test_every_metric_leaves_the_model_untouched(name):
    model = bn_mlp().train()
    model[1].eval()  # a mixed state, restored module by module
    model[0].weight.grad = torch.full_like(model[0].weight, 0.25)
    snap = snapshot(model)
    ALL[name](model, DATA)
    assert_untouched(model, snap)
    assert model.training and not model[1].training
    assert torch.equal(model[0].weight.grad, torch.full_like(model[0].weight, 0.25))
    assert model[3].weight.grad is None


def test_compute_baselines_reports_every_metric_and_round_trips_through_json(tmp_path):
    model = bn_mlp()
    report = baselines.compute_baselines(model, DATA, input_shape=(5,), seed=2, quiet=True)
    assert list(report.values) == list(baselines.BASELINES) == list(report.seconds)
    assert set(report.stderr) == {"hessian_trace", "perturbation_flatness"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in report.values.values())
    assert all(s >= 0 for s in report.seconds.values())
    assert report.values["parameters"] == 47
    assert report.values["loss"] == pytest.approx(ce(model, *DATA), rel=1e-12)
    assert report.values["hessian_trace"] == baselines.hessian_trace(model, DATA, seed=2).value
    assert report.values["perturbation_flatness"] == baselines.perturbation_flatness(model, DATA, seed=2).value
    assert report.values["synflow"] == baselines.synflow(model, input_shape=(5,))
    text = report.to_json(tmp_path / "r.json")
    assert json.loads(text)["type"] == "BaselineReport"
    assert baselines.BaselineReport.from_json(text) == report
    assert baselines.BaselineReport.from_json(tmp_path / "r.json") == report
    assert all(b.orientation in (1, -1) and b.description for b in baselines.BASELINES.values())


def test_compute_baselines_include_selects_in_registry_order():
    model = tanh_mlp()
    report = baselines.compute_baselines(model, DATA, include=["snip", "parameters", "accuracy"], quiet=True)
    assert list(report.values) == ["parameters", "accuracy", "snip"]
    assert report.values["snip"] == baselines.snip(model, DATA)
    assert list(baselines.compute_baselines(model, DATA, include="loss", quiet=True).values) == ["loss"]
    with pytest.raises(ValueError, match=r"include has unknown baseline names \['hessian'\]; valid names "
                                         r"are \['parameters', 'loss'.*'perturbation_flatness'\]"):
        baselines.compute_baselines(model, DATA, include=["snip", "hessian"])


def test_compute_baselines_names_the_failing_metric(monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("hessian_trace failed")

    monkeypatch.setattr(baselines, "hessian_trace", broken)
    with pytest.raises(ValueError, match="hessian_trace failed") as info:
        baselines.compute_baselines(tanh_mlp(), DATA, include=["loss", "hessian_trace"], quiet=True)
    assert "while computing baseline 'hessian_trace'" in info.value.__notes__


def test_jacob_cov_called_directly_on_tokens_says_why():
    model = nn.Sequential(nn.Embedding(7, 4), nn.Flatten(), nn.Linear(8, 3)).double()
    tokens = torch.randint(0, 7, (10, 2), generator=torch.Generator().manual_seed(0))
    data = (tokens, torch.randint(0, 3, (10,), generator=torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="jacob_cov needs floating-point inputs"):
        baselines.jacob_cov(model, data)


# ----------------------------------------------------------------------------- errors

M = tanh_mlp()
X, Y = DATA
ERRORS = {
    "empty": (lambda: baselines.loss_and_accuracy(M, (X[:0], Y[:0])),
              r"data is empty: expected at least one example, got inputs of shape \(0, 5\)"),
    "lengths": (lambda: baselines.gradient_norm(M, (X, Y[:-1])),
                r"inputs and targets disagree on the number of examples: 23 inputs and targets of shape \(22,\)"),
    "float_targets": (lambda: baselines.snip(M, (X, Y.double())),
                      r"loss=.cross_entropy. expects integer class indices as targets, got dtype torch.float64"),
    "not_a_pair": (lambda: baselines.fisher(M, X[:2]), r"expected data to be a pair \(inputs, targets\) of tensors, got a Tensor"),
    "batch_size": (lambda: baselines.fisher(M, DATA, batch_size=0),
                   r"batch_size must be None \(all at once\) or an integer >= 1, got 0"),
    "jacob_n": (lambda: baselines.jacob_cov(M, DATA, n=0), r"n must be an integer >= 1, got 0"),
    "probes": (lambda: baselines.hessian_trace(M, DATA, probes=0), r"probes must be an integer >= 1, got 0"),
    "iters": (lambda: baselines.hessian_top_eigenvalue(M, DATA, iters=0), r"iters must be an integer >= 1, got 0"),
    "tol": (lambda: baselines.hessian_top_eigenvalue(M, DATA, tol=0.0), r"tol must be a finite number > 0, got 0.0"),
    "rho": (lambda: baselines.sam_sharpness(M, DATA, rho=0), r"rho must be a finite number > 0, got 0"),
    "sigma": (lambda: baselines.perturbation_flatness(M, DATA, sigma=-0.1), r"sigma must be a finite number > 0, got -0.1"),
    "flatness_n": (lambda: baselines.perturbation_flatness(M, DATA, n=0), r"n must be an integer >= 1, got 0"),
    "kind": (lambda: baselines.perturbation_flatness(M, DATA, kind="layer"),
             r"kind must be 'filter' or 'gaussian', got 'layer'"),
    "input_shape": (lambda: baselines.synflow(M, input_shape=(5, 0)),
                    r"input_shape must be a sequence of positive integers .*got \(5, 0\)"),
    "report_empty": (lambda: baselines.compute_baselines(M, (X[:0], Y[:0])), r"data is empty: expected at least one example"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_input_is_a_value_error_naming_argument_expected_and_actual(case):
    call, match = ERRORS[case]
    with pytest.raises(ValueError, match=match):
        call()


def test_models_without_trainable_parameters_and_non_modules_are_rejected():
    frozen = tanh_mlp().requires_grad_(False)
    with pytest.raises(ValueError, match=r"at least one trainable parameter \(requires_grad\), got 0"):
        baselines.gradient_norm(frozen, DATA)
    with pytest.raises(TypeError, match=r"model must be an nn.Module, got dict"):
        baselines.parameter_count({})


def test_token_inputs_leave_input_based_metrics_nan():
    from manifold_ext.models import TinyTransformer
    torch.manual_seed(0)
    model = TinyTransformer(7, 3, 8, 2, 4)
    x = torch.randint(0, 7, (20, 3))
    y = torch.randint(0, 4, (20,))
    report = baselines.compute_baselines(model, (x, y), quiet=True)
    assert math.isnan(report.values["synflow"]) and math.isnan(report.values["jacob_cov"])
    assert all(math.isfinite(v) for k, v in report.values.items() if k not in ("synflow", "jacob_cov"))
