"""What a model returns, reduced to its logits.

Models return a tensor (the zoo, torchvision), a Hugging Face ``ModelOutput`` (``.logits``), or a
tuple whose first element is the logits (Hugging Face with ``return_dict=False``). Every place
that reads a model's output goes through :func:`logits`, so all of them accept the same models.
"""

from __future__ import annotations

from torch import Tensor


def logits(output) -> Tensor:
    """The logits in a model's output: the tensor itself, ``output.logits`` (a Hugging Face
    ``ModelOutput``), or the first element of a tuple or list.

    Raises:
        TypeError: naming the output's type, when none of these holds a tensor.
    """
    if isinstance(output, Tensor):
        return output
    found = getattr(output, "logits", None)
    if isinstance(found, Tensor):
        return found
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"expected the model to return logits: a tensor, an object with a .logits "
                    f"tensor (a Hugging Face ModelOutput) or a tuple starting with one, got "
                    f"{type(output).__name__}")


def mean_loss(output, y: Tensor, loss: str = "cross_entropy", ignore_index: int = -100) -> Tensor:
    """The differentiable mean training loss of a model's output against targets ``y``, as the
    engine defines each ``loss``: ``"cross_entropy"`` (class indices), ``"mse"`` (mean over all
    elements) or ``"lm"`` (position t predicts ``y[:, t + 1]``; targets equal to
    ``ignore_index`` do not count)."""
    import torch.nn.functional as F

    out = logits(output)
    if loss == "mse":
        return F.mse_loss(out.reshape(len(y), -1), y.reshape(len(y), -1).to(out.dtype))
    if loss == "lm":
        out, y = out[:, :-1], y[:, 1:]
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), ignore_index=ignore_index)
