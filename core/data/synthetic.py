"""Deterministic synthetic credit-risk data (the bundled default dataset).

Realistic enough to matter: numeric and categorical features, missing values, income outliers, about
15 % defaults, a non-linear signal (utilisation threshold, debt-to-income x term, age U-shape) that a
boosted model learns and a stump cannot, and a drift knob that shifts later months' distributions and
the relationship itself. Pure functions: the S3 upload lives in `mlops.datagen`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

EMPLOYMENT = ["salaried", "self_employed", "contractor", "unemployed", "retired"]
HOME = ["own", "mortgage", "rent", "other"]
PURPOSE = ["debt_consolidation", "home_improvement", "car", "education", "business", "medical", "other"]
REGION = ["north", "south", "east", "west", "central"]

_EMPLOYMENT_P = np.array([0.62, 0.14, 0.12, 0.05, 0.07])
_EMPLOYMENT_RISK = np.array([0.0, 0.35, 0.45, 1.2, 0.1])
_HOME_P = np.array([0.25, 0.35, 0.36, 0.04])
_HOME_RISK = np.array([-0.25, -0.1, 0.2, 0.3])
_PURPOSE_P = np.array([0.38, 0.14, 0.16, 0.08, 0.09, 0.06, 0.09])
_PURPOSE_RISK = np.array([0.1, -0.15, -0.2, 0.25, 0.45, 0.3, 0.05])
_REGION_P = np.array([0.22, 0.2, 0.2, 0.2, 0.18])
_REGION_RISK = np.array([0.0, 0.15, -0.05, -0.1, 0.05])
_INTERCEPT = -3.0  # sets the base default rate near 15 %


@dataclass(frozen=True)
class DriftSpec:
    """Shift months from `start_month` (0-based) on, by `strength` (0 none .. 1 strong)."""

    start_month: int
    strength: float


def _month_label(start: str, index: int) -> pd.Period:
    return pd.Period(start, freq="M") + index


def _choice(rng: np.random.Generator, names: list[str], p: np.ndarray, n: int) -> np.ndarray:
    return rng.choice(len(names), size=n, p=p / p.sum())


def generate_month(
    month_index: int, n_rows: int, seed: int, start: str = "2025-01", drift: DriftSpec | None = None
) -> pd.DataFrame:
    """One month of applications; identical for identical arguments, independent of other months."""
    rng = np.random.default_rng([seed, month_index])
    period = _month_label(start, month_index)
    d = drift.strength if drift is not None and month_index >= drift.start_month else 0.0
    # One generator, drawn in a fixed order: applicants, their defaults, the flaws, then the dates.
    a = _applicants(rng, n_rows, d)
    default = _defaults(rng, a, d)
    income, history, employment = _with_flaws(rng, a)
    days = rng.integers(0, period.days_in_month, n_rows)
    return pd.DataFrame(
        {
            "application_id": [f"A{period.year:04d}{period.month:02d}{i:07d}" for i in range(n_rows)],
            "application_date": (period.start_time + pd.to_timedelta(days, unit="D")).values.astype("datetime64[ns]"),
            "age": a.age,
            "annual_income": income,
            "loan_amount": a.loan_amount,
            "loan_term_months": a.term,
            "debt_to_income": a.dti.round(4),
            "credit_utilization": a.utilization.round(4),
            "credit_history_years": history,
            "num_open_accounts": a.accounts,
            "num_delinquencies": a.delinquencies,
            "employment_type": employment,
            "home_ownership": np.asarray(HOME, dtype=object)[a.home],
            "loan_purpose": np.asarray(PURPOSE, dtype=object)[a.purpose],
            "region": np.asarray(REGION, dtype=object)[a.region],
            "default": default,
        }
    )


@dataclass(frozen=True)
class _Applicants:
    """A month's applicants as drawn, before flaws: numbers, and categories as codes into their lists."""

    employment: np.ndarray
    home: np.ndarray
    purpose: np.ndarray
    region: np.ndarray
    age: np.ndarray
    income: np.ndarray
    loan_amount: np.ndarray
    term: np.ndarray
    dti: np.ndarray
    utilization: np.ndarray
    history: np.ndarray
    accounts: np.ndarray
    delinquencies: np.ndarray


def _applicants(rng: np.random.Generator, n_rows: int, d: float) -> _Applicants:
    """Draw the applicants; drift `d` shifts employment, region, income and utilisation."""
    employment = _choice(rng, EMPLOYMENT, _EMPLOYMENT_P + d * np.array([-0.2, 0.0, 0.12, 0.08, 0.0]), n_rows)
    home = _choice(rng, HOME, _HOME_P, n_rows)
    purpose = _choice(rng, PURPOSE, _PURPOSE_P, n_rows)
    region = _choice(rng, REGION, _REGION_P + d * np.array([-0.1, 0.15, 0.0, -0.05, 0.0]), n_rows)

    age = np.clip(rng.normal(41, 12, n_rows), 18, 90).round()
    income = np.exp(rng.normal(np.log(52_000) - 0.25 * d, 0.45, n_rows))
    income[employment == EMPLOYMENT.index("unemployed")] *= 0.35
    loan_amount = np.clip(np.exp(rng.normal(np.log(14_000), 0.7, n_rows)), 500, 1_000_000).round(-1)
    term = rng.choice([12, 24, 36, 48, 60, 72], size=n_rows, p=[0.08, 0.17, 0.35, 0.15, 0.2, 0.05]).astype(float)
    dti = np.clip(rng.gamma(2.2, 0.13, n_rows) + loan_amount / income * 0.15, 0, 10)
    utilization = np.clip(rng.beta(2.0, 3.2 - 1.2 * d, n_rows) * 1.15, 0, 1.5)
    history = np.clip(age - 18 - rng.uniform(0, 8, n_rows), 0, 80).round(1)
    accounts = np.clip(rng.poisson(4 + history / 6), 0, 60).astype(float)
    delinquencies = np.clip(rng.poisson(0.25 + 0.8 * (utilization > 0.9)), 0, 40).astype(float)
    return _Applicants(
        employment,
        home,
        purpose,
        region,
        age,
        income,
        loan_amount,
        term,
        dti,
        utilization,
        history,
        accounts,
        delinquencies,
    )


def _defaults(rng: np.random.Generator, a: _Applicants, d: float) -> np.ndarray:
    """Whether each applicant defaults (0/1), drawn from the true risk; drift `d` changes the relationship."""
    n_rows = len(a.age)
    # Signal: non-linear in utilisation (threshold), age (U-shape), dti x term interaction.
    z = (
        _INTERCEPT
        + 2.0 * (a.utilization > 0.75)
        + 0.9 * np.maximum(a.utilization - 0.9, 0) * 4
        + 0.012 * (a.age - 45) ** 2 / 10
        + 1.2 * a.dti * (a.term / 36)
        - 0.55 * np.log(a.income / 50_000)
        + 0.45 * a.delinquencies
        - 0.02 * a.history
        + _EMPLOYMENT_RISK[a.employment]
        + _HOME_RISK[a.home]
        + _PURPOSE_RISK[a.purpose]
        + _REGION_RISK[a.region]
        + rng.normal(0, 0.3, n_rows)
    )
    # Concept drift: the same utilisation means more risk, income protects less.
    z += d * (0.9 * a.utilization + 0.35 * np.log(a.income / 50_000) - 0.3)
    return (rng.uniform(size=n_rows) < 1 / (1 + np.exp(-z))).astype("int64")


def _with_flaws(rng: np.random.Generator, a: _Applicants) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Outliers and missing values, as real feeds have them: income, credit history and employment labels."""
    n_rows = len(a.age)
    income = a.income.copy()
    outliers = rng.uniform(size=n_rows) < 0.005
    income[outliers] = rng.uniform(1_000_000, 9_000_000, outliers.sum())
    income = np.clip(income, 0, 10_000_000).round(-1)
    income[rng.uniform(size=n_rows) < 0.05] = np.nan
    history = a.history.copy()
    history[rng.uniform(size=n_rows) < 0.03] = np.nan
    employment = np.asarray(EMPLOYMENT, dtype=object)[a.employment]
    employment[rng.uniform(size=n_rows) < 0.02] = None
    return income, history, employment


def generate_months(
    n_months: int, rows_per_month: int, seed: int = 42, start: str = "2025-01", drift: DriftSpec | None = None
) -> dict[str, pd.DataFrame]:
    """Several months, keyed "YYYY-MM"."""
    return {str(_month_label(start, i)): generate_month(i, rows_per_month, seed, start, drift) for i in range(n_months)}


def generate_frame(
    n_rows: int, seed: int = 42, n_months: int = 12, start: str = "2025-01", drift: DriftSpec | None = None
) -> pd.DataFrame:
    """`n_rows` rows spread over `n_months` months, in one frame (benchmarks, tests)."""
    sizes = [n_rows // n_months + (1 if i < n_rows % n_months else 0) for i in range(n_months)]
    return pd.concat(
        [generate_month(i, size, seed, start, drift) for i, size in enumerate(sizes) if size],
        ignore_index=True,
    )


HISTORY_EVENT_COLUMNS = ["application_id", "event_timestamp", "delinquent", "utilization"]


def generate_history(applications: pd.DataFrame, seed: int = 42, future_share: float = 0.3) -> pd.DataFrame:
    """Credit-bureau style events of each application's applicant: one row per past account event.

    Each event is a previous application (`delinquent` 1 when that account went delinquent) with the
    utilisation reported then. Events fall in the two years before the application date, a Poisson
    count per applicant that grows with the applicant's open accounts (some applicants have none, so
    their rows get no store features: the join must count them). A share `future_share` of applicants also
    gets one event AFTER the application date, delinquent exactly when the application defaulted: a
    feature leaking it would make training look far better than it is, so point-in-time joins must skip it.
    Deterministic for a given frame and seed. Entity key: `application_id`.
    """
    rng = np.random.default_rng([seed, 17])
    n = len(applications)
    ids = applications["application_id"].to_numpy()
    at = pd.to_datetime(applications["application_date"]).to_numpy()
    utilization = applications["credit_utilization"].to_numpy(dtype=float)
    delinquencies = applications["num_delinquencies"].to_numpy(dtype=float)
    counts = rng.poisson(1.0 + applications["num_open_accounts"].to_numpy(dtype=float) / 3)
    owner = np.repeat(np.arange(n), counts)
    days_before = rng.uniform(1, 730, owner.size)
    past = pd.DataFrame(
        {
            "application_id": ids[owner],
            "event_timestamp": at[owner] - pd.to_timedelta(days_before, unit="D").to_numpy(),
            # Past delinquencies and utilisation track the application's own (the signal a model can use).
            "delinquent": (rng.uniform(size=owner.size) < 0.05 + 0.25 * np.minimum(delinquencies[owner], 2)).astype(
                "int64"
            ),
            "utilization": np.clip(utilization[owner] + rng.normal(0, 0.15, owner.size), 0, 1.5).round(4),
        }
    )
    later = np.flatnonzero(rng.uniform(size=n) < future_share)
    future = pd.DataFrame(
        {
            "application_id": ids[later],
            "event_timestamp": at[later] + pd.to_timedelta(rng.uniform(1, 90, later.size), unit="D").to_numpy(),
            "delinquent": applications["default"].to_numpy()[later].astype("int64"),
            "utilization": np.full(later.size, 1.5),
        }
    )
    events = pd.concat([past, future], ignore_index=True)
    events["event_timestamp"] = events["event_timestamp"].dt.floor("s").dt.tz_localize("UTC")
    return events.sort_values(["application_id", "event_timestamp"], ignore_index=True)[HISTORY_EVENT_COLUMNS]
