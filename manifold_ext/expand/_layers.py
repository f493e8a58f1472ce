"""Which layers the growth operators understand, and how specs select them by path."""

from __future__ import annotations

import fnmatch
import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

# Elementwise: a unit's output depends only on that unit, so copying a unit copies its output.
ACTIVATIONS = (
    nn.ReLU, nn.GELU, nn.Tanh, nn.Identity, nn.Sigmoid, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Softplus,
    nn.Mish, nn.ReLU6, nn.Hardtanh, nn.SELU, nn.CELU, nn.Hardswish, nn.Hardsigmoid, nn.Softsign,
    nn.Tanhshrink, nn.LogSigmoid,
)
# Identities in eval mode: they let a LayerNorm see the Linear's output unchanged.
PASSTHROUGH = (nn.Dropout, nn.Identity)
PER_FEATURE = ACTIVATIONS + (nn.Dropout, nn.BatchNorm1d, nn.LayerNorm)
# Channel by channel on (N, C, H, W) maps: a copied channel's map equals its source's (eval mode).
PER_CHANNEL = ACTIVATIONS + (
    nn.Dropout, nn.Dropout2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
)
SUPPORTED = (
    "nn.Linear, nn.BatchNorm1d, nn.LayerNorm, nn.Dropout and elementwise activations; "
    "nn.Conv2d (groups=1), nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d, nn.Dropout2d and nn.Flatten before a Linear"
)

Children = List[Tuple[str, nn.Module]]


def children(model: nn.Module) -> Children:
    """The (name, module) children of an nn.Sequential; TypeError for any other container."""
    if not isinstance(model, nn.Sequential):
        raise TypeError(
            f"expand: model must be an nn.Sequential (of {SUPPORTED}), got {type(model).__name__}"
        )
    return list(model._modules.items())


def kind(m: nn.Module) -> str:
    """The module's class name, as messages and reports show it."""
    return type(m).__name__


def unsupported(path: str, m: nn.Module, why: str) -> TypeError:
    """The TypeError for a module the operators cannot carry along (``why`` says where it stands)."""
    return TypeError(f"module {path!r} ({kind(m)}) is not supported {why}; supported: {SUPPORTED}")


def select(kids: Children, pattern: str, arg: str) -> List[int]:
    """Indices of the children whose name equals ``pattern`` or matches it as a glob."""
    names = [n for n, _ in kids]
    if pattern in names:
        return [names.index(pattern)]
    hits = [i for i, n in enumerate(names) if fnmatch.fnmatchcase(n, pattern)]
    if not hits:
        raise ValueError(f"{arg}={pattern!r} matches no module; the model's paths are {names}")
    return hits


def exact_or_glob(items: list, pattern: str, key=lambda item: item) -> list:
    """The items whose ``key`` equals ``pattern``, else those whose ``key`` matches it as a glob."""
    return [c for c in items if key(c) == pattern] or [c for c in items if fnmatch.fnmatchcase(key(c), pattern)]


def select_widen_targets(model: nn.Module, spec, cands: List[Tuple[str, str]], what: str) -> List[Tuple[str, str]]:
    """The ``(path, kind)`` candidates ``spec.target`` names (exactly, else as a glob). None: a
    TypeError when the target is some other module, else a ValueError; both list the candidates
    (``what`` describes them)."""
    hits = exact_or_glob(cands, spec.target, key=lambda c: c[0])
    if hits:
        return hits
    paths = [p for p, _ in cands]
    mods = dict(model.named_modules())
    if spec.target in mods:
        raise TypeError(
            f"Widen.target={spec.target!r}: module {spec.target!r} ({kind(mods[spec.target])}) cannot be widened on "
            f"{type(model).__name__}; widenable: {what}: {paths}"
        )
    raise ValueError(f"Widen.target={spec.target!r} matches no widenable module of {type(model).__name__}; "
                     f"widenable: {what}: {paths}")


def match_insertion_points(model: nn.Module, after: str, paths: List[str], *, not_one: str,
                           listing: str) -> List[str]:
    """The paths among ``paths`` (the places a Deepen may insert after) that ``after`` names,
    exactly or as a glob. None: a TypeError when ``after`` is some other module (``not_one``
    says what it is not), else a ValueError; both list ``paths`` (``listing`` introduces them)."""
    hits = exact_or_glob(paths, after)
    if hits:
        return hits
    mods = dict(model.named_modules())
    if after in mods:
        raise TypeError(f"Deepen.after={after!r}: module {after!r} ({kind(mods[after])}) is not "
                        f"{not_one}: {paths}")
    raise ValueError(f"Deepen.after={after!r} matches no {listing} {paths}")


def is_pattern(s: str) -> bool:
    """Whether ``s`` holds glob characters."""
    return any(c in s for c in "*?[")


def next_linear(kids: Children, i: int) -> Optional[int]:
    """Index of the first Linear after child i, or None."""
    for j in range(i + 1, len(kids)):
        if isinstance(kids[j][1], nn.Linear):
            return j
    return None


def next_consumer(kids: Children, i: int) -> Optional[int]:
    """Index of the first Conv2d or Linear after child i (what reads a Conv2d's channels), or None."""
    for j in range(i + 1, len(kids)):
        if isinstance(kids[j][1], (nn.Conv2d, nn.Linear)):
            return j
    return None


def check_conv(path: str, m: nn.Conv2d, role: str) -> None:
    """TypeError unless the convolution has groups=1 (``role`` names its part in the growth)."""
    # Grouped convolutions tie channels together in blocks: copying one channel is not enough.
    if m.groups != 1:
        raise TypeError(
            f"module {path!r} (Conv2d, groups={m.groups}) is not supported as {role}: only groups=1 convolutions "
            "can be widened"
        )


def check_per_channel(kids: Children, lo: int, hi: int, width: int, why: str) -> int:
    """Children lo..hi-1 must act channel by channel on ``width`` channels and child ``hi`` (the
    consumer) must read them: a Conv2d, or a Linear after one nn.Flatten. Returns the consumer's
    inputs per channel: 1 for a Conv2d, ``H*W = in_features / width`` for a Linear."""
    path_b, b = kids[hi]
    flat = None
    for path, m in kids[lo:hi]:
        if isinstance(m, nn.Flatten):
            if flat is not None or not isinstance(b, nn.Linear) or m.start_dim != 1 or m.end_dim != -1:
                raise TypeError(
                    f"module {path!r} (Flatten, start_dim={m.start_dim}, end_dim={m.end_dim}) is not supported {why}: "
                    "expected one nn.Flatten(start_dim=1, end_dim=-1) followed by an nn.Linear"
                )
            flat = path
            continue
        # After the Flatten a channel is H*W features: only elementwise modules keep them apart simply.
        allowed = PER_CHANNEL if flat is None else ACTIVATIONS + PASSTHROUGH
        if not isinstance(m, allowed):
            raise unsupported(path, m, why)
        if isinstance(m, nn.BatchNorm2d) and m.num_features != width:
            raise ValueError(f"module {path!r} (BatchNorm2d) has num_features={m.num_features}, expected {width}")
    if isinstance(b, nn.Linear):
        if flat is None:
            raise TypeError(
                f"module {path_b!r} (Linear) reads Conv2d channels without an nn.Flatten before it; "
                f"supported: {SUPPORTED}"
            )
        if b.in_features % width:
            raise ValueError(
                f"module {path_b!r} (Linear) has in_features={b.in_features}, not a multiple of the {width} channels "
                "being widened (each channel must map to H*W consecutive features)"
            )
        return b.in_features // width
    check_conv(path_b, b, "the consumer of widened channels")
    if b.in_channels != width:
        raise ValueError(f"module {path_b!r} (Conv2d) has in_channels={b.in_channels}, expected {width}")
    return 1


def check_per_feature(kids: Children, lo: int, hi: int, width: int, why: str) -> None:
    """Children lo..hi-1 must act feature by feature on ``width`` features, else TypeError/ValueError."""
    for path, m in kids[lo:hi]:
        if not isinstance(m, PER_FEATURE):
            raise unsupported(path, m, why)
        if isinstance(m, nn.BatchNorm1d) and m.num_features != width:
            raise ValueError(f"module {path!r} (BatchNorm1d) has num_features={m.num_features}, expected {width}")
        if isinstance(m, nn.LayerNorm) and tuple(m.normalized_shape) != (width,):
            raise ValueError(
                f"module {path!r} (LayerNorm) has normalized_shape={tuple(m.normalized_shape)}, expected ({width},)"
            )


def uniform(shape, bound: float, like: Tensor, generator) -> Tensor:
    """U(-bound, bound) drawn on the CPU (so one CPU generator serves models on any device)."""
    u = torch.rand(shape, generator=generator, dtype=torch.float64)
    return ((2 * u - 1) * bound).to(device=like.device, dtype=like.dtype)


def gaussian(shape, std: float, like: Tensor, generator) -> Tensor:
    """N(0, std^2) drawn on the CPU (so one CPU generator serves models on any device)."""
    g = torch.randn(shape, generator=generator, dtype=torch.float64) * std
    return g.to(device=like.device, dtype=like.dtype)


def fresh_bound(fan_in: int) -> float:
    """The bound of a fresh nn.Linear's (or nn.Conv2d's) uniform init for this fan-in."""
    # nn.Linear.reset_parameters: kaiming_uniform(a=sqrt(5)) and the bias both reduce to 1/sqrt(fan_in).
    return 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0


def new_linear(like: nn.Linear, w: Tensor, b: Optional[Tensor]) -> nn.Linear:
    """A new nn.Linear holding ``w`` and ``b``, in ``like``'s train/eval mode."""
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        if b is not None:
            lin.bias.copy_(b)
    lin.train(like.training)
    return lin


def replace_param(mod: nn.Module, name: str, value: Optional[Tensor]) -> None:
    """Swap a parameter or buffer for a resized one, keeping the module object (and so its hooks,
    its identity for the report, and the parameter's requires_grad)."""
    old = getattr(mod, name)
    if old is None or value is None:
        return
    if isinstance(old, nn.Parameter):
        setattr(mod, name, nn.Parameter(value.detach().clone(), requires_grad=old.requires_grad))
    else:
        mod.register_buffer(name, value.detach().clone())


def resize_linear(lin: nn.Linear, w: Tensor, b: Optional[Tensor]) -> None:
    """Give ``lin`` the weight ``w`` and bias ``b`` (the module object is kept) and their shape."""
    replace_param(lin, "weight", w)
    replace_param(lin, "bias", b)
    lin.out_features, lin.in_features = w.shape


def resize_conv(conv: nn.Conv2d, w: Tensor, b: Optional[Tensor]) -> None:
    """Give ``conv`` the weight ``w`` and bias ``b`` (the module object is kept) and their channels."""
    replace_param(conv, "weight", w)
    replace_param(conv, "bias", b)
    conv.out_channels, conv.in_channels = w.shape[:2]


def n_params(model: nn.Module) -> int:
    """The number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


def fixed_seed_tokens(vocab: int, length: int, device) -> Tensor:
    """64 random token sequences of ``length`` ids below ``vocab``, drawn from seed 0 (the
    caller's RNG is untouched), on ``device``."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (64, length), generator=g).to(device)


def fixed_seed_normal(shape, like: Tensor) -> Tensor:
    """Standard-normal inputs of ``shape``, drawn from seed 0 (the caller's RNG is untouched),
    on ``like``'s device and dtype."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(*shape, generator=g).to(device=like.device, dtype=like.dtype)
