"""A served model: the fitted pipeline, its input schema (from the MLflow signature) and its registry facts.

A classifier (binary or multiclass: `predict_proba` and `classes_`) answers probabilities for every class;
a regressor (`predict`, no `classes_`) answers its predicted value. `LoadedModel.task` says which.

The record schema is derived from the model's signature, so a request is checked against what the model
was trained on: every signature column must be present (null is allowed; the pipeline imputes it),
numbers must be numbers and text must be text. Unknown categories pass: the pipeline's one-hot encoder
ignores them, exactly as in training.

Inference form (`LoadedModel.inference`, reported by `GET /model` and `/metrics`): the compiled ONNX
graph when the version's parity check passed in training (version tag `inference_form=onnx`), else the
pipeline's exact array form when it was bit-identical there (`exact-arrays`), else the plain pipeline.
At load the chosen form is checked once more against the pipeline on a row of nulls and the explanation
baseline; a form that disagrees (or an ONNX file that cannot be read) falls back to the next one, with
the reason in `/model`.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
import numpy as np
import pandas as pd
from pydantic import Field, TypeAdapter
from typing_extensions import TypedDict

from adapters.model_store import load_registered, run_bytes, run_json
from adapters.registry import holdout_metrics
from adapters.settings import Settings, get_settings
from core.inference.compiled import ONNX_ARTIFACT, TOLERANCE, ArrayForm, OnnxForm, check_parity
from core.modeling.artifacts import ONNX_DIGEST_TAG, UntrustedArtifactError, check_digest
from core.modeling.signature import BASELINE_ARTIFACT, Column, ModelLoadError, columns_from_signature

log = logging.getLogger(__name__)

Number = Annotated[float, Field(allow_inf_nan=False)]
_LARGEST = float(np.finfo("float64").max)
FiniteNumber = Annotated[float, msgspec.Meta(ge=-_LARGEST, le=_LARGEST)]  # msgspec's form of `Number`
BODY_KEYS = ("records", "dataframe_records")
# The integers orjson reads as integers (64-bit signed or unsigned); beyond them it reads a float.
JSON_INTS = range(-(2**63), 2**64)
_FLOAT = np.dtype("float64")
_SERIALS = itertools.count(1)  # LoadedModel.serial: never reused in a process, unlike id()


class RecordSchema:
    """The model's record schema, checked two ways with the same rules.

    Every column present, nulls allowed, numbers as numbers, text as text, no coercion; other keys ignored.

    - `decode`: a whole request body decoded and checked in one pass by msgspec (C code, no per-record
      Python), records as structs in signature order plus the id field; None when anything is off;
    - `validate_python`: pydantic's strict check of decoded records, which names every failing record and
      field: what answers a body `decode` rejected.
    """

    def __init__(self, columns: list[Column], id_field: str | None = None) -> None:
        fields = {c.name: (Number | None) if c.kind == "numeric" else (str | None) for c in columns}
        record = TypedDict("Record", fields)  # type: ignore[operator]  # functional form: any column name
        self.adapter = TypeAdapter(list[record], config={"strict": True})
        # Struct attributes f0, f1, ... renamed to the column names (which need not be identifiers).
        spec: list[tuple[str, Any] | tuple[str, Any, Any]] = [
            (f"f{i}", (FiniteNumber | None) if c.kind == "numeric" else (str | None)) for i, c in enumerate(columns)
        ]
        names = {f"f{i}": c.name for i, c in enumerate(columns)}
        self.id_field = id_field if id_field and id_field not in names.values() else None
        if self.id_field:
            spec.append(("record_id", str | int | None, None))
            names["record_id"] = self.id_field
        struct = msgspec.defstruct("Record", spec, rename=names)
        # UNSET: the key is absent, told apart from an explicit null (which the step-by-step checks refuse).
        records = list[struct] | None | msgspec.UnsetType  # type: ignore[valid-type]
        body = msgspec.defstruct("Body", [(key, records, msgspec.UNSET) for key in BODY_KEYS])
        self._decoder = msgspec.json.Decoder(body)

    def validate_python(self, records: list[Any]) -> list[dict[str, Any]]:
        """Records checked by pydantic; raises its ValidationError listing every failing record and field."""
        return self.adapter.validate_python(records)

    def decode(self, body: bytes, max_records: int) -> tuple[str, list[Any], list[str | None] | None] | None:
        """(key, records, their ids as text or None) of a valid body of 1..max_records records, else None.

        None whenever the step-by-step checks might answer otherwise, so that they give the answer: invalid
        UTF-8 anywhere (msgspec checks only the strings it keeps; a cheap ASCII test first, a full UTF-8
        decode only for a body that is not ASCII), nesting deeper than msgspec recurses (RecursionError),
        an explicit null under the key a body is read from (the first of `BODY_KEYS` present), an id
        integer orjson would read as a float.
        """
        try:
            if not body.isascii():
                body.decode("utf-8")
            decoded = self._decoder.decode(body)
        except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            return None
        key = "records" if decoded.records is not msgspec.UNSET else "dataframe_records"
        records = getattr(decoded, key)
        if not records or len(records) > max_records:  # also None (null) and UNSET (no key)
            return None
        ids = None
        if self.id_field:
            ids = [None if r.record_id is None else str(r.record_id) for r in records]
            # msgspec bounds stop at int64: orjson's range checked here (an integer id is rare)
            if any(type(r.record_id) is int and r.record_id not in JSON_INTS for r in records):
                return None
        return key, records, ids


def record_adapter(columns: list[Column], id_field: str | None = None) -> RecordSchema:
    """The record schema of a model with these signature columns (and id field, logged, not scored)."""
    return RecordSchema(columns, id_field)


@dataclass(frozen=True)
class LoadedModel:
    """A model version ready to predict, with what `/model` reports about it."""

    name: str
    version: str
    pipeline: Any = field(repr=False)
    columns: list[Column]
    classes: list[Any]  # in `predict_proba` column order; empty for a regressor
    run_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    promoted_at: str | None = None
    source: str | None = None
    baseline: pd.DataFrame | None = field(default=None, repr=False, compare=False)
    # The dataset's id column (version tag `id_column`): a record may carry it; it is logged, not scored.
    id_field: str | None = None
    # The feature service it was trained with (version tag `feature_service`): serving looks those features up.
    feature_service: str | None = None
    loaded_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    # A faster form of the pipeline (`core.inference.compiled.OnnxForm` or `ArrayForm`); None: the pipeline itself.
    inference: Any = field(default=None, repr=False, compare=False)
    parity: dict[str, Any] = field(default_factory=dict, compare=False)
    adapter: RecordSchema = field(init=False, repr=False, compare=False)
    # This load's number in the process, never reused (an id() is, once a swapped-out model is freed): what
    # per-model caches (the batcher's measured costs) key on.
    serial: int = field(default_factory=lambda: next(_SERIALS), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "adapter", record_adapter(self.columns, self.id_field))

    def columns_of(self, records: list[Any]) -> dict[str, np.ndarray]:
        """Validated records (dicts, or `RecordSchema.decode`'s structs) as one array per signature column.

        Numbers as float64 (NaN for null), text as object (None for null): what the compiled form is fed
        and the prediction log stores, with no DataFrame in between.
        """
        if records and not isinstance(records[0], dict):  # structs: fields in signature order, transposed in C
            values = list(zip(*map(msgspec.structs.astuple, records), strict=True))
        else:
            values = [[record[column.name] for record in records] for column in self.columns]
        if not values:  # no records: empty columns
            values = [[] for _ in self.columns]
        return {
            column.name: np.array(column_values, dtype=_FLOAT if column.kind == "numeric" else object)
            for column, column_values in zip(self.columns, values, strict=False)  # structs may end with the id
        }

    def frame(self, records: list[Any]) -> pd.DataFrame:
        """Validated records as the frame the pipeline was trained on (`columns_of`'s arrays, not copied).

        Built column by column from plain lists: about 10x faster than `DataFrame.from_records` + casts for
        small batches.
        """
        return pd.DataFrame(self.columns_of(records), copy=False)

    @property
    def task(self) -> str:
        """`regression` (no classes), `binary` (two classes) or `multiclass`."""
        return task_of(self.classes)

    def scores(self, data: pd.DataFrame | dict[str, np.ndarray]) -> np.ndarray:
        """Class probabilities (n, classes) in `classes` order, or predicted values (n,) of a regressor.

        `data`: a frame, or `columns_of`'s arrays, which the compiled form takes as they are (the other
        forms get a frame built from them).
        """
        if self.inference is not None and self.inference.takes_columns:
            return self.inference.scores(data)
        frame = data if isinstance(data, pd.DataFrame) else pd.DataFrame(data, copy=False)
        if self.inference is not None:
            return self.inference.scores(frame)
        return model_scores(self.pipeline, frame)

    @property
    def form(self) -> str:
        """`onnx`, `exact-arrays` or `pipeline`: what `scores` runs."""
        return "pipeline" if self.inference is None else self.inference.form

    def describe(self) -> dict[str, Any]:
        """What `GET /model` answers."""
        return {
            "name": self.name,
            "version": self.version,
            "task": self.task,
            "run_id": self.run_id,
            "source": self.source,
            "classes": [_plain(c) for c in self.classes],
            "inputs": [{"name": c.name, "type": c.kind} for c in self.columns],
            "id_field": self.id_field,
            "feature_service": self.feature_service,
            "metrics": self.metrics,
            "promoted_at": self.promoted_at,
            "loaded_at": self.loaded_at,
            "inference": {"form": self.form, "parity": self.parity},
        }


def task_of(classes: list[Any]) -> str:
    """The task a model's classes imply: `regression` for none, `binary` for two, else `multiclass`."""
    if not classes:
        return "regression"
    return "binary" if len(classes) == 2 else "multiclass"


def model_scores(pipeline: Any, frame: pd.DataFrame) -> np.ndarray:
    """Probabilities of a classifier, or float predicted values of a regressor (as `tasks.evaluation`)."""
    if getattr(pipeline, "classes_", None) is not None:
        return pipeline.predict_proba(frame)
    return np.asarray(pipeline.predict(frame), dtype="float64")


def check_servable(pipeline: Any, uri: str) -> list[Any]:
    """The classes of a fitted classifier with `predict_proba`, or `[]` for a regressor with `predict`.

    Raises ModelLoadError for anything else (e.g. a classifier without probabilities, or no `predict`).
    """
    classes = getattr(pipeline, "classes_", None)
    if classes is not None:
        if not hasattr(pipeline, "predict_proba"):
            raise ModelLoadError(f"{uri} is a classifier without predict_proba: it cannot give probabilities")
        return list(classes)
    if not hasattr(pipeline, "predict"):
        raise ModelLoadError(f"{uri} is neither a fitted classifier with predict_proba nor a regressor with predict")
    return []


def _baseline(run_id: str | None) -> pd.DataFrame | None:
    """The reference record stored with the model for per-prediction contributions (None if absent)."""
    if not run_id:
        return None
    try:
        records = run_json(run_id, BASELINE_ARTIFACT)
    except Exception as exc:  # an older model: it serves, without explanations
        log.info("no explanation baseline for run %s (%s)", run_id, type(exc).__name__)
        return None
    return pd.DataFrame(records)


def _probe_rows(baseline: pd.DataFrame, columns: list[Column]) -> pd.DataFrame:
    """The explanation baseline as prepared records (float64 numbers, object text with None for nulls)."""
    empty = pd.Series([None] * len(baseline), index=baseline.index, dtype=object)
    frame = pd.DataFrame({c.name: baseline.get(c.name, empty) for c in columns})
    for c in columns:
        if c.kind == "numeric":
            frame[c.name] = pd.to_numeric(frame[c.name], errors="coerce").astype("float64")
        else:
            frame[c.name] = frame[c.name].astype("object").where(frame[c.name].notna(), None)
    return frame


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _onnx_bytes(run_id: str) -> bytes:
    return run_bytes(run_id, ONNX_ARTIFACT)


def _parity_facts(tags: dict[str, str]) -> dict[str, Any]:
    """What training found (version tags), as `/model` shows it."""
    facts: dict[str, Any] = {"compiled": tags.get("compiled_parity", "not checked")}
    if "compiled_max_abs_delta" in tags:
        facts["max_abs_delta"] = float(tags["compiled_max_abs_delta"])
    facts["exact_arrays"] = tags.get("exact_arrays_parity", "not checked")
    facts["tolerance"] = TOLERANCE
    if "compiled_failure" in tags:  # why there is no compiled form (e.g. a step without an ONNX converter)
        facts["failure"] = tags["compiled_failure"]
    return facts


def choose_inference(
    pipeline: Any,
    columns: list[Column],
    tags: dict[str, str],
    run_id: str | None,
    probe: pd.DataFrame,
    onnx_bytes: Any = _onnx_bytes,
) -> tuple[Any, dict[str, Any]]:
    """The fastest form training found exact (version tags), re-checked on `probe`; (None, facts) for the pipeline.

    A form that cannot be built or disagrees with the pipeline on `probe` falls back to the next one
    (onnx -> exact-arrays -> pipeline); the reasons are listed in the facts under `fallbacks`.
    """
    facts = _parity_facts(tags)
    text = {c.name for c in columns if c.kind == "text"}
    classification = getattr(pipeline, "classes_", None) is not None
    wanted = tags.get("inference_form", "pipeline")
    candidates = []
    fallbacks = []
    if wanted == "onnx" and run_id and not tags.get(ONNX_DIGEST_TAG):
        fallbacks.append("onnx: no recorded digest of the compiled file (registered by earlier code)")
    elif wanted == "onnx" and run_id:

        def onnx_form() -> OnnxForm:
            data = onnx_bytes(run_id)
            check_digest(data, tags[ONNX_DIGEST_TAG], f"the compiled file of run {run_id}")  # before onnxruntime
            return OnnxForm(data, text, classification)

        candidates.append(("onnx", onnx_form, TOLERANCE))
    if wanted in ("onnx", "exact-arrays") and tags.get("exact_arrays_parity") == "passed":
        candidates.append(("exact-arrays", lambda: ArrayForm(pipeline, text), 0.0))
    for form, build, tolerance in candidates:
        try:
            inference = build()
            check = check_parity(pipeline, inference, probe, tolerance)
        except UntrustedArtifactError:  # a changed file is refused with the version, not worked around
            raise
        except Exception as exc:
            fallbacks.append(f"{form}: {type(exc).__name__}: {exc}"[:300])
        else:
            if check.passed:
                return inference, facts | ({"fallbacks": fallbacks} if fallbacks else {})
            fallbacks.append(f"{form}: {check.reason}")
        log.warning("not serving the %s form: %s", form, fallbacks[-1])
    return None, facts | ({"fallbacks": fallbacks} if fallbacks else {})


def load_version(client: Any, name: str, version: str, settings: Settings | None = None) -> LoadedModel:
    """Load `models:/<name>/<version>` with its signature, metrics and promotion time.

    Only an artifact training recorded is loaded (`adapters.model_store.load_registered`); a refused one
    raises ModelLoadError with `refused` set.

    Raises ModelLoadError naming the version and the cause; never returns a half-loaded model.
    """
    uri = f"models:/{name}/{version}"
    try:
        registered = load_registered(settings or get_settings(), name, version)
    except UntrustedArtifactError as exc:
        raise ModelLoadError(f"{uri} refused: {exc}", refused=True) from exc
    except Exception as exc:
        raise ModelLoadError(f"{uri} could not be loaded: {type(exc).__name__}: {exc}") from exc
    details, pipeline, signature = registered.details, registered.pipeline, registered.signature
    classes = check_servable(pipeline, uri)
    columns = columns_from_signature(signature)
    tags = details.tags or {}
    try:  # the holdout metrics the run logged before the version was registered
        logged = client.get_run(details.run_id).data.metrics if details.run_id else {}
    except Exception as exc:  # informative only: a model without them still serves
        log.warning("metrics of run %s unavailable: %s", details.run_id, exc)
        logged = {}
    metrics = holdout_metrics(logged)
    baseline = _baseline(details.run_id)
    nulls = LoadedModel(name, str(version), pipeline, columns, classes).frame([dict.fromkeys(c.name for c in columns)])
    probe = nulls if baseline is None else pd.concat([nulls, _probe_rows(baseline, columns)], ignore_index=True)
    try:
        inference, parity = choose_inference(pipeline, columns, tags, details.run_id, probe)
    except UntrustedArtifactError as exc:
        raise ModelLoadError(f"{uri} refused: {exc}", refused=True) from exc
    except Exception as exc:  # the pipeline itself still serves (the test prediction below checks it)
        log.warning("%s: no fast inference form (%s: %s)", uri, type(exc).__name__, exc)
        inference, parity = None, _parity_facts(tags) | {"fallbacks": [f"{type(exc).__name__}: {exc}"[:300]]}
    loaded = LoadedModel(
        name=name,
        version=str(version),
        pipeline=pipeline,
        columns=columns,
        classes=classes,
        run_id=details.run_id,
        metrics=metrics,
        promoted_at=tags.get("promoted_at"),
        source=details.source,
        baseline=baseline,
        id_field=tags.get("id_column") or None,
        inference=inference,
        parity=parity,
        feature_service=tags.get("feature_service") or None,
    )
    # A model that loads but cannot score is no better than one that does not load: try one row of
    # nulls (the pipeline imputes them) before it is allowed to replace the served model.
    try:
        loaded.scores(loaded.frame([dict.fromkeys(c.name for c in columns)]))
    except Exception as exc:
        raise ModelLoadError(f"{uri} loaded but failed a test prediction: {type(exc).__name__}: {exc}") from exc
    return loaded
