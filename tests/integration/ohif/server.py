"""The OHIF viewer and Orthanc's DICOMweb API from one origin: a static server plus a reverse proxy.

``/dicom-web/...`` and ``/wado`` are passed to Orthanc; ``/app-config.js`` is the template beside
this file with the data source filled in; anything else is a file of OHIF's built ``dist/`` or,
for the viewer's routes (``/viewer?StudyInstanceUIDs=...``), its ``index.html``. One origin means
no CORS set-up in Orthanc. Run by hand to look at a study::

    python tests/integration/ohif/server.py --dist ~/.cache/pacs-agent/ohif-3.13.2/dist \\
        --orthanc http://127.0.0.1:8042 --port 3000
"""

from __future__ import annotations

import argparse
import http.client
import mimetypes
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

TEMPLATE = Path(__file__).with_name("app-config.template.js")
PROXIED = ("/dicom-web", "/wado")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "host"}  # fmt: skip
mimetypes.add_type("application/javascript", ".js")
mimetypes.add_type("application/javascript", ".mjs")
mimetypes.add_type("application/wasm", ".wasm")


def app_config(template: Path = TEMPLATE, *, title: str = "Orthanc (pacs-agent)") -> bytes:
    """``app-config.js`` with a same-origin DICOMweb data source."""
    return template.read_text().replace("__FRIENDLY_NAME__", title).encode()


class ViewerServer:
    """Serve ``dist`` and proxy DICOMweb to ``orthanc_url`` on ``127.0.0.1:port`` (0 = a free port).

    ``requests`` records ``(method, path, status)`` of every proxied request, so a test can show
    what the viewer asked for when something does not display.
    """

    def __init__(self, dist: Path, orthanc_url: str, port: int = 0) -> None:
        self.dist = Path(dist).resolve()
        target = urllib.parse.urlsplit(orthanc_url)
        self.upstream = (target.hostname or "127.0.0.1", target.port or 80)
        self.config = app_config()
        self.requests: list[tuple[str, str, int]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL of the viewer."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> ViewerServer:
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self._server.serve_forever, name="ohif-server", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and close the listening socket."""
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> ViewerServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _send(self, status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                # cross-origin isolation lets cornerstone use SharedArrayBuffer; same origin, so harmless
                self.send_header("Cross-Origin-Opener-Policy", "same-origin")
                self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
                for key, value in (extra or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _proxy(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                connection = http.client.HTTPConnection(*owner.upstream, timeout=120)
                try:
                    connection.request(self.command, self.path, body=body, headers=headers)
                    response = connection.getresponse()
                    payload = response.read()
                    extra = {
                        k: v
                        for k, v in response.getheaders()
                        if k.lower() not in HOP_BY_HOP | {"content-length", "content-type"}
                    }
                    owner.requests.append((self.command, self.path, response.status))
                    self._send(response.status, payload, response.getheader("Content-Type", ""), extra)
                except OSError as exc:
                    owner.requests.append((self.command, self.path, 502))
                    self._send(502, f"Orthanc unreachable: {exc}".encode(), "text/plain")
                finally:
                    connection.close()

            def _static(self) -> None:
                path = urllib.parse.urlsplit(self.path).path
                if path == "/app-config.js":
                    self._send(200, owner.config, "application/javascript")
                    return
                candidate = (owner.dist / path.lstrip("/")).resolve()
                if not candidate.is_relative_to(owner.dist) or not candidate.is_file():
                    if Path(path).suffix and Path(path).suffix != ".html":  # a missing asset, not a route
                        self._send(404, b"not found", "text/plain")
                        return
                    candidate = owner.dist / "index.html"  # a route of the single-page app
                content_type = mimetypes.guess_type(candidate.name)[0] or "application/octet-stream"
                self._send(200, candidate.read_bytes(), content_type)

            def do_GET(self) -> None:
                if self.path.startswith(PROXIED):
                    self._proxy()
                else:
                    self._static()

            do_HEAD = do_GET

            def do_POST(self) -> None:
                if self.path.startswith(PROXIED):
                    self._proxy()
                else:
                    self._send(405, b"method not allowed", "text/plain")

        return Handler


def main() -> None:
    """Serve until interrupted (for looking at a study by hand)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dist", required=True, type=Path, help="OHIF's built dist/ folder")
    parser.add_argument("--orthanc", required=True, help="Orthanc's base URL, e.g. http://127.0.0.1:8042")
    parser.add_argument("--port", type=int, default=3000)
    args = parser.parse_args()
    server = ViewerServer(args.dist, args.orthanc, args.port)
    print(f"OHIF on {server.url}/ (Ctrl-C stops)")
    try:
        server._server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server._server.server_close()


if __name__ == "__main__":
    main()
