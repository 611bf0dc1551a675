"""The configuration reference of the docs site, generated from the pydantic models themselves.

`docs/gen_reference.py` (run by `mkdocs build` through mkdocs-gen-files) writes `reference/configuration.md`
with `configuration_reference()`: the environment variables (`adapters.settings.Settings`), the dataset
config's fields (`DatasetConfig` and its sections) and the flows' parameters. Each row is a field's name,
type, default and description as the code declares them, so the page cannot drift from the code.
"""

from __future__ import annotations

from pathlib import PurePath
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _type(field: FieldInfo) -> str:
    annotation = field.annotation
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    return _cell(text or str(annotation).replace("typing.", ""))


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        try:
            value: Any = field.default_factory()  # type: ignore[call-arg]
        except TypeError:
            return "(computed)"
        return "(defaults below)" if isinstance(value, BaseModel) else f"`{value!r}`"
    if field.default is PydanticUndefined:
        return "required"
    if field.default is None:
        return "none"
    if hasattr(field.default, "get_secret_value"):
        return "(secret)"
    value = getattr(field.default, "value", field.default)  # an enum member: its value
    return f"`{value}`" if isinstance(value, PurePath) else f"`{value!r}`"


def env_names(name: str, field: FieldInfo, prefix: str) -> str:
    """The environment variable(s) a settings field is read from."""
    alias = field.validation_alias
    choices = getattr(alias, "choices", None)
    if choices:
        names = [str(c) for c in choices if str(c).isupper()]
        if names:
            return ", ".join(f"`{n}`" for n in names)
    return f"`{prefix}{name.upper()}`"


def settings_table(model: type[BaseModel], prefix: str) -> list[str]:
    """A Markdown table of a settings model: variable, type, default, description."""
    rows = ["| variable | type | default | description |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        rows.append(
            f"| {env_names(name, field, prefix)} | {_type(field)} | {_default(field)} | "
            f"{_cell(field.description or '')} |"
        )
    return rows


def model_table(model: type[BaseModel]) -> list[str]:
    """A Markdown table of a pydantic model's fields: field, type, default, description."""
    rows = ["| field | type | default | description |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        description = field.description or field.title or ""
        rows.append(f"| `{name}` | {_type(field)} | {_default(field)} | {_cell(description)} |")
    return rows


def configuration_reference() -> str:
    """The whole reference page."""
    from adapters.settings import Settings
    from core.data.dataset import DatasetConfig, Feature, LightGBMParams, SliceSpec
    from core.data.operations import Operations
    from core.evaluation.decision import Gates
    from core.modeling.search import SearchSpec
    from core.monitoring.drift import DriftThresholds
    from flows.monitoring import MonitoringParams
    from flows.rollback import RollbackParams
    from flows.scoring import ScoringParams
    from flows.training import TrainingParams

    prefix = Settings.model_config.get("env_prefix", "")
    sections: list[tuple[str, str, list[str]]] = [
        ("Environment variables", "Read by every command, flow, worker and the serving API (or `.env`).",
         settings_table(Settings, prefix)),
        ("Dataset config", "A model's YAML file (`mlops data init` writes one; `mlops models add` stores it).",
         model_table(DatasetConfig)),
        ("features[]", "One entry per feature column.", model_table(Feature)),
        ("slices[]", "Sub-populations of the holdout measured on their own.", model_table(SliceSpec)),
        ("operations", "How the model is run once in the catalog.", model_table(Operations)),
        ("operations.search, and the training form's search", "Model search.", model_table(SearchSpec)),
        ("operations.gates, and the training form's gates", "Promotion gates.", model_table(Gates)),
        ("lightgbm", "Not used: the search's lightgbm family chooses these (kept so older configs load).",
         model_table(LightGBMParams)),
        ("Training parameters", "`training/<model>`'s form in the Prefect UI.", model_table(TrainingParams)),
        ("Monitoring parameters", "`monitoring/<model>`'s form.", model_table(MonitoringParams)),
        ("Drift thresholds", "The monitoring form's thresholds.", model_table(DriftThresholds)),
        ("Scoring parameters", "`scoring/<model>`'s form.", model_table(ScoringParams)),
        ("Rollback parameters", "`rollback/<model>`'s form.", model_table(RollbackParams)),
    ]  # fmt: skip
    lines = [
        "# Configuration reference",
        "",
        "Generated from the pydantic models when the site is built (`mlops/reference.py`): it says what the "
        "code declares.",
        "",
    ]
    for title, intro, table in sections:
        lines += [f"## {title}", "", intro, "", *table, ""]
    return "\n".join(lines)
