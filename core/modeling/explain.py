"""Explanations: which raw features the model relies on, and why it scored one record as it did.

Both work on the fitted pipeline (preprocessing + estimator, classifier or regressor) and raw feature
frames as `core.data.features.prepare_inputs` produces them, so they speak of the columns people know (`age`,
not `age_scaled` or `region_north`), and they work for every model family.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from pandas.api.types import is_bool_dtype, is_numeric_dtype
from sklearn.inspection import permutation_importance
from threadpoolctl import ThreadpoolController, threadpool_limits


@dataclass(frozen=True)
class PermutationBudget:
    """How much work permutation importances may do: the cost grows with rows x features x repeats.

    Attributes:
        n_repeats: Shuffles per feature.
        max_rows: Rows used at most (a seeded random sample).
    """

    n_repeats: int = 5
    max_rows: int = 5000


def permutation_importances(  # noqa: PLR0913 - keyword-only settings after the data
    model: Any,
    X: pd.DataFrame,
    y: pd.Series | np.ndarray,
    *,
    scoring: str = "roc_auc",
    seed: int = 0,
    budget: PermutationBudget = PermutationBudget(),
    threads: Callable[[], int | None] | None = None,
) -> pd.DataFrame:
    """How much the score drops when one raw feature is shuffled (scikit-learn's permutation importance).

    Args:
        model: Fitted pipeline taking raw feature frames.
        X: Raw feature frame (e.g. holdout rows through `prepare_inputs`).
        y: True labels of those rows.
        scoring: scikit-learn scorer name; "roc_auc" for binary, e.g. "roc_auc_ovr" for multiclass,
            "neg_root_mean_squared_error" for regression.
        seed: Seeds the row sample and the shuffles.
        budget: Shuffles per feature and rows used at most.
        threads: Asked before each prediction: the OpenMP threads it may use (None: no limit). A caller that
            runs this beside other work gives it one thread while that work runs and every one after.

    Returns:
        Columns `feature`, `importance_mean`, `importance_std`, one row per raw feature, most important first.
    """
    y = pd.Series(np.asarray(y), index=X.index)
    if len(X) > budget.max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(len(X), size=budget.max_rows, replace=False))
        X, y = X.iloc[rows], y.iloc[rows]
    threads = threads or _no_limit
    result = _permuted_after_preprocessing(model, X, y, scoring, budget.n_repeats, seed, threads)
    if result is None:
        with threadpool_limits(threads(), user_api="openmp"):  # asked once: scikit-learn's loop is not ours
            result = permutation_importance(model, X, y, scoring=scoring, n_repeats=budget.n_repeats, random_state=seed)
    table = pd.DataFrame(
        {
            "feature": list(X.columns),
            "importance_mean": result.importances_mean,
            "importance_std": result.importances_std,
        }
    )
    return table.sort_values("importance_mean", ascending=False, kind="stable").reset_index(drop=True)


def _no_limit() -> None:
    return None


def _output_blocks(preprocess: Any, X: pd.DataFrame, encoded: np.ndarray) -> list[np.ndarray] | None:
    """The encoded columns each raw feature alone makes, or None when some encoded column needs two features.

    Found by moving each raw column down one row (a permutation: the first row takes the last's value) and
    seeing which encoded columns change. A column a feature makes changes somewhere under that move unless it
    is the same for all of the feature's values here, and then no permutation of the feature changes it either.
    """
    shifted_rows = np.roll(np.arange(len(X)), 1)
    blocks, owner = [], np.full(encoded.shape[1], -1)
    for j, column in enumerate(X.columns):
        moved = X.copy()
        moved[column] = X[column].iloc[shifted_rows].set_axis(X.index)
        after = preprocess.transform(moved)
        changed = np.flatnonzero(((after != encoded) & ~(np.isnan(after) & np.isnan(encoded))).any(axis=0))
        if (owner[changed] >= 0).any():
            return None
        owner[changed] = j
        blocks.append(changed)
    return blocks


def _permuted_after_preprocessing(  # noqa: PLR0913 - permutation_importances' arguments
    model: Any,
    X: pd.DataFrame,
    y: pd.Series,
    scoring: str,
    n_repeats: int,
    seed: int,
    threads: Callable[[], int | None] = _no_limit,
) -> Any:
    """scikit-learn's `permutation_importance` of a `preprocess` + `model` pipeline, with the rows encoded once.

    The preprocessing is row by row, so shuffling a raw feature's rows and encoding them gives the encoded rows
    of that feature's columns, shuffled the same way: every shuffle is done on the encoded columns the feature
    makes (`_output_blocks`) and only the model predicts again, with scikit-learn's own shuffles (its random
    seeds, drawn in its order) and scorer. The same numbers, about half the time: the encoding was half of
    each prediction. The shuffled copies are predicted together, `STACKED_BYTES` of them per call at most, each
    scored on its slice (`_Replay`). None (use scikit-learn's) when the model is another shape or an encoded
    column needs two features; a test checks the equality with `permutation_importance`.
    """
    from sklearn.metrics import check_scoring
    from sklearn.pipeline import Pipeline
    from sklearn.utils import Bunch, check_random_state

    if not isinstance(model, Pipeline) or len(model.steps) != 2 or model.steps[0][0] != "preprocess":
        return None
    preprocess, estimator = model.steps[0][1], model.steps[1][1]
    encoded = preprocess.transform(X)
    if not isinstance(encoded, np.ndarray) or encoded.dtype != np.float64:  # a frame or sparse output: as it is
        return None
    blocks = _output_blocks(preprocess, X, encoded)
    if blocks is None:
        return None
    scorer = check_scoring(estimator, scoring=scoring)
    pools = ThreadpoolController()  # made once (it scans the loaded libraries); its limits are this thread's
    with pools.limit(limits=threads(), user_api="openmp"):
        baseline = scorer(estimator, encoded, y)
    random_seed = check_random_state(seed).randint(np.iinfo(np.int32).max + 1)  # as scikit-learn draws it
    drops = np.empty((len(blocks), n_repeats))
    rows = len(encoded)
    per_call = min(max(1, STACKED_BYTES // max(encoded.nbytes, 1)), len(blocks) * n_repeats)
    stacked = np.empty((per_call * rows, encoded.shape[1]))  # each shuffled copy written once, into its slot
    waiting: list[tuple[int, int]] = []  # the (feature, shuffle) of each filled slot, in order

    def score_waiting() -> None:
        with pools.limit(limits=threads(), user_api="openmp"):
            replay = _Replay(estimator, stacked[: len(waiting) * rows])
            for k, (feature, shuffle) in enumerate(waiting):
                drops[feature, shuffle] = baseline - scorer(replay, slice(k * rows, (k + 1) * rows), y)
        waiting.clear()

    for j, block in enumerate(blocks):
        state, permuted = check_random_state(random_seed), encoded.copy()
        order = np.arange(rows)
        for repeat in range(n_repeats):
            state.shuffle(order)  # scikit-learn shuffles the already shuffled column again, with the same order
            permuted[:, block] = permuted[order][:, block]
            stacked[len(waiting) * rows : (len(waiting) + 1) * rows] = permuted
            waiting.append((j, repeat))
            if len(waiting) == per_call:
                score_waiting()
    if waiting:
        score_waiting()
    return Bunch(importances_mean=drops.mean(axis=1), importances_std=drops.std(axis=1), importances=drops)


# Shuffled copies of the encoded rows predicted in one call at most: each call of a gradient-boosting model's
# prediction takes the interpreter's lock once per tree, and beside the review's threads each of those waits.
STACKED_BYTES = 16 * 2**20
_RESPONSES = frozenset({"predict", "predict_proba", "decision_function", "predict_log_proba"})


class _Replay:
    """The estimator as a scorer sees it, answering from one prediction over stacked rows.

    A scorer is called with a row slice of `stacked` as `X`; the estimator's method it asks for (the one the
    scorer would call on the estimator itself: a method the estimator lacks is missing here too) predicts every
    stacked row once, and each call answers its slice. Anything else (`classes_`, the tags) is the estimator's.
    """

    def __init__(self, estimator: Any, stacked: np.ndarray) -> None:
        self._estimator, self._stacked, self._outputs = estimator, stacked, {}

    def __getattr__(self, name: str) -> Any:
        answer = getattr(self._estimator, name)  # AttributeError for a method it lacks, as the scorer expects
        if name not in _RESPONSES:
            return answer

        def respond(rows: slice) -> np.ndarray:
            return self._answer(name, rows)

        respond.__name__ = name  # scorers look a method up again by its name
        return respond

    def _answer(self, method: str, rows: slice) -> np.ndarray:
        if method not in self._outputs:
            self._outputs[method] = getattr(self._estimator, method)(self._stacked)
        return self._outputs[method][rows]


def importance_figure(importances: pd.DataFrame, top_k: int = 20) -> Figure:
    """Horizontal bar chart of permutation importances (most important on top), drawn with Agg.

    Args:
        importances: Output of `permutation_importances`.
        top_k: Features shown at most.

    Returns:
        A matplotlib figure not registered with pyplot (nothing to close; save or log it).
    """
    shown = importances.head(top_k).iloc[::-1]
    fig = Figure(figsize=(6, 0.35 * len(shown) + 1.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.barh(shown["feature"], shown["importance_mean"], xerr=shown["importance_std"], color="#4c72b0")
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("drop in score when the feature is shuffled")
    ax.set_title("Permutation importance (holdout)")
    return fig


def baseline_row(X: pd.DataFrame) -> pd.DataFrame:
    """A reference record: the median of each numeric column, the most frequent value of the others.

    Nulls are ignored; a column with only nulls stays null. Column order follows `X`; numeric columns
    are float64 (a median need not be a whole number), the others keep their dtype.
    """
    values: dict[str, Any] = {}
    for column in X.columns:
        series = X[column].dropna()
        if series.empty:
            values[column] = None
        elif is_numeric_dtype(series) and not is_bool_dtype(series):
            values[column] = series.median()
        else:
            # mode() sorts ties, so the choice does not depend on row order.
            values[column] = series.mode().iloc[0]
    dtypes = {
        column: "float64" if is_numeric_dtype(dtype) and not is_bool_dtype(dtype) else dtype
        for column, dtype in X.dtypes.items()
    }
    return pd.DataFrame([values], columns=X.columns).astype(dtypes)


def contributions(
    model: Any, X: pd.DataFrame, baseline: pd.DataFrame, positive_index: int | Sequence[int] | None = None
) -> pd.DataFrame:
    """Per-record, per-feature contributions to one model output, by occlusion.

    The output explained is a class probability for a classifier (`positive_index`) or the predicted
    value for a regressor (`positive_index=None`: `model.predict`). The contribution of a feature to a
    record is the record's output minus its output when that one feature is set to the baseline value:
    positive means the record's value pushes the output up compared with the baseline. Model-agnostic, no
    retraining; interactions are not split between features, so contributions need not add up to the
    difference from the baseline's output. All outputs come from one `predict_proba` (or `predict`) call
    on a stacked frame of n_records x (n_features + 1) rows.

    Args:
        model: Fitted pipeline taking raw feature frames.
        X: Records to explain (raw features).
        baseline: One reference row with the same columns (e.g. `baseline_row` of the training rows).
        positive_index: Column of `predict_proba` explained (e.g. `list(model.classes_).index(1)`), for
            every record; or one column per record (e.g. each record's predicted class, for multiclass);
            None explains `predict` (a regressor's predicted value).

    Returns:
        A frame with `X`'s index and columns: each cell is that feature's contribution for that record.
    """
    if len(baseline) != 1:
        raise ValueError(f"baseline must have exactly one row, got {len(baseline)}")
    missing = [c for c in X.columns if c not in baseline.columns]
    if missing:
        raise ValueError(f"baseline lacks columns {missing}")
    n_records, n_features = X.shape
    columns = None if positive_index is None or np.ndim(positive_index) == 0 else np.asarray(positive_index)
    if columns is not None and columns.shape != (n_records,):
        raise ValueError(f"positive_index has {columns.size} entries for {n_records} records")
    if n_records == 0:
        return pd.DataFrame(columns=X.columns, index=X.index, dtype="float64")
    # Block of each record: the record itself, then one copy per feature with that feature occluded.
    block = n_features + 1
    stacked = X.iloc[np.repeat(np.arange(n_records), block)].reset_index(drop=True)
    starts = np.arange(n_records) * block
    for j, column in enumerate(X.columns):
        value = baseline[column].iloc[0]
        if pd.isna(value):
            # The null prepare_inputs uses: None for categories, NaN for numbers.
            value = np.nan if is_numeric_dtype(X[column]) else None
        stacked.iloc[starts + 1 + j, j] = value
    if positive_index is None:
        output = np.asarray(model.predict(stacked), dtype="float64").reshape(n_records, block)
    else:
        proba = np.asarray(model.predict_proba(stacked)).reshape(n_records, block, -1)
        index = np.full(n_records, positive_index) if columns is None else columns
        output = proba[np.arange(n_records), :, index]
    return pd.DataFrame(output[:, :1] - output[:, 1:], index=X.index, columns=X.columns)
