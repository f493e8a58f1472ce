"""What a growth step claims: whether it preserves the function (``exact``), and a note saying why."""

from __future__ import annotations

from typing import Tuple

Claim = Tuple[bool, str]


def with_noise(exact: bool, note: str, noise: float) -> Claim:
    """The claim once N(0, noise^2) was added to the new weights: not preserving when ``noise``."""
    if noise:
        return False, note + f"; noise std {noise}: not preserving"
    return exact, note


def width_claim(init: str, noise: float, random_note: str, net2net_note: str, zero_note: str,
                grew: bool = True) -> Claim:
    """The claim for new units: fresh outgoing weights (random, when it ``grew``) do not preserve
    the function; copies split among themselves (net2net) and zero outgoing weights do; noise on
    the new units does not."""
    if init == "random" and grew:
        exact, note = False, random_note
    elif init == "net2net":
        exact, note = True, net2net_note
    else:
        exact, note = True, zero_note
    return with_noise(exact, note, noise if grew else 0.0)


def deepen_claim(init: str, noise: float, zero_note: str, unit: str = "block") -> Claim:
    """The claim for a new residual block: ``zero_note`` (exact: both branches add 0) for a zero
    block, otherwise not preserving; noise makes even a zero block not preserving."""
    if init == "zero":
        exact, note = True, zero_note
    else:
        exact, note = False, f"{init} {unit}: not preserving"
    if noise:
        return False, note.replace(": exact", "") + f"; noise std {noise}: not preserving"
    return exact, note


def stage_claim(init: str, noise: float, channels: str, copied: str = "copied") -> Claim:
    """The claim for a widened stage of residual ``channels`` (``copied`` says how net2net copies them)."""
    if init == "random":
        return False, f"random new {channels}: not preserving"
    if init == "net2net":
        return with_noise(True, f"net2net: {channels} {copied} (BatchNorm2d copied, consumers divided by the copy "
                                "count): exact", noise)
    note = f"zero: new {channels} are 0 after every BatchNorm (gamma = beta = 0), zero consumer columns: exact"
    if noise:
        # The new channels stay multiplied by gamma = 0, so noise on their kernels keeps them 0.
        note += f"; noise std {noise} on new kernels and consumer columns (channels stay 0): exact"
    return True, note
