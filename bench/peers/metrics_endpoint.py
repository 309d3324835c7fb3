"""The one metric ``bench/throughput.py`` reads from every worker it measures (events processed), served the way a
worker serves it, so a peer is timed exactly like streamproc."""

from __future__ import annotations

import http.server
import threading


class ProcessedCounter:
    def __init__(self) -> None:
        self.n = 0

    def serve(self, port: int) -> None:
        counter = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = f'streamproc_events_processed_total{{topic="any",outcome="applied"}} {counter.n}\n'.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
