"""Custom scikit-learn transformers that trained models carry.

Kept free of Prefect/MLflow imports: a saved model needs this module importable where it is loaded
(serving, batch scoring), and skops must be told to trust it (see `skops_trusted_types`).
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, OneToOneFeatureMixin, TransformerMixin
from sklearn.utils.validation import check_is_fitted, validate_data


class QuantileClipper(OneToOneFeatureMixin, TransformerMixin, BaseEstimator):
    """Clip each numeric column to quantiles learned at fit time (outlier clipping).

    Args:
        lower: Lower quantile in [0, 0.5).
        upper: Upper quantile in (0.5, 1].
    """

    def __init__(self, lower: float = 0.005, upper: float = 0.995) -> None:
        self.lower = lower
        self.upper = upper

    def fit(self, X, y=None):
        """Learn the per-column clipping bounds, ignoring NaN."""
        if not 0 <= self.lower < self.upper <= 1:
            raise ValueError(f"need 0 <= lower < upper <= 1, got lower={self.lower}, upper={self.upper}")
        X = validate_data(self, X, ensure_all_finite="allow-nan", dtype=np.float64)
        self.lower_bounds_ = np.nanquantile(X, self.lower, axis=0)
        self.upper_bounds_ = np.nanquantile(X, self.upper, axis=0)
        return self

    def transform(self, X):
        """Clip values into the learned bounds; NaN stays NaN."""
        check_is_fitted(self)
        X = validate_data(self, X, ensure_all_finite="allow-nan", dtype=np.float64, reset=False)
        return np.clip(X, self.lower_bounds_, self.upper_bounds_)


# Modules whose types we trust inside our own pipelines (MLflow 3 saves sklearn models with skops,
# which refuses any type it is not told to trust).
# `mlops.transformers.` is where the clipper lived before the layout moved it to `core/`.
TRUSTED_MODULE_PREFIXES = ("sklearn.", "numpy.", "scipy.", "core.transformers.", "mlops.transformers.")
# The Dask engine's models: a local LightGBM model (its Booster keeps an OrderedDict).
TRUSTED_MODULE_PREFIXES += ("lightgbm.basic.Booster", "lightgbm.sklearn.", "collections.OrderedDict")


def skops_trusted_types(model: object) -> list[str]:
    """The types skops must trust to load `model`; raises if one comes from an unexpected module."""
    import skops.io

    types = skops.io.get_untrusted_types(data=skops.io.dumps(model))
    unexpected = [t for t in types if not t.startswith(TRUSTED_MODULE_PREFIXES)]
    if unexpected:
        raise TypeError(f"model contains types from untrusted modules: {unexpected}")
    return sorted(types)
