"""A real OTLP/HTTP metrics receiver process (run as ``python otlp_receiver.py PORT``): it decodes each
``ExportMetricsServiceRequest`` with the OpenTelemetry protobufs and prints, per resource, one NDJSON line
``{"resource": {attributes}, "metrics": {name: first data point's value}}`` — with the resource, which
oteltap's printout leaves out (two collectors' exports are told apart by it)."""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)


def _value(v) -> object:
    return getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None


def _point(metric) -> object:
    kind = metric.WhichOneof("data")
    if kind is None:  # a metric with no data (a family with no series yet)
        return None
    points = getattr(metric, kind).data_points
    if not points:
        return None
    p = points[0]
    if kind in ("sum", "gauge"):
        return p.as_double if p.WhichOneof("value") == "as_double" else p.as_int
    return p.count


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        request = ExportMetricsServiceRequest()
        request.ParseFromString(body)
        for rm in request.resource_metrics:
            line = {"resource": {a.key: _value(a.value) for a in rm.resource.attributes},
                    "metrics": {m.name: _point(m) for sm in rm.scope_metrics for m in sm.metrics}}
            print(json.dumps(line), flush=True)
        out = ExportMetricsServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    server = HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    print("listening", flush=True)
    server.serve_forever()
