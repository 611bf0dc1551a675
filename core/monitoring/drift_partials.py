"""Drift over partitions: each partition of a window counts its values over bins the reference fixes.

A window too big for one process is read partition by partition (on a Dask cluster). Every figure of
`core/monitoring/drift.py` is a function of counts over bins that the *reference* fixes, so each partition only
counts, the counts are summed, and the figures are computed once from the sums: the same numbers as on
the whole frame.
- PSI (numeric): counts over the reference's quantile edges plus the missing bin (`numeric_counts`).
- KS (numeric): the reference is small (`REFERENCE_ROWS`), so its distinct values cut the line into
  cells: "equal to the j-th value" and "strictly between the (j-1)-th and the j-th". Both ECDFs are
  constant or monotone inside a cell, so the largest ECDF gap is found at a cell's ends: the counts per
  cell give the exact statistic. The p-value is scipy's for that statistic and those sizes (exact method
  up to scipy's 10,000 rows, Smirnov's asymptotic formula above it, as `ks_2samp(method="auto")`).
- chi-square, total variation, PSI (categorical): counts per category (missing as `__missing__`).
- null rates: missing values per column.

This module holds one column's side of it (`ColumnReference`, `ColumnPartial`); `core/monitoring/drift.py` puts the
columns of a window together and turns the merged counts into drift.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats

from core.monitoring.drift_statistics import MISSING, Kind, category_labels, ks_test, numeric_counts, quantile_edges

KS_EXACT_MAX_ROWS = 10_000  # scipy's `ks_2samp` uses the exact method up to this many rows per sample


@dataclass(frozen=True)
class ColumnReference:
    """What the partitions of a window need from the reference for one column: bins fixed by the reference."""

    name: str
    kind: Kind
    values: Any = None  # the reference values themselves (the final figures are computed against them)
    edges: np.ndarray = field(default_factory=lambda: np.array([]))  # numeric: PSI's inner edges
    support: np.ndarray = field(default_factory=lambda: np.array([]))  # numeric: distinct non-missing values


def column_reference(name: str, kind: Kind, values: Any) -> ColumnReference:
    """The reference side of a column, for partial counts (`column_partial`)."""
    if kind == "categorical":
        return ColumnReference(name, kind, category_labels(values))
    array = np.asarray(values, dtype=float)
    return ColumnReference(name, kind, array, quantile_edges(array), np.unique(array[~np.isnan(array)]))


@dataclass
class ColumnPartial:
    """Counts of one column over some rows of a window, against its `ColumnReference`; `merge` sums them."""

    name: str
    kind: Kind
    rows: int = 0
    missing: int = 0
    psi_counts: np.ndarray = field(default_factory=lambda: np.zeros(0))  # numeric: `numeric_counts`
    equal: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # numeric: == support[j]
    between: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # numeric: (s[j-1], s[j])
    categories: dict[str, int] = field(default_factory=dict)  # categorical: count per label

    def merge(self, other: ColumnPartial) -> ColumnPartial:
        """The counts of both (the same column against the same reference)."""
        if (other.name, other.kind) != (self.name, self.kind):
            raise ValueError(f"cannot merge the counts of {other.name} ({other.kind}) into {self.name} ({self.kind})")
        categories = dict(self.categories)
        for label, count in other.categories.items():
            categories[label] = categories.get(label, 0) + count
        return ColumnPartial(
            self.name,
            self.kind,
            self.rows + other.rows,
            self.missing + other.missing,
            self.psi_counts + other.psi_counts,
            self.equal + other.equal,
            self.between + other.between,
            categories,
        )

    @property
    def null_rate(self) -> float:
        """Share of missing values (0 for no rows)."""
        return self.missing / self.rows if self.rows else 0.0


def column_partial(reference: ColumnReference, values: Any) -> ColumnPartial:
    """Counts of one partition's values of a column (see the module's docstring)."""
    if reference.kind == "categorical":
        labels = category_labels(values)
        counts = labels.value_counts()
        categories = {str(label): int(count) for label, count in counts.items()}
        return ColumnPartial(
            reference.name, "categorical", len(labels), categories.get(MISSING, 0), categories=categories
        )
    array = np.asarray(values, dtype=float)
    present = array[~np.isnan(array)]
    support = reference.support
    left = np.searchsorted(support, present, side="left")
    right = np.searchsorted(support, present, side="right")
    hit = right > left
    return ColumnPartial(
        reference.name,
        "numeric",
        array.size,
        int(array.size - present.size),
        numeric_counts(array, reference.edges),
        np.bincount(left[hit], minlength=support.size).astype(np.int64),
        np.bincount(left[~hit], minlength=support.size + 1).astype(np.int64),
    )


def _ks_surrogate(support: np.ndarray, equal: np.ndarray, between: np.ndarray) -> np.ndarray:
    """A sample with exactly these cell counts (a value inside each open cell stands for the cell's values)."""
    inside = np.empty(support.size + 1)
    inside[0] = np.nextafter(support[0], -np.inf)
    inside[1:-1] = np.nextafter(support[:-1], np.inf)  # strictly inside (s[j-1], s[j]) whenever that cell is not empty
    inside[-1] = np.nextafter(support[-1], np.inf)
    return np.concatenate([np.repeat(support, equal), np.repeat(inside, between)])


def ks_from_partial(reference: ColumnReference, partial: ColumnPartial) -> tuple[float, float]:
    """`ks_test(reference values, all the window's values)` from the window's merged cell counts."""
    support = reference.support
    ref = np.asarray(reference.values, dtype=float)
    ref = ref[~np.isnan(ref)]
    n_ref, n_cur = ref.size, int(partial.equal.sum() + partial.between.sum())
    if n_ref == 0 or n_cur == 0:
        return 0.0, 1.0
    if max(n_ref, n_cur) <= KS_EXACT_MAX_ROWS:  # small: scipy's exact method on a sample with the same cells
        return ks_test(ref, _ks_surrogate(support, partial.equal, partial.between))
    ref_cum = np.searchsorted(np.sort(ref), support, side="right")  # reference rows <= s[j]
    cur_at = np.cumsum(partial.equal + partial.between[:-1])  # window rows <= s[j]
    before = np.concatenate([[0], cur_at]) + partial.between  # window rows < s[j] (and all rows, last)
    ref_before = np.concatenate([[0], ref_cum])
    gaps = np.concatenate(
        [ref_cum / n_ref - cur_at / n_cur, ref_before / n_ref - before / n_cur]  # at s[j]; just before s[j]
    )
    statistic = float(max(gaps.max(), -gaps.min(), 0.0))
    # scipy's ks_2samp, method "asymp", two-sided: Smirnov's distribution at the effective size
    m, n = sorted([float(n_ref), float(n_cur)], reverse=True)
    p_value = float(np.clip(stats.kstwo.sf(statistic, np.round(m * n / (m + n))), 0, 1))
    return statistic, p_value
