"""Request body reading with a size bound."""

from __future__ import annotations

import json

from fastapi import Request

from gpupool.api.errors import APIError


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
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}",
                       code="invalid_json") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")
