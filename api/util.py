"""Request body reading with a size bound."""

from __future__ import annotations

import json
import math

from fastapi import Request

from gpupool.api.errors import APIError

MAX_JSON_DEPTH = 64  # OpenAI bodies (JSON schemas, tool parameters) nest far less


async def read_json(request: Request, limit: int):
    """The JSON body, or 413 past ``limit`` bytes (checked while reading, so a chunked body
    without Content-Length is bounded too) and 400 when it is not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body is larger than {limit} bytes", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body is larger than {limit} bytes",
                           code="body_too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw:
        raise APIError(400, "the request body is empty; send JSON")
    return parse_json(raw)


def parse_json(raw: bytes | str):
    """JSON text as Python values; 400 when it is not JSON, holds NaN, Infinity or a number
    past a 64-bit float, or fails ``check_json`` (depth, lone surrogates)."""
    try:
        value = json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:
        raise APIError(400, "the request body nests too deeply", code="invalid_json") from None
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}",
                       code="invalid_json") from None
    check_json(value)
    return value


def check_json(value) -> None:
    """400 unless every list and object nests at most ``MAX_JSON_DEPTH`` deep and every
    string (keys too) is valid Unicode: JSON's ``\\ud800`` escapes can make lone
    surrogates, which no tokenizer, file path or UTF-8 reply can hold. Iterative, so no
    depth can exhaust the stack."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, str):
            _check_text(v)
            continue
        if isinstance(v, dict):
            for k in v:
                _check_text(k)
            children = v.values()
        elif isinstance(v, list):
            children = v
        else:
            continue
        if depth > MAX_JSON_DEPTH:
            raise APIError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels",
                           code="invalid_json")
        stack.extend((c, depth + 1) for c in children)


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, "the request body holds a lone UTF-16 surrogate (\\ud800-"
                            "\\udfff escape), which is not text", code="invalid_json") from None


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} does not fit a 64-bit float")
    return value


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")
