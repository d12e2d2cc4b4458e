"""The HTTP ceiling: a bare ASGI app that reads the request body and answers a fixed body.

No framework, no parsing, no model: what uvicorn itself costs per request on this machine.

    uvicorn bench.bare_asgi:app --port 8002 --loop uvloop --http httptools
"""

from __future__ import annotations

from typing import Any

# The size of normserve's answer for one cnn-bn row.
BODY = (
    b'{"model_name":"cnn-bn","model_version":"1","outputs":[{"name":"logits","datatype":"FP32","shape":[1,10],'
    b'"data":[4.837597,-4.0534954,-3.7887948,-5.0910244,2.3936045,-4.501855,3.1931891,-2.9589236,3.788178,5.3766623]}]}'
)
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})
