"""A prediction request on the wire: headers, body, bearer token, and its answer as JSON.

The prediction path reads its headers and body straight from ASGI (with the body's size limit) and sends
its answer pre-encoded, skipping FastAPI's Request and Response objects; the other routes answer through
`json_response`.
"""

from __future__ import annotations

import hmac
from contextlib import suppress
from typing import Any
from urllib.parse import parse_qs

import orjson
from fastapi import Response
from pydantic import SecretStr

from serving.forms import BadRequest

JSON_HEADERS = [(b"content-type", b"application/json")]


def json_response(content: Any, status: int = 200, request_id: str | None = None) -> Response:
    """A FastAPI JSON response (orjson-encoded), with the request id header when given."""
    headers = {"x-request-id": request_id} if request_id else None
    return Response(orjson.dumps(content), status_code=status, media_type="application/json", headers=headers)


def encoded_answer(status: int, content: Any, request_id: str) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    """Status, JSON body and headers (with the request id) of an answer sent straight through ASGI."""
    return status, orjson.dumps(content), [*JSON_HEADERS, (b"x-request-id", request_id.encode("latin-1"))]


def predict_headers(scope: dict[str, Any]) -> tuple[str | None, str | None, int]:
    """x-request-id, authorization and the declared content-length of a request (one pass over its headers)."""
    request_id = authorization = None
    declared = 0
    for name, value in scope["headers"]:  # ASGI: names in lower case
        if name == b"x-request-id":
            request_id = value.decode("latin-1") or None
        elif name == b"authorization":
            authorization = value.decode("latin-1")
        elif name == b"content-length":
            with suppress(ValueError):
                declared = int(value)
    return request_id, authorization, declared


def explain_asked(query: bytes) -> bool:
    """Whether a query string asks for explanations (`explain=true`, `1` or `yes`; its last value counts)."""
    values = parse_qs(query.decode("latin-1")).get("explain")
    return bool(values) and values[-1].lower() in {"1", "true", "yes"}


class ClientGone(Exception):
    """The client disconnected before its request body was read: nobody to answer."""


async def receive_body(receive: Any, declared: int, limit: int) -> bytes:
    """The request body, cut off with a 413 as soon as it passes `limit` bytes, whatever the transfer encoding.

    A declared content-length over the limit is refused before reading; a chunked body (no length) is
    counted while it streams, so a client cannot make the server hold more than `limit` bytes.
    """
    if declared > limit:
        raise BadRequest.at(413, ["body"], f"{declared} bytes is over the limit of {limit}", "too_large")
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BadRequest.at(413, ["body"], f"more than {limit} bytes: over the limit of {limit}", "too_large")
        if not message.get("more_body", False):
            return b"".join([*chunks, chunk]) if chunks else chunk
        chunks.append(chunk)


def token_problem(token: SecretStr, authorization: str | None, what: str) -> str | None:
    """Why a request to /`what` is refused under `MLOPS_SERVING_TOKEN` (the 401's detail); None when allowed.

    It needs `Authorization: Bearer <token>`, compared in constant time; the token is never logged. Both sides are
    compared trimmed (settings trim the configured one and refuse it blank), and an empty one never matches.
    """
    scheme, _, given = (authorization or "").strip().partition(" ")
    expected = token.get_secret_value().strip().encode()
    if scheme.lower() == "bearer" and expected and hmac.compare_digest(given.strip().encode(), expected):
        return None
    detail = f"/{what} needs the header 'Authorization: Bearer <token>' with the serving token (MLOPS_SERVING_TOKEN)"
    return detail + ("; none was sent" if not given else "; the one sent is wrong")
