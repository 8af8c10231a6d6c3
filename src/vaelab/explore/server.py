"""The explorer's HTTP side: routing and checks (:func:`handle_request`) and a small
standard-library server (:class:`ExplorerServer`, :func:`serve`).

Routes (everything else is a 404; no request ever reads a file: the page is read from
the package once, when the server starts):

==========================  ==================================================================
``GET /``                   the page (one HTML file with its script; no CDN, no build step)
``GET /api/meta``           the run, the plane and the scatter (:meth:`Explorer.meta`)
``POST /api/decode``        ``{"z": [L numbers]}`` -> the decoder mean at ``z`` as an image
``GET /api/point/N``        test point ``N``: input, reconstruction, NELBO, NLL
==========================  ==================================================================

Refused with a one-line JSON ``{"error": ...}``: a path with ``..`` (400), an unknown path
(404), a wrong method (405), a body that is not JSON, too large, or a ``z`` that is not L
finite numbers within :data:`~vaelab.explore.app.Z_LIMIT` (400), a point index that is not a
number (400) or not on the scatter (404). Bound to a loopback address (the default,
127.0.0.1), the server also refuses a ``Host`` header that names another host (403), so a
web page elsewhere cannot reach it by DNS rebinding.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import unquote, urlsplit

from .app import Explorer, RequestError

__all__ = ["Response", "handle_request", "ExplorerServer", "make_server", "serve", "load_page",
           "display_available", "MAX_BODY"]

#: Largest request body read (bytes); larger ones are refused unread.
MAX_BODY = 1 << 16

_SECURITY_HEADERS = (
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Content-Security-Policy", "default-src 'self'; script-src 'self' 'unsafe-inline'; "
                                "style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
                                "frame-ancestors 'none'"),
)

_ROUTES = {"/": ("GET",), "/index.html": ("GET",), "/api/meta": ("GET",),
           "/api/decode": ("POST",)}
_POINT = "/api/point/"


def load_page() -> bytes:
    """The page, shipped as package data (``vaelab/explore/page.html``)."""
    return resources.files(__package__).joinpath("page.html").read_bytes()


@dataclass(frozen=True)
class Response:
    """What the server sends: a status, a body and its content type (plus headers)."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()

    def json(self) -> Any:
        return json.loads(self.body)


def _json(status: int, value: Any) -> Response:
    return Response(status, json.dumps(value, allow_nan=False).encode())


def _error(status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    return Response(status, json.dumps({"error": message}).encode(), headers=headers)


def handle_request(explorer: Explorer, page: bytes, method: str, target: str,
                   body: bytes = b"", *, host: str | None = None,
                   allowed_hosts: frozenset[str] | None = None) -> Response:
    """Answer one request (no sockets: the server and the tests call this).

    Args:
        explorer: the :class:`Explorer` that computes.
        page: the HTML of ``/``.
        method: ``GET``, ``POST``, ...
        target: the request target (path and query; the query is ignored).
        body: the request body (POST).
        host: the request's ``Host`` header; checked against ``allowed_hosts`` when that is
            given (loopback servers).
    """
    if allowed_hosts is not None and (host or "").lower() not in allowed_hosts:
        return _error(403, f"unexpected Host header {host!r:.60}: open the URL the explorer "
                           "printed")
    raw = urlsplit(target).path
    path = unquote(raw)
    if ".." in path or "\\" in path or "\x00" in path:
        return _error(400, "'..', backslashes and NUL are not allowed in a path")
    if path.startswith(_POINT):
        allowed: tuple[str, ...] = ("GET",)
    else:
        allowed = _ROUTES.get(path, ())
    if not allowed:
        return _error(404, f"no such page {path!r:.80}: the explorer serves /, /api/meta, "
                           "/api/decode and /api/point/N")
    if method not in allowed:
        return _error(405, f"{method} is not allowed on {path}: use {', '.join(allowed)}",
                      headers=(("Allow", ", ".join(allowed)),))
    try:
        if path in ("/", "/index.html"):
            return Response(200, page, "text/html; charset=utf-8")
        if path == "/api/meta":
            return _json(200, explorer.meta())
        if path == "/api/decode":
            return _json(200, explorer.decode(_parse_z(body)))
        return _json(200, explorer.point(explorer.check_index(path[len(_POINT):])))
    except RequestError as exc:
        return _error(exc.status, str(exc))


def _parse_z(body: bytes) -> Any:
    """The ``z`` of a ``{"z": [...]}`` body.

    Raises:
        RequestError: the body is not a JSON object with a ``z``.
    """
    if len(body) > MAX_BODY:
        raise RequestError(400, f"the request body is over {MAX_BODY} bytes")
    try:
        value = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise RequestError(400, 'the body is not JSON: send {"z": [numbers]}') from None
    if not isinstance(value, dict) or "z" not in value:
        raise RequestError(400, 'the body must be a JSON object {"z": [numbers]}')
    return value["z"]


class _Handler(BaseHTTPRequestHandler):
    server: ExplorerServer
    server_version = "vaelab-explore"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    timeout = 30  # a stalled client frees its thread
    # Headers and body go out in two writes: without TCP_NODELAY, Nagle's algorithm and the
    # client's delayed ACK held each keep-alive answer back ~40 ms (48 ms per decode in
    # Chromium, 0.5 ms of it computing).
    disable_nagle_algorithm = True

    def _answer(self, method: str) -> None:
        body = b""
        if method == "POST":
            body_or_error = self._read_body()
            if isinstance(body_or_error, Response):
                self._send(body_or_error)
                return
            body = body_or_error
        srv = self.server
        try:
            response = handle_request(srv.explorer, srv.page, method, self.path, body,
                                      host=self.headers.get("Host"),
                                      allowed_hosts=srv.allowed_hosts)
        except Exception as exc:  # a bug or a model failure: say so, keep serving
            print(f"vaelab explore: {method} {self.path[:80]} failed: "
                  f"{type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            response = _error(500, f"the explorer failed: {type(exc).__name__}: {exc}")
        self._send(response)

    def _read_body(self) -> bytes | Response:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            return _error(400, "chunked request bodies are not accepted: send a Content-Length")
        length = self.headers.get("Content-Length")
        if length is None or not length.strip().isdigit():
            self.close_connection = True
            return _error(400, "a POST needs a Content-Length header")
        size = int(length)
        if size > MAX_BODY:
            self.close_connection = True  # the body is never read
            return _error(400, f"the request body is over {MAX_BODY} bytes")
        return self.rfile.read(size)

    def _send(self, response: Response) -> None:
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in (*_SECURITY_HEADERS, *response.headers):
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    def do_GET(self) -> None:  # noqa: N802 (http.server's names)
        self._answer("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._answer("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self.close_connection = True  # its body is not read
        self._answer("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._answer("DELETE")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        if self.server.verbose:
            super().log_message(format, *args)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ExplorerServer(ThreadingHTTPServer):
    """A threaded HTTP server for one :class:`Explorer` on ``host:port`` (port 0: a free
    one). Model calls are serialised by the explorer.

    The connection threads are not daemons: :meth:`server_close` shuts their sockets down
    (a browser's idle keep-alive connection ends at once) and joins them, so no thread is
    left running while the interpreter exits (a daemon thread woken during finalisation
    can abort the process).

    Raises:
        OSError: the address cannot be bound (in use, not this machine's).
    """

    daemon_threads = False
    block_on_close = True

    def __init__(self, explorer: Explorer, host: str = "127.0.0.1", port: int = 0, *,
                 verbose: bool = False) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # before binding: a failed bind calls server_close
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__((host, port), _Handler)
        self.explorer, self.verbose, self.host = explorer, verbose, host
        self.page = load_page()
        self.port = int(self.server_address[1])
        # Loopback only: accept the names of this address, refuse any other Host.
        self.allowed_hosts = frozenset(
            f"{name}:{self.port}" for name in ("127.0.0.1", "localhost", "[::1]")
        ) if _is_loopback(host) else None

    def process_request(self, request, client_address) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def server_close(self) -> None:
        """Stop listening, end every open connection and wait for its thread."""
        with self._connections_lock:
            still_open = list(self._connections)
        for connection in still_open:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:  # closed meanwhile
                pass
        super().server_close()

    @property
    def url(self) -> str:
        name = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{name}:{self.port}/"


def make_server(explorer: Explorer, host: str = "127.0.0.1", port: int = 0,
                verbose: bool = False) -> ExplorerServer:
    """An :class:`ExplorerServer`, bound and ready for ``serve_forever``."""
    return ExplorerServer(explorer, host, port, verbose=verbose)


def display_available() -> bool:
    """Whether a desktop browser can likely show the page: macOS, Windows, or a Linux/BSD
    session with a display (on a server over ssh, ``webbrowser`` would pick a text-mode
    browser in the terminal instead)."""
    import os

    return sys.platform in ("darwin", "win32") or bool(
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def serve(server: ExplorerServer, *, open_browser: bool = False,
          echo: Callable[[str], None] = print) -> None:
    """Say the URL, open it in a browser when asked, and serve until Ctrl-C (which returns
    normally, after closing the socket)."""
    echo(f"vaelab explore: {server.url}  (Ctrl-C to stop)")
    if not server.allowed_hosts:
        echo(f"warning: listening on {server.host}, not 127.0.0.1: anyone who can reach "
             "this machine can see the run's test images")
    if open_browser:
        import webbrowser

        webbrowser.open(server.url)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        print("vaelab explore: stopped", file=sys.stderr, flush=True)
    finally:
        server.server_close()
