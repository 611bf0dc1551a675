"""Drift statistics: PSI over bins, the KS and chi-square tests and the total-variation distance (pure).

The figures `core/monitoring/drift.py` judges, on a reference sample and a current one: numeric columns over the
reference's quantile bins (plus a bin for missing values), categorical columns over the categories of both
samples (missing values as `__missing__`; beyond `MAX_CATEGORIES`, the reference's most frequent ones and one
`__other__` bin). The HTML report plots the very bins PSI is computed over.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import stats

MISSING = "__missing__"
EPSILON = 1e-4  # floor of a bin's share in PSI, so an empty bin does not make it infinite
# Categories compared one by one at most (a target-encoded feature may have thousands): the reference's most
# frequent; the others are one OTHER bin. Thousands of sparse bins would make PSI, chi-square and the
# total-variation distance measure sampling noise (PSI ~ bins x (1/n_ref + 1/n_cur) with no shift at all).
MAX_CATEGORIES = 50
OTHER = "__other__"

Kind = Literal["numeric", "categorical"]


def psi_from_shares(reference: np.ndarray, current: np.ndarray) -> float:
    """Population stability index of two distributions over the same bins (shares, or counts).

    PSI = sum((c - r) * ln(c / r)); shares are floored at `EPSILON` so an empty bin stays finite.
    """
    ref = np.asarray(reference, dtype=float)
    cur = np.asarray(current, dtype=float)
    if ref.shape != cur.shape:
        raise ValueError(f"bins differ: reference has {ref.shape}, current has {cur.shape}")
    if ref.sum() <= 0 or cur.sum() <= 0:
        raise ValueError("a distribution with no observations has no PSI")
    ref = np.clip(ref / ref.sum(), EPSILON, None)
    cur = np.clip(cur / cur.sum(), EPSILON, None)
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def quantile_edges(reference: np.ndarray, bins: int = 10) -> np.ndarray:
    """Inner bin edges at the reference's quantiles (distinct values only, so ties do not make empty bins)."""
    values = np.asarray(reference, dtype=float)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return np.array([])
    return np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]))


def numeric_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts per bin (`(-inf, e0], (e0, e1], ..., (ek, inf)`) plus a last bin for missing values."""
    values = np.asarray(values, dtype=float)
    missing = np.isnan(values)
    index = np.searchsorted(edges, values[~missing], side="left")
    counts = np.bincount(index, minlength=len(edges) + 1).astype(float)
    return np.append(counts, missing.sum())


def _short(value: float) -> str:
    """A bin edge for people: 4 significant digits, thousands as `k` and millions as `M` (`25.88k`)."""
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.4g}{suffix}"
    return f"{value:.4g}"


def edge_labels(edges: np.ndarray) -> list[str]:
    """Names of the bins of `numeric_counts`: `<= e0`, `(e0, e1]`, ..., `> ek`, `missing`."""
    if len(edges) == 0:
        return ["any value", "missing"]
    text = [_short(e) for e in edges]
    inner = [f"({low}, {high}]" for low, high in pairwise(text)]
    return [f"<= {text[0]}", *inner, f"> {text[-1]}", "missing"]


def category_labels(values: Any) -> pd.Series:
    """Values as text labels, a missing value as `__missing__` (what categorical counts count)."""
    series = pd.Series(values, dtype="object")
    return series.where(series.notna(), MISSING).astype(str)


def category_counts(reference: Any, current: Any) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Categories seen in either sample (missing values as `__missing__`) and both samples' counts."""
    ref, cur = category_labels(reference), category_labels(current)
    categories = sorted(set(ref) | set(cur))
    ref_counts = ref.value_counts().reindex(categories, fill_value=0).to_numpy(dtype=float)
    cur_counts = cur.value_counts().reindex(categories, fill_value=0).to_numpy(dtype=float)
    return capped_counts(categories, ref_counts, cur_counts)


def capped_counts(
    categories: list[str], reference: np.ndarray, current: np.ndarray, limit: int = MAX_CATEGORIES
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """At most `limit` categories of their own (the reference's most frequent, ties by label) plus `OTHER`.

    `categories` (sorted) and both count arrays are aligned; with `limit` or fewer they are returned as they are.
    """
    if len(categories) <= limit:
        return categories, reference, current
    order = np.lexsort((np.arange(len(categories)), -reference))  # most frequent first, then in label order
    keep = np.sort(order[:limit])
    rest = np.ones(len(categories), dtype=bool)
    rest[keep] = False
    labels = [categories[i] for i in keep] + [OTHER]
    return labels, np.append(reference[keep], reference[rest].sum()), np.append(current[keep], current[rest].sum())


@dataclass(frozen=True)
class Bins:
    """The bins a column's PSI is computed over: a name per bin and both samples' counts."""

    labels: list[str]
    reference: np.ndarray
    current: np.ndarray

    @property
    def psi(self) -> float:
        """PSI over these bins."""
        return psi_from_shares(self.reference, self.current)


def numeric_bins(reference: np.ndarray, current: np.ndarray, bins: int = 10) -> Bins:
    """The reference's quantile bins (plus one for missing values) with both samples' counts."""
    edges = quantile_edges(reference, bins)
    return Bins(edge_labels(edges), numeric_counts(reference, edges), numeric_counts(current, edges))


def categorical_bins(reference: Any, current: Any) -> Bins:
    """The categories of both samples with their counts."""
    categories, ref, cur = category_counts(reference, current)
    return Bins(categories, ref, cur)


def column_bins(kind: Kind, reference: Any, current: Any) -> Bins:
    """The bins PSI uses for a column of this kind."""
    return numeric_bins(reference, current) if kind == "numeric" else categorical_bins(reference, current)


def numeric_psi(reference: np.ndarray, current: np.ndarray, bins: int = 10) -> float:
    """PSI of a numeric feature over the reference's quantile bins (missing values are a bin of their own)."""
    return numeric_bins(reference, current, bins).psi


def categorical_psi(reference: Any, current: Any) -> float:
    """PSI of a categorical feature over the categories of both samples."""
    return categorical_bins(reference, current).psi


def total_variation(reference: Any, current: Any) -> float:
    """Total-variation distance of two categorical samples: half the sum of absolute share differences (0..1)."""
    _, ref, cur = category_counts(reference, current)
    return float(0.5 * np.abs(ref / ref.sum() - cur / cur.sum()).sum())


def ks_test(reference: np.ndarray, current: np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov statistic and p-value on the non-missing values ((0, 1) if either is empty)."""
    ref = np.asarray(reference, dtype=float)
    cur = np.asarray(current, dtype=float)
    ref, cur = ref[~np.isnan(ref)], cur[~np.isnan(cur)]
    if ref.size == 0 or cur.size == 0:
        return 0.0, 1.0
    result = stats.ks_2samp(ref, cur)
    return float(result.statistic), float(result.pvalue)


def chi_square_test(reference: Any, current: Any) -> tuple[float, float]:
    """Chi-square test of homogeneity of two categorical samples: statistic and p-value ((0, 1) for one category)."""
    _, ref, cur = category_counts(reference, current)
    if len(ref) < 2:
        return 0.0, 1.0
    statistic, p_value, _, _ = stats.chi2_contingency(np.vstack([ref, cur]), correction=False)
    return float(statistic), float(p_value)
