"""The model catalog's pure parts: checking an entry's operations and the `mlops models list` table."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from pydantic import ValidationError

from core.data.dataset import DatasetConfig
from core.evaluation.decision import Gates, resolve_gates
from core.modeling.search import SearchSpec


class CatalogConfigError(ValueError):
    """A config the catalog refuses; the message names the model and the field."""


def checked_gates(config: DatasetConfig) -> Gates:
    """The config's `operations.gates` as Gates, resolved for its task; CatalogConfigError naming the field."""
    model = config.model_name
    try:
        gates = Gates.model_validate(config.operations.gates)
        return resolve_gates(gates, config.task)
    except ValidationError as exc:
        problems = "; ".join(
            f"operations.gates.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise CatalogConfigError(f"model {model!r}: {problems}") from exc
    except ValueError as exc:
        raise CatalogConfigError(f"model {model!r}: operations.{exc}") from exc


def checked_search(config: DatasetConfig) -> SearchSpec:
    """The config's `operations.search` as a SearchSpec; CatalogConfigError naming the field."""
    try:
        return SearchSpec.model_validate(config.operations.search)
    except ValidationError as exc:
        problems = "; ".join(
            f"operations.search.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise CatalogConfigError(f"model {config.model_name!r}: {problems}") from exc


@dataclass(frozen=True)
class ModelStatus:
    """One line of `mlops models list`: what a catalog model's loop last did and does next."""

    name: str
    champion: str | None = None
    metric: str | None = None
    metric_value: float | None = None
    last_training: str | None = None
    last_training_at: datetime | None = None
    next_training_at: datetime | None = None
    monitoring: str | None = None
    monitoring_at: datetime | None = None
    serving: str = "-"

    def row(self) -> dict[str, str]:
        """The table row, every cell as text ('-' for unknown)."""
        metric = f"{self.metric} {self.metric_value:.4f}" if self.metric and self.metric_value is not None else "-"
        return {
            "model": self.name,
            "champion": f"v{self.champion}" if self.champion else "-",
            "metric": metric,
            "last training": _when(self.last_training, self.last_training_at),
            "next training": _at(self.next_training_at),
            "monitoring": _when(self.monitoring, self.monitoring_at),
            "serving": self.serving,
        }


def _at(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M") if moment else "-"


def _when(what: str | None, moment: datetime | None) -> str:
    return f"{what} {_at(moment)}" if what else "-"


def table(rows: list[dict[str, str]]) -> list[str]:
    """Rows as aligned text lines, a header first."""
    if not rows:
        return []
    keys = list(rows[0])
    widths = {key: max(len(key), *(len(row[key]) for row in rows)) for key in keys}
    lines = ["  ".join(key.ljust(widths[key]) for key in keys).rstrip()]
    lines += ["  ".join(row[key].ljust(widths[key]) for key in keys).rstrip() for row in rows]
    return lines
