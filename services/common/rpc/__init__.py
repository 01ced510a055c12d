"""Framed calls over one TCP connection: the gateway's fast path to its own tiers.

An HTTP call between the gateway and an encoder or LM worker costs ~3 ms on two CPU
cores beyond the work itself: uvicorn, Starlette routing and middleware, a disconnect
watcher task, the HTTP client's request and response objects. Here a call is one
frame out and one frame back on a kept-open connection, parsed by a few lines of
``asyncio.Protocol`` code. The payloads are the same msgpack messages the HTTP
routes take and answer, and errors carry the same status and JSON body, so the
gateway treats both paths alike. HTTP stays for everything else: health, readiness,
metrics, KServe, and any client that is not the gateway.

Wire format. The client opens a connection and sends a hello::

    b"S37RPC/1" | u16 token length | token (UTF-8; empty when none is required)

The server answers a HELLO frame, or an ERROR frame (401) and closes. Then both sides
send frames: an 11-byte header ``!BIHI`` — type, call id, code, payload length — and
the payload:

    CALL    client → server   code: method id        payload: the request message
    CANCEL  client → server   no payload: the caller gave up; its work is cancelled
    REPLY   server → client   code: 200              payload: the response message
    ERROR   server → client   code: HTTP status      payload: ``{"error": {...}}`` JSON
    CHUNK   server → client   code: 200              payload: one item of a streamed answer

Calls on a connection run concurrently; replies come back as they finish. A handler
that returns an async iterator answers a stream: one CHUNK per item, then an empty
REPLY, or an ERROR if it fails midway. The first frame tells the caller whether the
stream started (a CHUNK) or was refused (an ERROR), as an HTTP status line would. Sizes are
bounded both ways: a request frame over the server's limit is answered 413 and its
bytes skipped (the connection stays usable); a reply over the caller's limit fails
that call alone. Payloads are never unpickled: handlers decode them with ``proto``.

Modules: ``frames`` (the hello, frame types, the frame splitter), ``server``
(``RpcServer``), ``client`` (``RpcClient``, ``RpcStream`` and the errors a call raises).
"""

from services.common.rpc.client import (
    RpcClient,
    RpcConnectionLost,
    RpcError,
    RpcFailed,
    RpcProtocolError,
    RpcStream,
    RpcTimeout,
    RpcUnavailable,
)
from services.common.rpc.frames import METHODS
from services.common.rpc.server import RpcListen, RpcServer

__all__ = [
    "METHODS",
    "RpcClient",
    "RpcConnectionLost",
    "RpcError",
    "RpcFailed",
    "RpcListen",
    "RpcProtocolError",
    "RpcServer",
    "RpcStream",
    "RpcTimeout",
    "RpcUnavailable",
]
