"""The forms of a prediction: the records a request carries in, checked, and the answer it carries out.

A request body is `{"records": [...]}` or MLflow's `{"dataframe_records": [...]}`; bad input is a
`BadRequest` (a 422 naming the record and the field; a batch over the limit is a 413). The answer gives
per record the class and the probability of every class (a classifier) or the predicted value (a
regressor), with the model version and a request id, and with `?explain=true` each record's per-feature
contributions.
"""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np
import orjson
from pydantic import ValidationError

from serving.model import BODY_KEYS, LoadedModel


def problem(loc: list[Any], msg: str, kind: str) -> dict[str, Any]:
    """One error entry: where (as a list and in the message, e.g. `records[3].age: ...`), what, and its type."""
    return {"loc": loc, "msg": f"{where(loc)}: {msg}", "type": kind}


class BadRequest(Exception):
    """A request the API answers with a 4xx status and these details."""

    def __init__(self, status: int, errors: list[dict[str, Any]]) -> None:
        super().__init__(errors[0]["msg"])
        self.status = status
        self.errors = errors

    @classmethod
    def at(cls, status: int, loc: list[Any], msg: str, kind: str) -> BadRequest:
        """A single-problem answer."""
        return cls(status, [problem(loc, msg, kind)])


def where(loc: tuple | list) -> str:
    """`records[3].age` from a location tuple."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


MAX_ERRORS = 50  # errors one answer names at most; checking stops once this many are found
CHECK_CELLS = 512  # record fields checked per step (a step's errors are all built before the count is looked at)
# The body's records, each left unparsed (other keys skipped): one pass over a body of the usual shape ...
_RAW_LISTS = list[msgspec.Raw] | None | msgspec.UnsetType
_BODY = msgspec.json.Decoder(msgspec.defstruct("RawBody", [(key, _RAW_LISTS, msgspec.UNSET) for key in BODY_KEYS]))
# ... and, for any other, its keys and then the records, to say which part of it is wrong
_TOP = msgspec.json.Decoder(dict[str, msgspec.Raw])
_RECORDS = msgspec.json.Decoder(list[msgspec.Raw] | None)


class RawRecords(list):
    """A body's records, each still its JSON text (`msgspec.Raw`): parsed one at a time by `validate_records`."""


def parse_records(body: bytes, max_records: int) -> tuple[str, RawRecords]:
    """The records of a request body, each left unparsed; raises BadRequest (422 or 413) naming what is wrong.

    One pass over the body checks its JSON and finds the records without building any value (a body of many
    records costs no more memory than its bytes): the records are parsed later, one step at a time, only as
    far as the checks need (`validate_records`).
    """
    try:
        if not body.isascii():  # invalid UTF-8 anywhere is invalid JSON, also in what is never parsed
            body.decode("utf-8")
        found = _BODY.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise BadRequest.at(422, ["body"], f"not valid JSON: {exc}", "json") from exc
    except msgspec.ValidationError:  # not an object, or a body key that is not a list: which, below
        key, records = _records_apart(body)
    else:
        key = next((k for k in BODY_KEYS if getattr(found, k) is not msgspec.UNSET), None)
        if key is None:
            raise BadRequest.at(422, ["body"], BODY_SHAPE, "body_shape")
        records = getattr(found, key)
    if records is None:
        raise BadRequest.at(422, [key], "must be a list of records", "list_type")
    if not records:
        raise BadRequest.at(422, [key], "empty batch: send at least one record", "empty")
    if len(records) > max_records:
        raise BadRequest.at(
            413, [key], f"batch of {len(records)} records is over the limit of {max_records}", "too_large"
        )
    return key, RawRecords(records)


BODY_SHAPE = 'expected an object {"records": [{...}, ...]} (or "dataframe_records")'


def _records_apart(body: bytes) -> tuple[str, list[msgspec.Raw] | None]:
    """The key read and its records, for a body not of the usual shape; raises the 422 naming what is wrong."""
    try:
        top = _TOP.decode(body)
    except msgspec.ValidationError as exc:  # valid JSON, not an object
        raise BadRequest.at(422, ["body"], BODY_SHAPE, "body_shape") from exc
    key = next((k for k in BODY_KEYS if k in top), None)
    if key is None:
        raise BadRequest.at(422, ["body"], BODY_SHAPE, "body_shape")
    try:
        return key, _RECORDS.decode(top[key])
    except (msgspec.ValidationError, RecursionError) as exc:
        raise BadRequest.at(422, [key], "must be a list of records", "list_type") from exc


def parsed(key: str, records: list[Any], start: int = 0, stop: int | None = None) -> list[Any]:
    """Records `start` to `stop` as values: those of a `RawRecords` parsed now.

    Raises a 422 naming a record that is not valid JSON.
    """
    part = records[start:stop]
    if not isinstance(records, RawRecords):
        return part
    values = []
    for index, raw in enumerate(part, start):
        try:
            values.append(orjson.loads(memoryview(raw)))
        except orjson.JSONDecodeError as exc:
            raise BadRequest.at(422, [key, index], f"not valid JSON: {exc}", "json") from exc
    return values


def validate_records(model: LoadedModel, key: str, records: list[Any]) -> list[dict[str, Any]]:
    """Records checked against the model's signature; raises a 422 naming each failing record and field.

    Checked a few at a time (about `CHECK_CELLS` fields per step), stopping once `MAX_ERRORS` errors are
    found: a body of 10,000 records with every field wrong costs what its first few records cost.
    """
    step = max(1, CHECK_CELLS // max(len(model.columns), 1))
    valid: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    for start in range(0, len(records), step):
        values = parsed(key, records, start, start + step)
        try:
            valid += model.adapter.validate_python(values)
        except ValidationError as exc:
            for err in exc.errors(include_url=False):
                errors.append(_error(key, start, err))
                if len(errors) == MAX_ERRORS:
                    break
        if len(errors) == MAX_ERRORS:
            break
    if errors:
        raise BadRequest(422, errors)
    return valid


def _error(key: str, start: int, err: Any) -> dict[str, Any]:
    """One pydantic error of a step that began at record `start`, as an answer's error entry."""
    msg = err["msg"]
    if err["type"] == "missing":
        msg = "field required (send null for a missing value)"
    elif "input" in err:
        msg = f"{msg}, got {err['input']!r}"[:300]
    index, *rest = err["loc"]
    return problem([key, start + index, *rest] if isinstance(index, int) else [key, index, *rest], msg, err["type"])


def decode_records(model: LoadedModel, body: bytes, max_records: int) -> tuple[list[Any], list[str | None] | None]:
    """The body's records checked against the model's signature, and their ids; raises BadRequest (422, 413).

    A good body is decoded and checked in one pass (`RecordSchema.decode`, msgspec); any other is taken
    apart step by step by `parse_records`, `validate_records` and `record_ids`, whose errors name the
    record and field.
    """
    fast = model.adapter.decode(body, max_records)
    if fast is not None:
        return fast[1], fast[2]
    key, raw = parse_records(body, max_records)
    records = validate_records(model, key, raw)
    return records, record_ids(model, key, raw)


def record_ids(model: LoadedModel, key: str, records: list[dict[str, Any]]) -> list[str | None] | None:
    """Each record's id for the prediction log: the model's `id_field`, as text, None where absent.

    None when the model has no id field. Raises a 422 naming a record whose id is neither text nor an integer.
    """
    if model.id_field is None:
        return None
    records = parsed(key, records)
    ids: list[str | None] = []
    for index, record in enumerate(records):
        value = record.get(model.id_field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, str | int)):
            msg = f"an id must be a string or an integer, got {value!r}"[:300]
            raise BadRequest.at(422, [key, index, model.id_field], msg, "id_type")
        ids.append(None if value is None else str(value))
    return ids


def explained_output(model: LoadedModel, scores: np.ndarray) -> tuple[int | np.ndarray | None, list[dict[str, Any]]]:
    """Which model output `?explain=true` explains for each record, as `contributions` wants it and as said.

    - binary: the probability of the positive class (the second class), for every record;
    - multiclass: the probability of the class predicted for that record;
    - regression: the predicted value.
    """
    if model.task == "regression":
        return None, [{"output": "prediction"}] * len(scores)
    classes = [_plain(c) for c in model.classes]
    index = np.full(len(scores), 1) if model.task == "binary" else scores.argmax(axis=1)
    return (1 if model.task == "binary" else index), [{"output": "probability", "class": classes[i]} for i in index]


def explain_records(model: LoadedModel, records: list[dict[str, Any]], scores: np.ndarray) -> list[dict[str, Any]]:
    """Per-record, per-feature contributions to the output `explained_output` names, and that output.

    By occlusion against the baseline record stored with the model (see `core.modeling.explain.contributions`).
    """
    from core.modeling.explain import contributions

    frame = model.frame(records)
    index, explained = explained_output(model, scores)
    table = contributions(model.pipeline, frame, model.baseline[frame.columns], positive_index=index)
    return [
        {"contributions": {k: float(v) for k, v in row.items()}, "explained": what}
        for row, what in zip(table.to_dict(orient="records"), explained, strict=True)
    ]


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def answer(model: LoadedModel, scores: np.ndarray, request_id: str) -> dict[str, Any]:
    """The JSON answer per record, model name and version, request id.

    A classifier's record gets its `class` and `probabilities` of every class keyed by the class label as
    text (binary and multiclass alike); a regressor's record gets its `prediction` (a number).
    """
    if not model.classes:
        predictions: list[dict[str, Any]] = [{"prediction": value} for value in scores.tolist()]
    else:
        classes = [_plain(c) for c in model.classes]
        labels = [str(c) for c in classes]
        predictions = [  # whole-array argmax and tolist: no numpy call per record
            {"class": classes[best], "probabilities": dict(zip(labels, row, strict=True))}
            for best, row in zip(scores.argmax(axis=1).tolist(), scores.tolist(), strict=True)
        ]
    return {
        "request_id": request_id,
        "model": {"name": model.name, "version": model.version},
        "predictions": predictions,
    }
