"""What a model search gives: every trial's cross-validated score, the choice among them and the refitted model.

`choose` picks the best complete trial; a degenerate one (the constant predictor's CV score) only when
every trial is (see `core/modeling/search.py`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from sklearn.pipeline import Pipeline

from core.modeling.calibration import Calibration
from core.modeling.training_record import TrainingRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Trial:
    """One configuration's cross-validated score (in the scorer's higher-is-better sense)."""

    family: str
    params: dict[str, Any]
    cv_mean: float
    cv_std: float
    seconds: float
    number: int = 0
    state: str = "complete"  # complete | pruned | degenerate
    folds: int = 0


@dataclass(frozen=True)
class SearchResult:
    """The refitted best pipeline and every trial behind the choice.

    `model` is what is shipped: the chosen configuration refitted on all training rows, inside a
    `CalibratedClassifierCV` when `calibration` chose a method (`core.modeling.calibration.base_classifier`
    reaches the refitted estimator either way). `calibration` is None for a regressor, or when no
    calibration step ran. `record` says where the search and the final fit ran and on how many rows (set by
    `tasks.preparation.fit_candidate`; None for a bare search).
    """

    model: Pipeline = field(repr=False)
    family: str
    params: dict[str, Any]
    cv_mean: float
    scoring: str
    trials: list[Trial]
    metric: str = ""
    baseline: float = math.nan
    calibration: Calibration | None = None
    record: TrainingRecord | None = None

    @property
    def record_tags(self) -> dict[str, str]:
        """The run's `training.*` tags: what ran where, on how many rows (none without a record)."""
        return self.record.tags() if self.record is not None else {}

    @property
    def record_card(self) -> dict[str, str]:
        """The model card's "Training: what ran where" rows (empty without a record)."""
        return self.record.card_rows() if self.record is not None else {}

    @property
    def calibration_summary(self) -> str | None:
        """The model card's line on calibration (None when no calibration step ran)."""
        return None if self.calibration is None else self.calibration.summary()

    @property
    def cv_metric(self) -> float:
        """The chosen trial's CV score as its metric reads (e.g. RMSE positive)."""
        return self.cv_mean if self.metric in ("", self.scoring) else -self.cv_mean

    def trials_frame(self) -> pd.DataFrame:
        """Trials as a table (for the run's artifacts)."""
        return pd.DataFrame(
            [
                {
                    "number": t.number,
                    "family": t.family,
                    "state": t.state,
                    "folds": t.folds,
                    "cv_mean": t.cv_mean,
                    "cv_std": t.cv_std,
                    "seconds": t.seconds,
                }
                | {f"param_{k}": v for k, v in t.params.items()}
                for t in self.trials
            ]
        )


def choose(trials: list[Trial]) -> Trial:
    """The best complete trial; degenerate trials only when nothing else completed (earliest wins ties).

    Raises:
        ValueError: No trial completed (every one was pruned, which the pruner's start-up trials prevent).
    """
    complete = [t for t in trials if t.state == "complete"]
    if not complete:
        complete = [t for t in trials if t.state == "degenerate"]
        if complete:
            log.warning("every trial scored the constant predictor's CV score: the chosen model is degenerate")
    if not complete:
        raise ValueError("no search trial completed")
    return max(complete, key=lambda t: (t.cv_mean, -t.number))
