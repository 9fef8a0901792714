"""`POST /v1/embeddings`: the model's pooled, L2-normalised hidden states (the vectors
`hanlm embed` and `hanlm rag` compute), as floats or base64 little-endian float32."""

from __future__ import annotations

import base64
import struct
from typing import Any

from fastapi import APIRouter

from hanlm.serve.deps import Authorized, JSONBody
from hanlm.serve.errors import APIError
from hanlm.serve.protocol import EmbeddingBody, parse_embedding, request_body
from hanlm.serve.sampling import Sampling

router = APIRouter()


@router.post("/v1/embeddings", openapi_extra=request_body(EmbeddingBody))
async def embeddings(body: JSONBody, state: Authorized) -> Any:
    req = parse_embedding(body)
    state.check_count(req.inputs, "input")
    batch = [state.encode(x, "input") for x in req.inputs]
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
    n = sum(map(len, batch))
    return {
        "object": "list",
        "data": data,
        "model": state.model_name,
        "usage": {"prompt_tokens": n, "total_tokens": n},
    }
