"""What kind of column a pandas Series is (text, number, bool, dates, an id), and how its numbers print."""

from __future__ import annotations

import logging
import math
import re
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)


def count_text(n: int) -> str:
    """A count with thousands separators."""
    return f"{n:,}"


def plain_number(value: float) -> int | float:
    """A YAML-friendly Python number (no numpy types; whole floats as ints)."""
    value = float(value)
    return int(value) if value.is_integer() and abs(value) < 2**53 else value


def show_number(value: float) -> str:
    """A number as the YAML comments show it (up to 6 significant digits)."""
    return f"{plain_number(value):.6g}" if isinstance(plain_number(value), float) else str(plain_number(value))


def nulls_text(share: float) -> str:
    """A null share as the comments say it."""
    return "no nulls" if share == 0 else f"{100 * share:.1f} % null"


def round_up(value: float, decimals: int = 2) -> float:
    """Round up to `decimals` places (null tolerances never round below what was seen)."""
    scale = 10**decimals
    return math.ceil(round(value * scale, 6)) / scale


def is_text(series: pd.Series) -> bool:
    """Whether a column holds text."""
    dtype = series.dtype
    return (
        pd.api.types.is_object_dtype(dtype)
        or pd.api.types.is_string_dtype(dtype)
        or isinstance(dtype, pd.CategoricalDtype)
    )


def is_number(series: pd.Series) -> bool:
    """Whether a column holds numbers (not booleans)."""
    dtype = series.dtype
    return (
        pd.api.types.is_numeric_dtype(dtype)
        and not pd.api.types.is_bool_dtype(dtype)
        and not pd.api.types.is_complex_dtype(dtype)
    )


def is_bool(series: pd.Series) -> bool:
    """Whether a column holds true/false values only."""
    if pd.api.types.is_bool_dtype(series.dtype):
        return True
    values = series.dropna()
    return (
        pd.api.types.is_object_dtype(series.dtype)
        and not values.empty
        and bool(values.map(lambda v: isinstance(v, bool | np.bool_)).all())
    )


def plain_value(value: Any) -> Any:
    """A numpy scalar as the Python value it holds (for messages and YAML)."""
    return value.item() if hasattr(value, "item") else value


def whole_numbers(values: pd.Series) -> bool:
    """Whether every value is a whole number."""
    numbers = values.astype("float64")
    return bool(((numbers % 1) == 0).all())


def is_datetime(series: pd.Series) -> bool:
    """Datetime values, or text whose every value is an ISO date (YYYY-MM-DD...)."""
    values = series.dropna()
    if values.empty:
        return False
    if pd.api.types.is_datetime64_any_dtype(series.dtype):
        return True
    if not is_text(series):
        return False
    for part in (values.iloc[:DATE_SAMPLE], values):  # most text columns fail on the first values
        if not part.map(lambda v: isinstance(v, str) and bool(ISO_DATE.match(v))).all():
            return False
        if pd.to_datetime(part, format="ISO8601", errors="coerce").isna().any():
            return False
    return True


def looks_like_id(name: str) -> bool:
    """Whether a column name reads like an id (`id`, `*_id`, `id_*`, `*Id`)."""
    lower = name.lower()
    return (
        lower in {"id", "uuid", "guid"}
        or lower.endswith(("_id", "-id", " id"))
        or lower.startswith(("id_", "id-", "id "))
        or bool(re.search(r"[a-z0-9](Id|ID)$", name))
    )


ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}")


DATE_SAMPLE = 200  # text values tried as dates before the whole column is
