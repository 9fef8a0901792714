"""`POST /v1/embeddings`: the model's pooled, L2-normalised hidden states (the vectors
`hanlm embed` and `hanlm rag` compute), as floats or base64 little-endian float32."""

from __future__ import annotations

import base64
import struct
import uuid
from typing import Any

from fastapi import APIRouter, Request

from hanlm.serve.deps import Authorized, JSONBody
from hanlm.serve.errors import APIError
from hanlm.serve.metrics import Served
from hanlm.serve.protocol import EmbeddingBody, parse_embedding, request_body
from hanlm.serve.sampling import Sampling

router = APIRouter()


@router.post("/v1/embeddings", openapi_extra=request_body(EmbeddingBody))
async def embeddings(request: Request, body: JSONBody, state: Authorized) -> Any:
    req = parse_embedding(body)
    model = state.model_id(req.model)
    state.check_count(req.inputs, "input")
    batch = [state.encode(x, "input") for x in req.inputs]
    n = sum(map(len, batch))
    request.state.hanlm = Served(f"embd-{uuid.uuid4().hex[:24]}", n, user=req.user)
    for ids in batch:
        state.fit(Sampling(max_tokens=0), len(ids), "input", generate=False)
    width = state.engine.model.config.hidden_size
    if req.dimensions is not None and req.dimensions != width:
        raise APIError(
            f"'dimensions' must be {width} (the model's hidden size)", param="dimensions"
        )
    ticket = state.engine.admit()
    try:
        vectors = await state.engine.run(state.engine.embed, batch)
    finally:
        ticket.release()
    data = []
    for i, v in enumerate(vectors):
        value: Any = v
        if req.encoding_format == "base64":
            value = base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()
        data.append({"object": "embedding", "index": i, "embedding": value})
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": n, "total_tokens": n},
    }
