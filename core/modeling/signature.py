"""A model's input schema from its MLflow signature: which columns, numeric or text (pure: reads the object)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


BASELINE_ARTIFACT = "explain/baseline.json"  # written by tasks.tracking.log_model


NUMERIC_TYPES = {"double", "float", "long", "integer"}


TEXT_TYPES = {"string"}


class ModelLoadError(RuntimeError):
    """A model version could not be loaded or is not servable; the model already served stays.

    `refused`: its stored artifact failed the checks (not the one training recorded, or not loadable safely).
    """

    def __init__(self, message: str, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


@dataclass(frozen=True)
class Column:
    """One input column of the model's signature."""

    name: str
    kind: str  # "numeric" or "text"


def columns_from_signature(signature: Any) -> list[Column]:
    """Input columns of an MLflow signature; raises ModelLoadError for a schema we cannot serve."""
    if signature is None or signature.inputs is None:
        raise ModelLoadError("the model has no input signature, so requests cannot be checked")
    columns = []
    for spec in signature.inputs.inputs:
        type_name = getattr(getattr(spec, "type", None), "name", str(getattr(spec, "type", "")))
        if spec.name is None:
            raise ModelLoadError("the model's signature has unnamed inputs (tensor-based); records need names")
        if type_name in NUMERIC_TYPES:
            columns.append(Column(spec.name, "numeric"))
        elif type_name in TEXT_TYPES:
            columns.append(Column(spec.name, "text"))
        else:
            raise ModelLoadError(f"signature column {spec.name!r} has type {type_name!r}, which is not served")
    return columns
