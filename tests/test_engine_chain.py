"""The engine's MLP path: an nn.Sequential of Linear layers and elementwise modules runs without
vmap, and must agree with the vmap path and with the loop engine."""

import pytest
import torch
from torch import nn

from manifold_ext import engine
from manifold_ext import params as P
from manifold_ext.data import load_digits

DIGITS = load_digits()


def _coeffs(B, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, K, generator=g) * 1.6 - 0.3


def _mixed_mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 19), nn.GELU(), nn.Dropout(0.5), nn.Linear(19, 13), nn.Tanh(),
                         nn.Linear(13, 11), nn.LeakyReLU(0.1), nn.Identity(), nn.Linear(11, 10))


def _image_mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.ReLU(), nn.Linear(64, 17), nn.ReLU(), nn.Linear(17, 10))


def _relu_mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 23), nn.ReLU(), nn.Linear(23, 10), nn.ReLU())


def _linear_head(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


CASES = {
    "mixed": (_mixed_mlp, False),
    "one_linear": (_linear_head, True),
    "flatten_first": (_image_mlp, True),
    "ends_in_activation": (_relu_mlp, False),
}


@pytest.fixture
def without_chain(monkeypatch):
    """Run the engine with its MLP path switched off (every model through vmap)."""
    def use():
        monkeypatch.setattr(engine, "_chain", lambda model, x: None)
    return use


def _data(image, n=53):
    x, y = DIGITS.x_test[:n], DIGITS.y_test[:n]
    return (x.reshape(-1, 1, 8, 8) if image else x), y


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("K", [1, 3])
def test_chain_equals_vmap_and_loop(case, K, without_chain):
    make, image = CASES[case]
    vertices = [make(s) for s in range(K)]
    coeffs = _coeffs(9, K)
    data = _data(image)
    assert engine._chain(vertices[0], data[0]) is not None
    chain = engine.evaluate(vertices[0], vertices, coeffs, data)
    chunked = engine.evaluate(vertices[0], vertices, coeffs, data, points_per_chunk=2, batch_size=16)
    loop = engine.evaluate(vertices[0], vertices, coeffs, data, engine="loop")
    without_chain()
    vmapped = engine.evaluate(vertices[0], vertices, coeffs, data)
    for other in (chunked, loop, vmapped):
        torch.testing.assert_close(chain.loss, other.loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(chain.accuracy, other.accuracy, rtol=0, atol=1e-9)


@pytest.mark.parametrize("outputs", [3, 1])
def test_chain_mse_equals_loop(outputs):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(31, 64, generator=g), torch.randn(31, outputs, generator=g)
    torch.manual_seed(0)
    vertices = [nn.Sequential(nn.Linear(64, 12), nn.SiLU(), nn.Linear(12, outputs)) for _ in range(2)]
    coeffs = _coeffs(5, 2)
    flat = y[:, 0] if outputs == 1 else y  # one output takes (N,) targets too
    chain = engine.evaluate(vertices[0], vertices, coeffs, (x, flat), loss="mse")
    loop = engine.evaluate(vertices[0], vertices, coeffs, (x, y), loss="mse", engine="loop")
    torch.testing.assert_close(chain.loss, loop.loss, rtol=1e-5, atol=1e-7)
    assert torch.isnan(chain.accuracy).all()


def test_chain_leaves_inputs_and_vertices_untouched():
    # The path applies ReLU in place to its own layer outputs only: never to the caller's data
    # (a ReLU before any Linear) nor to the vertices.
    vertices = [_image_mlp(s) for s in range(2)]
    before = [{n: t.clone() for n, t in P.state_of(v).items()} for v in vertices]
    x, y = _data(True)
    x = x - 0.5  # negative entries that an in-place ReLU would zero
    x_before = x.clone()
    engine.evaluate(vertices[0], vertices, _coeffs(4, 2), (x, y))
    assert torch.equal(x, x_before)
    for v, b in zip(vertices, before):
        for n, t in P.state_of(v).items():
            assert torch.equal(t, b[n])


class _Block(nn.Sequential):
    def forward(self, x):  # a subclass may compute anything: not a chain
        return super().forward(x) * 2


@pytest.mark.parametrize("name,model,x", [
    ("batchnorm", nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)), torch.randn(5, 4)),
    ("prelu", nn.Sequential(nn.Linear(4, 3), nn.PReLU(), nn.Linear(3, 2)), torch.randn(5, 4)),
    ("flatten_after_linear", nn.Sequential(nn.Linear(4, 3), nn.Flatten(), nn.Linear(3, 2)), torch.randn(5, 4)),
    ("no_linear", nn.Sequential(nn.Flatten(), nn.ReLU()), torch.randn(5, 4)),
    ("sequence_input", nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), torch.randn(5, 6, 4)),
    ("subclass", _Block(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), torch.randn(5, 4)),
    ("bare_linear", nn.Linear(4, 2), torch.randn(5, 4)),
])
def test_not_a_chain(name, model, x):
    assert engine._chain(model, x) is None


def test_hooks_send_the_model_through_vmap():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    x = torch.randn(5, 4)
    assert engine._chain(model, x) is not None
    handle = model[1].register_forward_hook(lambda m, i, o: o)
    assert engine._chain(model, x) is None
    handle.remove()
    handle = model.register_forward_pre_hook(lambda m, i: None)
    assert engine._chain(model, x) is None
    handle.remove()
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: o)
    try:
        assert engine._chain(model, x) is None
    finally:
        handle.remove()
    assert engine._chain(model, x) is not None


def test_chain_point_losses_equal_vmap_values_and_gradients(without_chain):
    vertices = [_mixed_mlp(s).double() for s in range(3)]
    x, y = _data(False, n=29)
    x = x.double()
    base = P.stack(vertices)

    def losses():
        stacked = {n: t.clone().requires_grad_() for n, t in base.items()}
        coeffs = _coeffs(4, 3).double().requires_grad_()
        out = engine.point_losses(vertices[0], stacked, coeffs, (x, y))
        out.sum().backward()
        return out.detach(), coeffs.grad, {n: t.grad for n, t in stacked.items()}

    chain = losses()
    without_chain()
    vmapped = losses()
    torch.testing.assert_close(chain[0], vmapped[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(chain[1], vmapped[1], rtol=1e-9, atol=1e-11)
    for n in base:
        torch.testing.assert_close(chain[2][n], vmapped[2][n], rtol=1e-9, atol=1e-11)
