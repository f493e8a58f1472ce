"""Built-in datasets (no downloads): the data the demo, tests and benchmarks run on."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class Digits:
    """A train/test split of scikit-learn's 8x8 digits: 64 standardised features, 10 classes.

    ``x_*`` are ``(N, 64)`` floating tensors, ``y_*`` ``(N,)`` int64 class indices in ``[0, 10)``.
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    @property
    def num_features(self) -> int:
        """Input dimension (64)."""
        return self.x_train.shape[1]

    @property
    def num_classes(self) -> int:
        """Number of classes (10)."""
        return 10


def load_digits(
    *, test_fraction: float = 0.4, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Digits:
    """Load scikit-learn's digits (1797 images, shipped with scikit-learn) as a shuffled split.

    Args:
        test_fraction: share of the 1797 examples held out for testing, in (0, 1); the test split
            gets ``ceil(test_fraction * 1797)`` examples (as ``sklearn.model_selection`` does), so
            the default 0.4 gives 1078 training and 719 test examples.
        seed: seeds the shuffle; the same seed always gives the same split.
        dtype: floating dtype of the features.

    Returns:
        A :class:`Digits` whose features are standardised with the training split's per-feature
        mean and standard deviation (applied to both splits, so no test statistics leak in).
        Pixels that are constant in the training split are only centred.

    Raises:
        ValueError: if ``test_fraction`` leaves either split empty.
    """
    from sklearn.datasets import load_digits as _sk_load_digits  # heavy import, only when used

    x, y = _sk_load_digits(return_X_y=True)
    n = len(y)
    if not isinstance(test_fraction, (int, float)) or not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be a number in (0, 1), got {test_fraction!r}")
    n_test = math.ceil(test_fraction * n)
    if n_test >= n:
        raise ValueError(
            f"test_fraction={test_fraction!r} leaves no training examples (of {n}); use a smaller value"
        )
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")

    perm = np.random.default_rng(seed).permutation(n)
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    x = torch.as_tensor(x, dtype=torch.float64)  # statistics in float64, then cast
    y = torch.as_tensor(y, dtype=torch.int64)
    x_train, x_test = x[train_idx], x[test_idx]
    mean = x_train.mean(0)
    std = x_train.std(0)
    std = torch.where(std > 0, std, torch.ones_like(std))  # border pixels are always 0
    return Digits(
        x_train=((x_train - mean) / std).to(dtype),
        y_train=y[train_idx],
        x_test=((x_test - mean) / std).to(dtype),
        y_test=y[test_idx],
    )
