"""Target leakage: features that would not be known when the model predicts, found before anything trains.

Pure (pandas, scikit-learn). Five checks, each naming the feature and the evidence:

- `named_like_target`: the column's name holds the target's name (`churned` -> `churn_reason`,
  `default` -> `num_defaults`): usually a field filled in from the outcome.
- `predicts_target`: the feature alone predicts the target almost perfectly: a one-feature model
  (a fine decision tree on the number, or out-of-fold target means of the category), cross-validated,
  reaches ROC AUC or R² `LeakRules.single_feature` (0.99 by default). No honest single column scores that.
- `function_of_target`: the feature is an exact function of the target, even one that does not reveal it
  (a category that merges two classes, `abs(target - m)`): constant within each class, or predicted from
  the target alone with R² `LeakRules.function_of_target`.
- `linear_combination`: a regression target reproduced by a linear combination of numeric features
  (cross-validated R² `LeakRules.linear_combination`): the parts of a total (`casual + registered = count`).
  The smallest set of features that still reproduces it is named.
- `after_event`: a date/time column later than the row's time column in some rows: it records something
  that happened after the event the model predicts.

`data init` leaves flagged columns out, saying why; validation refuses a config that trains on one
unless the feature says `allow_leak: true` with a reason (`core.data.dataset.Feature`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.linear_model import LinearRegression
from sklearn.metrics import r2_score, roc_auc_score
from sklearn.model_selection import KFold, StratifiedKFold
from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor

_LEAF = 5


@dataclass(frozen=True)
class LeakRules:
    """Thresholds of the checks and how many rows they read."""

    single_feature: float = 0.99  # ROC AUC (classification) or R² (regression) of the feature alone
    function_of_target: float = 0.999  # R² of the feature from the target alone; share constant within a class
    linear_combination: float = 0.9999  # R² of a least-squares fit of the target on numeric features
    after_event_share: float = 0.01  # share of dated rows later than the time column
    sample_rows: int = 5_000  # enough for near-perfect relations; 20,000 cost 2.5-3 s per validation on a busy machine
    folds: int = 3
    seed: int = 0


@dataclass(frozen=True)
class Leak:
    """One flagged feature: which check, and the evidence in words."""

    column: str
    check: str
    detail: str

    def __str__(self) -> str:
        return f"{self.column}: {self.detail}"


@dataclass(frozen=True)
class Candidate:
    """A column to check, and whether it is numeric, categorical or date/time."""

    name: str
    kind: str  # numeric | categorical | datetime


def _tokens(name: str) -> set[str]:
    words = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name).lower()
    stems = set()
    for word in re.split(r"[^a-z0-9]+", words):
        stem = word
        for suffix in ("ing", "ed", "s"):
            if len(word) > len(suffix) + 3 and word.endswith(suffix):
                stem = word[: -len(suffix)]
                break
        if len(stem) >= 3:
            stems.add(stem)
    return stems


def named_like(column: str, target: str) -> bool:
    """Whether every word of the target's name (stemmed, 3+ letters) is in the column's name."""
    wanted = _tokens(target)
    return bool(wanted) and column != target and wanted <= _tokens(column)


def _classification(y: pd.Series, classification: bool) -> tuple[pd.Series, bool]:
    return (y.astype(str), True) if classification else (pd.to_numeric(y, errors="coerce").astype(float), False)


def _splits(y: pd.Series, classification: bool, rules: LeakRules) -> list[tuple[np.ndarray, np.ndarray]]:
    if classification and y.value_counts().min() >= rules.folds:
        return list(StratifiedKFold(rules.folds, shuffle=True, random_state=rules.seed).split(y, y))
    return list(KFold(rules.folds, shuffle=True, random_state=rules.seed).split(y))


def _score(y: pd.Series, predicted: np.ndarray, classification: bool, classes: list[str]) -> float:
    """ROC AUC (one vs rest, macro, for several classes) of out-of-fold probabilities, or R²."""
    if not classification:
        return float(r2_score(y, predicted))
    if len(classes) == 2:
        return float(roc_auc_score(y == classes[1], predicted[:, 1]))
    return float(roc_auc_score(y, predicted, multi_class="ovr", labels=classes))


def _out_of_fold(x: pd.DataFrame, y: pd.Series, classification: bool, splits, classes: list[str]) -> np.ndarray:
    """Out-of-fold predictions of a fine decision tree on `x` (missing values go down their own branch).

    Fine (leaves of `_LEAF` rows): an exact relation is followed closely, while an honest feature's noise is
    overfitted, which lowers its cross-validated score; single-threaded and quick on one column.
    """
    shape = (len(y), len(classes)) if classification else (len(y),)
    predicted = np.zeros(shape)
    for train, valid in splits:
        kind = DecisionTreeClassifier if classification else DecisionTreeRegressor
        model = kind(min_samples_leaf=_LEAF, random_state=0).fit(x.iloc[train], y.iloc[train])
        if classification:
            proba = np.zeros((len(valid), len(classes)))
            proba[:, [classes.index(c) for c in model.classes_]] = model.predict_proba(x.iloc[valid])
            predicted[valid] = proba
        else:
            predicted[valid] = model.predict(x.iloc[valid])
    return predicted


def _category_codes(values: pd.Series, y: pd.Series, classification: bool, splits, classes) -> pd.DataFrame:
    """Out-of-fold target means of each category (per class for classification): a one-feature model's input."""
    text = values.astype("object").where(values.notna(), "__missing__").astype(str)
    targets = pd.get_dummies(y).astype(float) if classification else y.to_frame("y")
    coded = np.zeros((len(y), targets.shape[1]))
    for train, valid in splits:
        means = targets.iloc[train].groupby(text.iloc[train].to_numpy()).mean()
        prior = targets.iloc[train].mean()
        found = means.reindex(text.iloc[valid].to_numpy())
        coded[valid] = found.fillna(prior).to_numpy()
    return pd.DataFrame(coded, columns=[f"m{i}" for i in range(coded.shape[1])])


def _numeric(values: pd.Series) -> pd.DataFrame:
    return pd.to_numeric(values, errors="coerce").astype(float).to_frame("x").reset_index(drop=True)


def single_feature_score(
    values: pd.Series, kind: str, y: pd.Series, classification: bool, rules: LeakRules = LeakRules()
) -> float:
    """Cross-validated ROC AUC or R² of a model that sees only this feature."""
    y, classification = _classification(y.reset_index(drop=True), classification)
    values = values.reset_index(drop=True)
    classes = sorted(y.unique()) if classification else []
    splits = _splits(y, classification, rules)
    if kind == "categorical":
        coded = _category_codes(values, y, classification, splits, classes)
        if classification:
            coded = coded.to_numpy()
            return _score(y, coded / np.clip(coded.sum(axis=1, keepdims=True), 1e-12, None), True, classes)
        return _score(y, coded["m0"].to_numpy(), False, classes)
    return _score(y, _out_of_fold(_numeric(values), y, classification, splits, classes), classification, classes)


def function_of_target_score(
    values: pd.Series, kind: str, y: pd.Series, classification: bool, rules: LeakRules
) -> float:
    """How exactly the target determines the feature.

    For a class target, the share of rows holding their class's most common value (1 when the feature is
    constant within every class, and not overall); for a numeric target, the cross-validated R² of the
    (numeric) feature predicted from the target alone.
    """
    values, y = values.reset_index(drop=True), y.reset_index(drop=True)
    text = values.astype("object").where(values.notna(), "__missing__").astype(str)
    if text.nunique() < 2:
        return 0.0
    if classification:
        modal = text.groupby(y.astype(str).to_numpy()).agg(lambda v: v.value_counts().iloc[0]).sum()
        per_class = text.groupby(y.astype(str).to_numpy()).agg(lambda v: v.value_counts().index[0])
        return float(modal / len(text)) if per_class.nunique() > 1 else 0.0
    if kind != "numeric":
        return 0.0
    x = pd.to_numeric(values, errors="coerce").astype(float)
    known = x.notna().to_numpy()
    if known.sum() < 3 * rules.folds or x[known].nunique() < 2:
        return 0.0
    target = pd.to_numeric(y, errors="coerce").astype(float)[known].to_frame("y").reset_index(drop=True)
    x = x[known].reset_index(drop=True)
    splits = _splits(x, False, rules)
    return _score(x, _out_of_fold(target, x, False, splits, []), False, [])


def linear_combination(
    frame: pd.DataFrame, columns: list[str], y: pd.Series, rules: LeakRules
) -> tuple[list[str], float]:
    """The smallest set of numeric columns whose least-squares fit reproduces `y`, with its R².

    Reproduces: cross-validated R² at least `rules.linear_combination`; ([], the best R²) when none does.
    """
    rows = frame[columns].apply(pd.to_numeric, errors="coerce").astype(float)
    target = pd.to_numeric(y, errors="coerce").astype(float)
    keep = rows.notna().all(axis=1).to_numpy() & target.notna().to_numpy()
    rows, target = rows[keep].reset_index(drop=True), target[keep].reset_index(drop=True)
    if len(rows) < 10 * rules.folds or len(columns) < 2 or target.nunique() < 2:
        return [], 0.0

    def r2(subset: list[str]) -> float:
        predicted = np.zeros(len(target))
        for train, valid in KFold(rules.folds, shuffle=True, random_state=rules.seed).split(rows):
            model = LinearRegression().fit(rows.iloc[train][subset], target.iloc[train])
            predicted[valid] = model.predict(rows.iloc[valid][subset])
        return float(r2_score(target, predicted))

    best = r2(columns)
    if best < rules.linear_combination:
        return [], best
    # Drop the least important column while the rest still reproduces the target (one pass, by |coef| * std).
    model = LinearRegression().fit(rows[columns], target)
    weight = np.abs(model.coef_) * rows[columns].std().to_numpy()
    chosen = list(columns)
    for column in [columns[i] for i in np.argsort(weight)]:
        trial = [c for c in chosen if c != column]
        if len(trial) >= 2 and (score := r2(trial)) >= rules.linear_combination:
            chosen, best = trial, score
    return chosen, best


def after_event_share(values: pd.Series, times: pd.Series) -> float:
    """Share of the rows with both dates where the column's date is later than the time column's."""
    later = _as_time(values)
    event = _as_time(times)
    both = later.notna() & event.notna()
    return float((later[both] > event[both]).mean()) if both.any() else 0.0


def _as_time(values: pd.Series) -> pd.Series:
    if pd.api.types.is_datetime64_any_dtype(values.dtype):
        return pd.to_datetime(values, utc=True)
    return pd.to_datetime(values.astype("object"), utc=True, errors="coerce", format="ISO8601")


def find_leaks(
    frame: pd.DataFrame,
    target: str,
    classification: bool,
    candidates: list[Candidate],
    time_column: str | None = None,
    rules: LeakRules = LeakRules(),
) -> list[Leak]:
    """Every candidate column a check flags (at most one finding per column, the first check that fires).

    Reads at most `rules.sample_rows` rows (a seeded sample), rows with a target only.
    """
    rows = frame[frame[target].notna()]
    if len(rows) > rules.sample_rows:
        rows = rows.sample(rules.sample_rows, random_state=rules.seed)
    rows = rows.reset_index(drop=True)
    y = rows[target]
    if y.nunique() < 2:
        return []
    leaks: dict[str, Leak] = {}
    for c in candidates:
        if named_like(c.name, target):
            leaks[c.name] = Leak(c.name, "named_like_target", f"named like the target {target!r}")
        elif c.kind == "datetime":
            if time_column and (share := after_event_share(rows[c.name], rows[time_column])) > rules.after_event_share:
                leaks[c.name] = Leak(
                    c.name,
                    "after_event",
                    f"later than {time_column} in {share:.1%} of rows: recorded after the event the model predicts",
                )
        elif (score := single_feature_score(rows[c.name], c.kind, y, classification, rules)) >= rules.single_feature:
            metric = "ROC AUC" if classification else "R²"
            leaks[c.name] = Leak(
                c.name, "predicts_target", f"alone predicts {target!r} with cross-validated {metric} {score:.4f}"
            )
        elif (score := function_of_target_score(rows[c.name], c.kind, y, classification, rules)) >= (
            rules.function_of_target
        ):
            how = "constant within each class" if classification else f"predicted from the target alone, R² {score:.4f}"
            leaks[c.name] = Leak(c.name, "function_of_target", f"a function of {target!r} ({how})")
    if not classification:
        numeric = [c.name for c in candidates if c.kind == "numeric" and c.name not in leaks]
        parts, score = linear_combination(rows, numeric, y, rules)
        for name in parts:
            others = ", ".join(p for p in parts if p != name)
            leaks[name] = Leak(
                name,
                "linear_combination",
                f"with {others}, a linear combination reproduces {target!r} (cross-validated R² {score:.6f})",
            )
    return [leaks[c.name] for c in candidates if c.name in leaks]
