"""An OTLP/HTTP trace receiver that decodes with the official OpenTelemetry protobuf definitions
(the `opentelemetry-proto` package on PyPI, generated from opentelemetry-proto's .proto files).

Usage: python otlp_receiver.py PORT_FILE
Listens on 127.0.0.1 (a free port, written to PORT_FILE once listening). Every span of every
`POST /v1/traces` (`ExportTraceServiceRequest`, application/x-protobuf) is printed to stdout as one
JSON line: trace_id, span_id, parent_span_id (hex), name, kind, start/end (ns), service (the
resource's service.name), attributes and status. A body that does not decode answers 400.
"""
import json
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


def value(any_value):
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


class Receiver(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        request = ExportTraceServiceRequest()
        try:
            if self.path != "/v1/traces" or self.headers.get("Content-Type") != "application/x-protobuf":
                raise DecodeError(f"unexpected {self.path} {self.headers.get('Content-Type')}")
            request.ParseFromString(body)
        except DecodeError as e:
            self.send_response(400)
            self.end_headers()
            self.wfile.write(str(e).encode())
            return
        for resource_spans in request.resource_spans:
            resource = {kv.key: value(kv.value) for kv in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    print(json.dumps({
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent_span_id": span.parent_span_id.hex(),
                        "name": span.name,
                        "kind": span.kind,
                        "start": span.start_time_unix_nano,
                        "end": span.end_time_unix_nano,
                        "service": resource.get("service.name"),
                        "resource": resource,
                        "attributes": {kv.key: value(kv.value) for kv in span.attributes},
                        "status": {"code": span.status.code, "message": span.status.message},
                    }), flush=True)
        answer = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


server = HTTPServer(("127.0.0.1", 0), Receiver)
with open(sys.argv[1], "w") as f:
    f.write(str(server.server_address[1]))
server.serve_forever()
