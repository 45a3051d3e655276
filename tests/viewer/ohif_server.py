"""A same-origin web server for the OHIF viewer in front of a test Orthanc.

Orthanc 1.10 sends no CORS headers and answers OPTIONS with 404, so the viewer's built ``dist/``
and Orthanc's DICOMweb (``/dicom-web/``) and WADO-URI (``/wado``) are served from one origin:

* static files from ``dist/``, unknown paths fall back to ``index.html`` (OHIF is a single-page app);
* ``/app-config.js`` is generated: one ``dicomweb`` data source at this origin;
* ``/dicom-web/...`` and ``/wado...`` are proxied to Orthanc's HTTP port (or the node's); a comma-separated
  ``includefield=a,b`` is split into repeated parameters (Orthanc's plugin ignores the comma form);
  ``upstream_headers`` are added to every proxied request (the node's ``Authorization: Bearer``, which
  the browser never sees);
* every response carries ``Cross-Origin-Opener-Policy: same-origin``,
  ``Cross-Origin-Embedder-Policy: require-corp`` and ``Cross-Origin-Resource-Policy: same-origin``
  (OHIF's web workers use SharedArrayBuffer, which needs a cross-origin isolated page).

Binds 127.0.0.1 only; stdlib only (``http.server`` + ``urllib``).
"""

from __future__ import annotations

import json
import mimetypes
import threading
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

PROXIED_PREFIXES = ("/dicom-web/", "/dicom-web?", "/wado")
ISOLATION_HEADERS = {
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
}
# hop-by-hop headers (RFC 9110 7.6.1) and those the server sets itself
_DROP_HEADERS = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                 "transfer-encoding", "upgrade", "content-length", "server", "date"}
mimetypes.add_type("application/wasm", ".wasm")
mimetypes.add_type("text/javascript", ".js")
mimetypes.add_type("text/javascript", ".mjs")


def app_config(origin: str) -> str:
    """OHIF's ``window.config``: a single DICOMweb data source at ``origin`` and no dialogs that
    would cover the viewer (investigational-use banner, CPU-rendering notice)."""
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "dicomweb",
        "configuration": {
            "friendlyName": "test Orthanc (same-origin proxy)",
            "name": "orthanc",
            "wadoUriRoot": f"{origin}/wado",
            "qidoRoot": f"{origin}/dicom-web",
            "wadoRoot": f"{origin}/dicom-web",
            "qidoSupportsIncludeField": True,
            "supportsReject": False,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "omitQuotationForMultipartRequest": True,
            "bulkDataURI": {"enabled": True},
        },
    }
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "investigationalUseDialog": {"option": "never"},
        "maxNumRequests": {"interaction": 100, "thumbnail": 75, "prefetch": 25},
        "showErrorDetails": "always",
        "defaultDataSourceName": "dicomweb",
        "dataSources": [source],
    }
    return f"window.config = {json.dumps(config, indent=2)};\n"


def split_includefield(query: str) -> str:
    """``includefield=a,b`` -> ``includefield=a&includefield=b``; other parameters untouched."""
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
    out: list[tuple[str, str]] = []
    for key, value in pairs:
        if key.lower() == "includefield" and "," in value:
            out += [(key, v) for v in value.split(",") if v]
        else:
            out.append((key, value))
    return urllib.parse.urlencode(out, safe=",")


class _Handler(BaseHTTPRequestHandler):
    server: OhifServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        self.server.log.append(f"{self.command} {self.path} -> {args[1] if len(args) > 1 else '?'}")

    def end_headers(self) -> None:
        for k, v in ISOLATION_HEADERS.items():
            self.send_header(k, v)
        super().end_headers()

    def do_GET(self) -> None:
        self._dispatch(body=None)

    def do_HEAD(self) -> None:
        self._dispatch(body=None, head=True)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self._dispatch(body=self.rfile.read(length))

    def do_OPTIONS(self) -> None:  # same origin: no pre-flight is expected, answer it anyway
        self.send_response(204)
        self.send_header("Allow", "GET, HEAD, POST, OPTIONS")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _dispatch(self, body: bytes | None, head: bool = False) -> None:
        path = urllib.parse.urlsplit(self.path).path
        if self.path.startswith(PROXIED_PREFIXES) or path == "/dicom-web":
            self._proxy(body, head)
        elif path == "/app-config.js":
            self._send(200, app_config(self.server.origin).encode(), "text/javascript; charset=utf-8", head)
        else:
            self._static(path, head)

    def _send(self, status: int, data: bytes, content_type: str, head: bool,
              extra: list[tuple[str, str]] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for k, v in extra or []:
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _static(self, path: str, head: bool) -> None:
        root = self.server.dist
        rel = urllib.parse.unquote(path).lstrip("/")
        target = (root / rel).resolve()
        if not target.is_relative_to(root) or not target.is_file():
            target = root / "index.html"  # SPA fallback: /viewer?StudyInstanceUIDs=... etc.
        ctype = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if ctype.startswith("text/") and "charset" not in ctype:
            ctype += "; charset=utf-8"
        cache = "no-cache" if target.name in ("index.html", "sw.js") else "max-age=3600"
        self._send(200, target.read_bytes(), ctype, head, [("Cache-Control", cache)])

    def _proxy(self, body: bytes | None, head: bool) -> None:
        parts = urllib.parse.urlsplit(self.path)
        query = split_includefield(parts.query) if parts.query else ""
        url = f"{self.server.upstream}{parts.path}" + (f"?{query}" if query else "")
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in _DROP_HEADERS and k.lower() not in ("host", "accept-encoding")}
        # Orthanc builds BulkDataURIs from the Host header: keep them on this origin.
        headers["Host"] = self.headers.get("Host", urllib.parse.urlsplit(self.server.origin).netloc)
        headers.update(self.server.upstream_headers)
        req = urllib.request.Request(url, data=body, headers=headers,
                                     method="HEAD" if head else ("POST" if body is not None else "GET"))
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                status, data, resp_headers = r.status, r.read(), r.headers.items()
        except urllib.error.HTTPError as e:
            status, data, resp_headers = e.code, e.read(), e.headers.items()
        except (urllib.error.URLError, OSError) as e:
            self._send(502, f"upstream error: {e}".encode(), "text/plain", head)
            return
        self.server.proxied.append((url, status))
        ctype = next((v for k, v in resp_headers if k.lower() == "content-type"), "application/octet-stream")
        extra = [(k, v) for k, v in resp_headers
                 if k.lower() not in _DROP_HEADERS and k.lower() != "content-type"
                 and not k.lower().startswith("cross-origin-")]
        self._send(status, data, ctype, head, extra)


class OhifServer(ThreadingHTTPServer):
    """``OhifServer(dist, orthanc_http_port).start()``; ``.origin`` is the viewer's base URL;
    ``upstream_headers`` go with every proxied request (e.g. the node's ``Authorization``)."""

    daemon_threads = True

    def __init__(self, dist: Path, orthanc_http_port: int, port: int = 0,
                 upstream_headers: dict[str, str] | None = None) -> None:
        self.dist = Path(dist).resolve()
        if not (self.dist / "index.html").is_file():
            raise FileNotFoundError(f"no OHIF build at {self.dist} (deploy/install.sh unpacks it)")
        self.upstream = f"http://127.0.0.1:{orthanc_http_port}"
        self.upstream_headers = dict(upstream_headers or {})
        self.log: list[str] = []
        self.proxied: list[tuple[str, int]] = []
        super().__init__(("127.0.0.1", port), _Handler)
        self.origin = f"http://127.0.0.1:{self.server_address[1]}"
        self._thread: threading.Thread | None = None

    def start(self) -> OhifServer:
        self._thread = threading.Thread(target=self.serve_forever, name="ohif-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)


if __name__ == "__main__":  # by hand: python -m tests.viewer.ohif_server DIST ORTHANC_HTTP_PORT [PORT]
    import sys

    srv = OhifServer(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 0).start()
    print(f"OHIF at {srv.origin}/ (Ctrl-C to stop)")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        srv.stop()
