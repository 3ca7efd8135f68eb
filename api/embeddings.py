"""``/v1/embeddings``: decoder-only models registered with ``task = "embed"`` pool their
prompt's final-norm hidden states in the engine (``SamplingParams.pooling``: the last token
or the mean, as the model's sentence-transformers files say, ``frontend.pooling``); here
the vector is cut to ``dimensions`` (models that allow it), normalised where the model says
so, and sent as floats or base64. Each input is one engine request of the same call, so a
tenant's limits, the metrics and a cluster's routing treat it as a completion's prompt.
Encoder models (BERT and its kin) are not served: gpupool runs decoder-only models.
"""

from __future__ import annotations

import asyncio

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from gpupool.api.auth import authenticate, check_model_access
from gpupool.api.errors import APIError
from gpupool.api.protocol import EmbeddingRequest, parse
from gpupool.api.routes_openai import (
    Run,
    _Choice,
    _collect,
    _finish_reason,
    _model,
    check_queue,
)
from gpupool.api.util import read_json
from gpupool.frontend.pooling import encode_base64, finish_vector, pooling_of
from gpupool.frontend.text import ContextLengthError, TextStream, max_tokens_for, tokenize
from gpupool.messages.errors import RequestError
from gpupool.messages.params import SamplingParams
from gpupool.messages.types import EngineRequest

PATH = "/v1/embeddings"


def _prompts(req: EmbeddingRequest, tokenizer, info) -> list[list[int]]:
    inputs, out = req.inputs(), []
    for i, prompt in enumerate(inputs):
        where = f"input {i}: " if len(inputs) > 1 else ""
        try:
            ids = tokenize(tokenizer, prompt, info.vocab_size)
            max_tokens_for(info, len(ids), 1, None, "input")
        except (RequestError, ContextLengthError) as e:
            raise APIError(400, where + str(e), param="input") from None
        out.append(ids)
    return out


def _check_dimensions(req: EmbeddingRequest, pooling, hidden: int | None) -> None:
    d = req.dimensions
    if d is None:
        return
    sizes = pooling.matryoshka
    if sizes is False:
        raise APIError(400, f"model {req.model!r} does not support matryoshka "
                            "representations: dimensions cannot be set", param="dimensions")
    if (sizes is not True and d not in sizes) or (hidden is not None and d > hidden):
        raise APIError(400, f"dimensions {d} is not one this model gives"
                            + (f" ({', '.join(map(str, sizes))})" if sizes is not True else ""),
                       param="dimensions")


async def embeddings_route(state, request: Request, tenant_path: str | None = None):
    tenant = await authenticate(state, request, tenant_path)
    req = parse(EmbeddingRequest, await read_json(request, state.config.max_body_bytes), PATH)
    check_model_access(state, tenant, req.model)
    await state.models.ensure(req.model)
    if state.models.spec_of(req.model).get("task") != "embed":
        raise APIError(400, f"model {req.model!r} is not an embedding model: register it "
                            "with task = \"embed\"", param="model")
    info, tokenizer = _model(state, req.model)
    try:
        pooling = pooling_of(info.folder)
    except ValueError as e:
        raise APIError(400, f"model {req.model!r}: {e}", param="model") from None
    _check_dimensions(req, pooling, None)
    check_queue(state, len(req.inputs()))
    prompts = await asyncio.to_thread(_prompts, req, tokenizer, info)
    run = Run(state, req.model, tenant)
    params = SamplingParams(max_tokens=1, pooling=pooling.mode)
    choices = []
    for i, ids in enumerate(prompts):
        rid = f"{run.call_id}-{i}"
        engine_req = EngineRequest(rid, req.model, ids, params,
                                   tenant.name if tenant else None, final_only=True)
        choices.append(_Choice(i, engine_req, TextStream(rid, req.model, tokenizer, ids,
                                                         params)))
    await run.start(choices)
    outs = await _collect(run, request)
    await run.released()
    if outs is None:
        return Response(status_code=499)  # nobody is listening any more
    data = []
    for i, out in enumerate(outs):
        _finish_reason(out)  # a failed request is a 500 naming the engine's error
        if out.embedding is None:
            raise APIError(500, "the engine returned no embedding", code="generation_failed")
        _check_dimensions(req, pooling, len(out.embedding))
        vec = finish_vector(out.embedding, req.dimensions, pooling.normalize)
        data.append({"object": "embedding", "index": i,
                     "embedding": encode_base64(vec) if req.encoding_format == "base64"
                     else vec})
    tokens = run.prompt_tokens
    return JSONResponse({"object": "list", "data": data, "model": req.model,
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
