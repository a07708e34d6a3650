"""Sends HTTP/3 requests to an edge with aioquic (PyPI), an HTTP/3 implementation nobody here wrote.

Usage: python h3_client.py HOST PORT CAFILE < requests.json
The requests are a JSON list of {"method", "path", "headers": {name: value}, "body": text}; they
are sent one after another on one connection. Prints a JSON list of responses: {"status",
"headers": {name: value}, "body": text, "data_frames": n, "first_byte_ms": ms from sending the
request to its first response byte}, and "connect_ms" (the QUIC and TLS handshake) before them.
Exits non-zero on a transport error.
"""
import asyncio
import json
import ssl
import sys
import time

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, StreamReset


class Client(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.pending = {}

    def quic_event_received(self, event):
        if isinstance(event, (StreamReset, ConnectionTerminated)):
            for stream_id, (future, _) in list(self.pending.items()):
                if not isinstance(event, StreamReset) or event.stream_id == stream_id:
                    future.set_exception(RuntimeError(f"transport: {event}"))
                    del self.pending[stream_id]
        for e in self.h3.handle_event(event):
            entry = self.pending.get(getattr(e, "stream_id", None))
            if entry is None:
                continue
            future, response = entry
            if response["first_byte_ms"] is None:
                response["first_byte_ms"] = (time.monotonic() - response.pop("_sent")) * 1000
            if isinstance(e, HeadersReceived):
                headers = {k.decode(): v.decode() for k, v in e.headers}
                if response["status"] is None:
                    response["status"] = int(headers.pop(":status"))
                    response["headers"] = headers
                else:
                    response["trailers"] = headers
            elif isinstance(e, DataReceived) and e.data:
                response["body"] += e.data.decode()
                response["data_frames"] += 1
            if getattr(e, "stream_ended", False):
                del self.pending[e.stream_id]
                future.set_result(response)

    async def request(self, authority, method, path, headers, body):
        stream_id = self._quic.get_next_available_stream_id()
        fields = [(b":method", method.encode()), (b":scheme", b"https"), (b":authority", authority.encode()),
                  (b":path", path.encode())]
        fields += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        data = body.encode() if body else b""
        future = asyncio.get_running_loop().create_future()
        response = {"status": None, "headers": {}, "body": "", "data_frames": 0, "first_byte_ms": None,
                    "_sent": time.monotonic()}
        self.pending[stream_id] = (future, response)
        self.h3.send_headers(stream_id, fields, end_stream=not data)
        if data:
            self.h3.send_data(stream_id, data, end_stream=True)
        self.transmit()
        return await asyncio.wait_for(future, 30)


async def main():
    host, port, cafile = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    requests = json.load(sys.stdin)
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name="localhost")
    config.load_verify_locations(cafile)
    config.verify_mode = ssl.CERT_REQUIRED
    started = time.monotonic()
    async with connect(host, port, configuration=config, create_protocol=Client) as client:
        connect_ms = (time.monotonic() - started) * 1000
        out = []
        for r in requests:
            out.append(await client.request(f"{host}:{port}", r["method"], r["path"], r.get("headers", {}),
                                            r.get("body", "")))
    print(json.dumps({"connect_ms": connect_ms, "responses": out}))


asyncio.run(main())
