"""Request body reading with a size bound."""

from __future__ import annotations

import json

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
    """JSON text as Python values; 400 when it is not JSON, holds NaN or Infinity, or nests
    deeper than ``MAX_JSON_DEPTH``."""
    try:
        value = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise APIError(400, "the request body nests too deeply", code="invalid_json") from None
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}",
                       code="invalid_json") from None
    if json_depth(value) > MAX_JSON_DEPTH:
        raise APIError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels",
                       code="invalid_json")
    return value


def json_depth(value) -> int:
    """How deeply lists and objects nest in a parsed JSON value (a scalar is 0); iterative,
    so no depth can exhaust the stack."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        children = v.values() if isinstance(v, dict) else v if isinstance(v, list) else None
        if children is None:
            continue
        deepest = max(deepest, d)
        stack.extend((c, d + 1) for c in children)
    return deepest


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")
