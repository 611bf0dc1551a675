"""Infer a dataset config from a table: a frame in, a validated config and its commented YAML out.

Pure code (pandas and the config model only; no reading, writing, Prefect, MLflow or S3): `mlops data init`
reads the snapshot and writes the file. Every choice made here is explained in the YAML it renders, and the
rules are listed at the top of that file (`RULES` below is their text, filled in from `InferenceRules`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import pandas as pd

from core.data.column_kinds import (
    count_text,
    is_bool,
    is_datetime,
    is_number,
    is_text,
    looks_like_id,
    plain_value,
    whole_numbers,
)
from core.data.config_yaml import InferredConfig
from core.data.dataset import (
    DatasetConfig,
    DatasetConfigError,
    Feature,
    TaskType,
    parse_dataset_config,
)
from core.data.feature_inference import DEFAULT_RULES, InferenceRules, datetime_feature, infer_features
from core.data.leakage import Candidate, find_leaks
from core.data.split import as_utc

FORMAT_SUFFIXES = {"parquet": (".parquet", ".pq"), "csv": (".csv", ".csv.gz")}
_TIME_NAME = re.compile(r"date|time|_at$|^at_|timestamp|day", re.IGNORECASE)


class ConfigInferenceError(ValueError):
    """No config can be inferred from this data with these options; the message names the column or source."""


RULES = """\
Rules used (`mlops data init`):
- task: a text or true/false target, or a numeric target with at most {max_classes} distinct whole-number values,
  is classification (2 values: binary, 3 or more: multiclass); any other numeric target is regression.
  `classes` lists the target values seen.
- id_column: --id if given (checked non-null and unique), else the one column without nulls whose values are
  unique per row (whole numbers or text); among several, the one named like an id (id, *_id, id_*, *Id).
- time_column: a date/time column (datetime values, or text in ISO form YYYY-MM-DD...); among several, the one
  named like a time (date, time, *_at, timestamp). The holdout is its latest period and the CV folds keep time
  order (split strategy auto); its calendar parts are features (time_features; hour only when the times have
  one). Other date/time columns are datetime features (their calendar parts), unless later than the time column.
- leakage: a column that would not be known when the model predicts is left out, saying why: named like the
  target, predicting it alone (cross-validated ROC AUC or R2 0.99), a function of it, part of a linear
  combination that reproduces it, or a date later than the time column (`core/data/leakage.py`).
- feature types: numbers are numeric, including integer codes and 0/1 flags (the range check bounds them; a
  config lists categories as text, which integers never match); true/false columns and text are categorical.
- numeric range: observed min and max, each widened by {margin_pct} of the observed range (max - min) and
  rounded outward (whole numbers to whole bounds); a column with no negative values keeps min >= 0.
- categories: the distinct values seen, when there are at most {max_categories} (one-hot encoded); a text column
  with more is target-encoded (`encoding: target`: scikit-learn's TargetEncoder, cross-fitted; a value unseen in
  training gets the target's mean) and its categories are not listed, unless (nearly) every row has a value of
  its own (distinct values at least 90 % of its values: an id, free text), which is left out. A true/false
  column lists none (the config lists categories as text, which true/false never matches).
- null tolerance: the share of nulls seen + {null_margin}, rounded up to 2 decimals, capped at 1; columns seen
  without nulls use the dataset default max_null_fraction ({null_margin}).
- left out: columns with a single value, only nulls, infinite numbers, or other types.
- min_rows: min({min_rows_cap}, half the rows seen)."""


# --- small helpers ---


def dataset_name(source: str) -> str:
    """A dataset name from a source: the file's stem, or the folder's (prefix's) last part; lower-case, dashes."""
    path = PurePosixPath(source.removeprefix("s3://").rstrip("/"))
    stem = path.name
    for suffix in (".csv.gz", ".parquet", ".pq", ".csv"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    name = re.sub(r"[^a-z0-9_-]+", "-", stem.lower()).strip("-_")
    return name or "dataset"


def format_from_names(source: str, names: list[str]) -> str:
    """`csv` or `parquet` from the file names of a source (its own name, or the files under a folder/prefix).

    Raises:
        ConfigInferenceError: no CSV/Parquet file, or both kinds (then `--format` decides).
    """
    found = sorted({fmt for name in names for fmt, ends in FORMAT_SUFFIXES.items() if name.lower().endswith(ends)})
    if len(found) == 1:
        return found[0]
    if not found:
        raise ConfigInferenceError(
            f"{source}: no CSV (.csv, .csv.gz) or Parquet (.parquet, .pq) files found; pass --format for other names"
        )
    raise ConfigInferenceError(f"{source}: holds both CSV and Parquet files; pass --format csv or --format parquet")


# --- target and task ---


def _check_target(frame: pd.DataFrame, target: str, source: str) -> pd.Series:
    if target not in frame.columns:
        columns = ", ".join(map(str, frame.columns[:30])) + (" ..." if frame.shape[1] > 30 else "")
        raise ConfigInferenceError(f"target column {target!r} is not in {source} (columns: {columns})")
    values = frame[target]
    nulls = int(values.isna().sum())
    if nulls:
        raise ConfigInferenceError(
            f"target column {target!r} in {source} has {count_text(nulls)} empty value(s) of "
            f"{count_text(len(values))}: "
            "every row needs a target (training rejects such a snapshot); drop or fill those rows first"
        )
    if values.nunique() < 2:
        raise ConfigInferenceError(
            f"target column {target!r} in {source} is constant "
            f"({plain_value(values.iloc[0])!r} in every row): nothing to learn"
        )
    return values


def _infer_task(values: pd.Series, given: TaskType | None, rules: InferenceRules) -> tuple[TaskType, str]:
    name, distinct = values.name, int(values.nunique())
    numeric = is_number(values)
    whole = numeric and whole_numbers(values)
    if given is not None:
        if given is TaskType.regression and not numeric:
            raise ConfigInferenceError(f"--task regression needs a numeric target; {name!r} is {values.dtype}")
        if given is TaskType.binary and distinct != 2:
            raise ConfigInferenceError(f"--task binary, but target {name!r} has {distinct} distinct values")
        if given is TaskType.multiclass and distinct < 3:
            raise ConfigInferenceError(f"--task multiclass, but target {name!r} has 2 values: use --task binary")
        return given, f"given (--task); target has {count_text(distinct)} distinct values"
    if numeric and not (whole and distinct <= rules.max_classes):
        kind = "non-whole numbers" if not whole else f"more than {rules.max_classes} distinct whole numbers"
        return TaskType.regression, f"inferred: numeric target with {kind} ({count_text(distinct)} distinct)"
    if distinct > rules.max_classes:
        raise ConfigInferenceError(
            f"target {name!r} is {values.dtype} with {count_text(distinct)} distinct values: too many to infer a "
            f"classification task (at most {rules.max_classes}); pass --task multiclass if that is what it is"
        )
    kind = "numeric target" if numeric else "true/false target" if is_bool(values) else "text target"
    task = TaskType.binary if distinct == 2 else TaskType.multiclass
    return task, f"inferred: {kind} with {distinct} distinct values"


def _classes(values: pd.Series) -> tuple[list[Any] | None, str]:
    distinct = values.drop_duplicates().tolist()
    if is_bool(values):
        return [False, True], "the target values seen (true/false, read as 0/1)"
    if is_number(values):
        if not whole_numbers(values):
            return None, "not listed: the config lists classes as whole numbers or text"
        return sorted(int(v) for v in distinct), "the target values seen"
    if all(isinstance(v, str) for v in distinct):
        return sorted(distinct), "the target values seen"
    return None, "not listed: the target mixes value types"


# --- id and time ---


def _id_candidates(frame: pd.DataFrame, exclude: set[str]) -> list[str]:
    n = len(frame)
    found = []
    for column in frame.columns:
        series = frame[column]
        if column in exclude or series.isna().any() or is_bool(series) or is_datetime(series):
            continue
        usable = (is_number(series) and whole_numbers(series)) or is_text(series)
        if usable and series.nunique() == n:
            found.append(str(column))
    return found


def _infer_id(frame: pd.DataFrame, given: str | None, target: str, source: str) -> tuple[str, str]:
    if given is not None:
        if given not in frame.columns:
            raise ConfigInferenceError(f"--id column {given!r} is not in {source}")
        if given == target:
            raise ConfigInferenceError(f"--id column {given!r} is also the target")
        values = frame[given]
        nulls = int(values.isna().sum())
        if nulls:
            raise ConfigInferenceError(
                f"--id column {given!r} has {count_text(nulls)} empty value(s): every row needs an id"
            )
        duplicated = values[values.duplicated(keep=False)]
        if not duplicated.empty:
            examples = list(dict.fromkeys(plain_value(v) for v in duplicated))[:5]
            raise ConfigInferenceError(
                f"--id column {given!r} is not unique: {count_text(len(duplicated))} rows share "
                f"{count_text(duplicated.nunique())} value(s), e.g. {examples}; the frozen holdout needs one id per row"
            )
        return given, "given (--id); non-null and unique per row"
    candidates = _id_candidates(frame, {target})
    named = [c for c in candidates if looks_like_id(c)]
    if len(candidates) == 1:
        return candidates[0], "inferred: the only column unique per row"
    if named:
        others = f" (also unique: {', '.join(c for c in candidates if c != named[0])})" if len(candidates) > 1 else ""
        return named[0], f"inferred: unique per row and named like an id{others}"
    if not candidates:
        raise ConfigInferenceError(
            f"no column of {source} is unique per row without nulls, so no id column can be inferred: pass --id "
            "COLUMN (the frozen holdout hashes it; add a row id to the data if there is none)"
        )
    raise ConfigInferenceError(
        f"several columns of {source} are unique per row ({', '.join(candidates)}) and none is named like an id: "
        "pass --id COLUMN"
    )


def _infer_time(frame: pd.DataFrame, taken: set[str]) -> tuple[str | None, str, list[str]]:
    """The time column, why, and the other date/time columns (left out)."""
    found = [str(c) for c in frame.columns if c not in taken and is_datetime(frame[c])]
    if not found:
        return None, "", []
    named = [c for c in found if _TIME_NAME.search(c)]
    chosen = (named or found)[0]
    values = frame[chosen]
    parsed = values if pd.api.types.is_datetime64_any_dtype(values.dtype) else pd.to_datetime(values, format="ISO8601")
    kind = "datetime values" if parsed is values else "ISO dates in text"
    low, high = (str(t).removesuffix(" 00:00:00") for t in (parsed.min(), parsed.max()))
    note = f"{kind}, {low} .. {high}: the model card's training window; not a model feature"
    return chosen, note, [c for c in found if c != chosen]


def _calendar_parts(frame: pd.DataFrame, columns: list[str]) -> list[str]:
    """All calendar parts, without the hour when every value of these columns is at midnight (dates)."""
    parts = ["hour", "weekday", "month", "day_of_year"]
    for column in columns:
        stamps = as_utc(frame[column]).dropna()
        if (stamps.dt.hour != 0).any() or (stamps.dt.minute != 0).any():
            return parts
    return parts[1:]


# --- the whole config ---


@dataclass(frozen=True)
class InferenceRequest:
    """What `mlops data init` is asked: where the snapshot was read from, its format, the target, and choices.

    Attributes:
        source: Where the rows were read from; written as the config's `source`.
        fmt: `csv`, `parquet` or `sql`.
        target: The target column.
        id_column: The id column; inferred when None (a column unique per row).
        task: The task; inferred from the target when None.
        name: Dataset and model name; from the source's name when None.
        query: With format sql, the query whose result the rows are; written as the config's `query`.
        password_env: With format sql, the environment variable holding the database password.
    """

    source: str
    fmt: str
    target: str
    id_column: str | None = None
    task: TaskType | None = None
    name: str | None = None
    query: str | None = None
    password_env: str = "PGPASSWORD"


def infer_config(
    frame: pd.DataFrame, request: InferenceRequest, *, rules: InferenceRules = DEFAULT_RULES
) -> InferredConfig:
    """Infer a dataset config from the rows of a snapshot.

    Args:
        frame: The snapshot's rows, as the training flow would load them.
        request: Their source and format, the target, and the id column, task and name if given.
        rules: Caps and margins of the inference.

    Returns:
        The config (validated, also through its YAML text) with the reason for each choice.

    Raises:
        ConfigInferenceError: the data cannot give a valid config (missing or constant target, no id, no
            usable feature, no rows); the message names the column or the source.
    """
    source = request.source
    if frame.shape[1] == 0 or len(frame) == 0:
        raise ConfigInferenceError(f"{source}: the snapshot has no rows (columns: {list(map(str, frame.columns))})")
    choices = _choose(frame, request, rules)
    config = _validated_config(choices, request, rules, len(frame))
    notes = _notes(choices, request, rules, len(frame))
    inferred = InferredConfig(config, notes, choices.feature_notes, choices.left_out, _header(frame, source, rules))
    try:
        parsed = parse_dataset_config(inferred.to_yaml(), f"the YAML inferred for {source}")
    except DatasetConfigError as exc:
        raise ConfigInferenceError(str(exc)) from exc
    if parsed != config:  # the YAML must say exactly what was inferred
        raise ConfigInferenceError(f"the YAML rendered for {source} does not read back to the inferred config")
    return inferred


@dataclass(frozen=True)
class _Choices:
    """What the data decided: task, classes, id and time columns and features, each with its reason."""

    task: TaskType
    task_note: str
    classes: list[Any] | None
    classes_note: str
    id_column: str
    id_note: str
    time_column: str | None
    time_note: str
    calendar_parts: list[str]
    features: list[Feature]
    feature_notes: dict[str, str]
    left_out: dict[str, str]


def _choose(frame: pd.DataFrame, request: InferenceRequest, rules: InferenceRules) -> _Choices:
    source, target = request.source, request.target
    values = _check_target(frame, target, source)
    chosen_task, task_note = _infer_task(values, request.task, rules)
    classes, classes_note = (
        _classes(values) if chosen_task.is_classification else (None, "not used: regression has no classes")
    )
    id_name, id_note = _infer_id(frame, request.id_column, target, source)
    time_name, time_note, other_times = _infer_time(frame, {target, id_name})
    time_note = time_note or "none: no date/time column found"
    taken = {target, id_name, *([time_name] if time_name else []), *other_times}
    features, feature_notes, left_out = infer_features(frame, taken, rules)
    for column in other_times:
        feature, note = datetime_feature(column, frame[column], rules)
        features.append(feature)
        feature_notes[column] = note
    leaks = {
        leak.column: leak
        for leak in find_leaks(
            frame,
            target,
            chosen_task.is_classification,
            [Candidate(f.name, f.type.value) for f in features],
            time_name,
        )
    }
    features = [f for f in features if f.name not in leaks]
    left_out |= {c: f"{c} may leak the target ({leak.check}): {leak.detail}" for c, leak in leaks.items()}
    if not features:
        reasons = "; ".join(left_out.values()) or "no columns besides the target, id and time"
        raise ConfigInferenceError(f"no usable feature in {source}: {reasons}")
    return _Choices(
        chosen_task,
        task_note,
        classes,
        classes_note,
        id_name,
        id_note,
        time_name,
        time_note,
        _calendar_parts(frame, [c for c in (time_name, *other_times) if c]),
        features,
        feature_notes,
        left_out,
    )


def _validated_config(choices: _Choices, request: InferenceRequest, rules: InferenceRules, rows: int) -> DatasetConfig:
    dataset = request.name or dataset_name(request.source)
    raw = {
        "name": dataset,
        "model_name": dataset,
        "source": request.source,
        "format": request.fmt,
        **({"query": request.query, "password_env": request.password_env} if request.fmt == "sql" else {}),
        "target": request.target,
        "task": choices.task.value,
        "classes": choices.classes,
        "id_column": choices.id_column,
        "time_column": choices.time_column,
        **({"time_features": True, "calendar_parts": choices.calendar_parts} if choices.time_column else {}),
        "min_rows": max(1, min(rules.min_rows_cap, rows // 2)),
        "max_null_fraction": rules.null_margin,
        "holdout_fraction": rules.holdout_fraction,
        "features": [f.model_dump(exclude_none=True, mode="json") for f in choices.features],
    }
    try:
        return DatasetConfig.model_validate(raw)
    except ValueError as exc:  # a bug here, not the user's: say what was built
        raise ConfigInferenceError(f"the inferred config for {request.source} is not valid: {exc}") from exc


_FILE_NOTES = {"source": "where the snapshot was read from", "format": "file format of the snapshot"}
_SQL_NOTES = {
    "source": "the database (no password here: it is read from password_env)",
    "format": "sql: the query's result is the snapshot, frozen as one Parquet object",
    "query": "--query (ORDER BY the id keeps the data version stable)",
    "password_env": "the environment variable holding the database password",
}


def _notes(choices: _Choices, request: InferenceRequest, rules: InferenceRules, rows: int) -> dict[str, str]:
    """The reason for each top-level field, as the YAML comments it."""
    return {
        "name": "from --name" if request.name else "from the source's name (--name to choose)",
        "model_name": "registered model name in MLflow",
        **(_SQL_NOTES if request.fmt == "sql" else _FILE_NOTES),
        "target": "--target",
        "task": choices.task_note,
        "classes": choices.classes_note,
        "id_column": choices.id_note,
        "time_column": choices.time_note,
        "time_features": "the time column's calendar parts are features: a prediction request carries it too",
        "calendar_parts": "hour only when the times have one",
        "min_rows": f"min({rules.min_rows_cap}, half the {count_text(rows)} rows seen): fewer rows are rejected",
        "max_null_fraction": f"default null tolerance for the features seen without nulls (margin {rules.null_margin})",
        "holdout_fraction": "share of ids kept out of training, frozen by a hash of the id",
    }


def _header(frame: pd.DataFrame, source: str, rules: InferenceRules) -> str:
    """The YAML's opening comment: where it came from, what to do next, and the rules (`RULES`)."""
    return (
        f"Dataset config written by `mlops data init` from {source}\n"
        f"({count_text(len(frame))} rows, {frame.shape[1]} columns). Check it, then: mlops train --config FILE\n\n"
        + RULES.format(
            max_classes=rules.max_classes,
            margin_pct=f"{100 * rules.range_margin:g} %",
            max_categories=rules.max_categories,
            null_margin=rules.null_margin,
            min_rows_cap=rules.min_rows_cap,
        )
    )


# --- YAML ---
