"""A server that finishes its start-up and then serves, idle, until it is ended: a real HTTP server on a free
port, started after a few start-up lines, announced as uvicorn announces it under `vllm serve` ("Application
startup complete."). It writes its port to the file given as argv[1]."""

import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer


class Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok\n")

    def log_message(self, *args: object) -> None:  # an idle server prints nothing
        pass


def main() -> None:
    print("INFO loading the model", flush=True)
    time.sleep(0.5)
    server = HTTPServer(("127.0.0.1", 0), Health)
    print(f"INFO:     Uvicorn running on http://127.0.0.1:{server.server_port} (Press CTRL+C to quit)", flush=True)
    print("INFO:     Application startup complete.", flush=True)
    with open(sys.argv[1], "w") as f:
        f.write(str(server.server_port))
    server.serve_forever()


if __name__ == "__main__":
    main()
