"""The check that an expansion left its base model exactly as it was."""

import torch


def snapshot(model):
    """The model's state (cloned) and every module's train/eval mode."""
    return {k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()]


def assert_untouched(model, snap):
    """Same keys, shapes, values and modes as when ``snapshot`` was taken."""
    state, modes = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert now[k].shape == v.shape and torch.equal(now[k], v), k
    assert [m.training for m in model.modules()] == modes
