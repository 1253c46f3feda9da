"""Reading request bodies: a size cap before parsing, then strict validation."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request

from threadline.errors import InvalidJson, PayloadTooLarge, ValidationFailed

__all__ = ["MAX_JSON_BODY_BYTES", "MAX_JSON_DEPTH", "TrimBody", "read_body", "read_model"]

MAX_JSON_BODY_BYTES = 32 * 1024
# Request bodies are small objects; deeper nesting is a mistake or an attack on the parser.
MAX_JSON_DEPTH = 32
_INT64 = 1 << 63
Model = TypeVar("Model", bound=BaseModel)


# An oversized body is read and dropped up to this many bytes before the 413: a client that
# writes its whole body before reading the answer (fetch, httpx) would otherwise see the
# connection reset under its upload instead of the 413. Past it the server answers at once.
MAX_DISCARDED_BODY_BYTES = 16 * 1024 * 1024


async def read_body(request: Request, limit: int) -> bytes:
    """Read at most ``limit`` bytes; an oversized body is a 413, stored nowhere."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
        if int(declared) <= MAX_DISCARDED_BODY_BYTES:
            async for _ in request.stream():
                pass
        raise PayloadTooLarge(f"request body is {declared} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_DISCARDED_BODY_BYTES:
            break
        if size <= limit:
            chunks.append(chunk)
    if size > limit:
        raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
    return b"".join(chunks)


def _errors(exc: ValidationError) -> list[dict[str, Any]]:
    return [
        {
            "field": ".".join(str(part) for part in error["loc"]) or "(body)",
            "message": error["msg"],
            "type": error["type"],
        }
        for error in exc.errors(include_url=False)
    ]


async def read_model(request: Request, model: type[Model], *, allow_empty: bool = False) -> Model:
    raw = await read_body(request, MAX_JSON_BODY_BYTES)
    if not raw.strip():
        if allow_empty:
            return model()
        raise InvalidJson("request body must be a JSON object")
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if content_type not in ("application/json", ""):
        raise InvalidJson(f"Content-Type must be application/json, not {content_type}")
    try:
        data = json.loads(raw, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, huge numbers, depth
        raise InvalidJson(f"request body is not valid JSON: {exc}") from None
    _check_storable(data)
    if not isinstance(data, dict):
        raise InvalidJson("request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ValidationFailed("request body is invalid", details=_errors(exc)) from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _check_storable(data: Any) -> None:
    """400 for what Postgres cannot store or clients cannot read back exactly: NUL in any string
    (text and jsonb refuse it), integers beyond 64 bits, nesting deeper than MAX_JSON_DEPTH."""
    pending: list[tuple[Any, str, int]] = [(data, "", 0)]
    while pending:
        value, path, depth = pending.pop()
        where = path or "(body)"
        if depth > MAX_JSON_DEPTH:
            raise InvalidJson(f"request body nests deeper than {MAX_JSON_DEPTH} levels (at {where})")
        if isinstance(value, str):
            if "\x00" in value:
                raise ValidationFailed(f"{where}: text may not contain NUL (\\u0000)")
        elif isinstance(value, bool):
            continue
        elif isinstance(value, int):
            if not -_INT64 <= value < _INT64:
                raise ValidationFailed(f"{where}: integers must fit in 64 bits")
        elif isinstance(value, dict):
            for key, item in value.items():
                if "\x00" in key:
                    raise ValidationFailed(f"{where}: keys may not contain NUL (\\u0000)")
                pending.append((item, f"{path}.{key}" if path else key, depth + 1))
        elif isinstance(value, list):
            pending.extend((item, f"{path}[{index}]", depth + 1) for index, item in enumerate(value))


class TrimBody(BaseModel):
    """``POST /api/v1/streams/trim`` (here, not in the route module, so the OpenAPI document can
    describe it without importing a route module)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    stream: str = Field(description="Stream name below /v1/stream/, e.g. sessions/<id>/out")
    before: str = Field(description="Records before this offset are removed; -1 is a no-op, now the tail")
