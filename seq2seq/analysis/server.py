"""`python -m seq2seq.inspect ... --serve`: the interactive page on a local web server, where new sentences are
typed and every model's translation and attention come back live (Python's standard http.server, no framework).

    GET  /             the page, in live mode (with a form)
    POST /api/inspect  a `Query` as JSON -> the page's data for that sentence (`page.page_item`)
    GET  /api/health   {"ok": true}

Bound to 127.0.0.1 unless told otherwise: the page runs any sentence through the models, it is not meant for
the open internet. A request whose Host is not this server's loopback name (localhost, 127.0.0.1, [::1], or
the address it is bound to) and port, or whose Origin is another site, is refused with 403: another web page
open in the same browser cannot post to it, and a DNS-rebinding page cannot read its answers. Bad requests
get an HTTP 4xx answer with a one-line JSON {"error": ...} and the server goes on: a body over MAX_BODY_BYTES
or without a valid length, invalid UTF-8 or JSON, an empty sentence or one over `max_chars` characters, an
unknown path (its body is read first, so a keep-alive connection stays in step). Answers are strict JSON:
a number that is not finite (a diverged model's NaN) is sent as null. The models run one request at a time
under a lock; past MAX_WAITING requests waiting for it, the answer is 503 (busy, try again). A failure inside
a model call is a 500 for that request only.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from seq2seq.analysis.page import strict_json
from seq2seq.errors import UsageError

log = logging.getLogger("seq2seq.inspect")

MAX_SENTENCE_CHARS = 1000
MAX_BODY_BYTES = 64 * 1024
MAX_WAITING = 4
SOCKET_TIMEOUT_S = 30  # a client that stops sending frees its thread after this


class RequestError(UsageError):
    """A request the server refuses, with the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Query:
    """What the page asks for: every model's translation of `sentence`, or with `reference` that target forced;
    or with a target prefix forced first and the search going on from it ("what if"): `prefix` as text for
    every model, or `prefix_ids` (pieces of model number `prefix_model`, from 0) for that model, whose text the
    other models are given."""

    sentence: str
    reference: str | None = None
    prefix: str | None = None
    prefix_ids: tuple[int, ...] | None = None
    prefix_model: int | None = None


def _optional_text(request: dict, name: str) -> str | None:
    value = request.get(name)
    if value is not None and not isinstance(value, str):
        raise RequestError(400, f'"{name}" must be a string or null.')
    return value.strip() or None if value else None


def parse_request(body: bytes, max_chars: int) -> Query:
    """The `Query` of a POST /api/inspect body, or a RequestError saying what is wrong."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RequestError(400, f"the request body is not valid UTF-8 (byte {error.start}); send UTF-8 JSON.") from None
    try:
        request = json.loads(text)
    except json.JSONDecodeError as error:
        raise RequestError(400, f"the request body is not JSON ({error.msg}); send {{\"sentence\": \"...\"}}.") from None
    if not isinstance(request, dict) or not isinstance(request.get("sentence"), str):
        raise RequestError(400, 'the request needs a "sentence" string: {"sentence": "..."}.')
    sentence = request["sentence"].strip()
    reference, prefix = _optional_text(request, "reference"), _optional_text(request, "prefix")
    if not sentence:
        raise RequestError(400, "the sentence is empty; type a sentence to translate.")
    for name, value in (("sentence", sentence), ("reference", reference), ("prefix", prefix)):
        if value is not None and len(value) > max_chars:
            raise RequestError(413, f"the {name} has {len(value):,} characters; the limit is {max_chars:,}.")
    prefix_ids, prefix_model = request.get("prefix_ids"), request.get("prefix_model")
    if prefix_ids is not None:
        if (not isinstance(prefix_ids, list) or len(prefix_ids) > max_chars
                or not all(type(i) is int and i >= 0 for i in prefix_ids)):
            raise RequestError(400, f'"prefix_ids" must be a list of at most {max_chars:,} piece ids (integers >= 0).')
        if type(prefix_model) is not int or prefix_model < 0:
            raise RequestError(400, '"prefix_ids" needs "prefix_model": the number of the model they belong to.')
        prefix_ids = tuple(prefix_ids)
    elif prefix_model is not None:
        raise RequestError(400, '"prefix_model" comes with "prefix_ids"; send both or neither.')
    if reference is not None and (prefix is not None or prefix_ids is not None):
        raise RequestError(400, "give a reference (the whole target, forced) or a prefix (forced, then the "
                           "search goes on), not both.")
    if prefix is not None and prefix_ids is not None:
        raise RequestError(400, 'give the prefix once: as "prefix" text or as "prefix_ids".')
    return Query(sentence, reference, prefix, prefix_ids, prefix_model)


def allowed_hosts(bound: str, port: int) -> frozenset[str]:
    """The Host headers this server answers: its loopback names and the address it is bound to, with its port."""
    names = {"localhost", "127.0.0.1", "[::1]"}
    try:
        address = ipaddress.ip_address(bound)
    except ValueError:
        names.add(bound.lower())
    else:
        if not address.is_unspecified:
            names.add(f"[{address}]" if address.version == 6 else str(address))
    hosts = {f"{name}:{port}" for name in names}
    if port == 80:
        hosts |= names
    return frozenset(hosts)


def _is_ip_literal(host: str) -> bool:
    """An address typed as numbers: no DNS name a rebinding attack could point at this server."""
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True


class InspectServer(ThreadingHTTPServer):
    """Serves `page` and answers /api/inspect with `inspect(sentence, reference)`, one model call at a time."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], page: str, inspect: Callable[[Query], dict],
                 max_chars: int = MAX_SENTENCE_CHARS) -> None:
        super().__init__(address, InspectHandler)
        self.page = page.encode("utf-8")
        self.inspect = inspect
        self.max_chars = max_chars
        self.model_lock = threading.Lock()
        self.waiting = threading.BoundedSemaphore(MAX_WAITING + 1)  # the running request and those queued
        self.hosts = allowed_hosts(address[0], self.server_address[1])
        self.any_ip_literal = _is_unspecified(address[0])  # bound to every interface: reached by address

    def check_origin(self, host: str | None, origin: str | None) -> None:
        """Refuse (403) a Host that is not this server, and an Origin (sent by browsers) of another site."""
        def ours(name: str) -> bool:
            name = name.lower()
            return name in self.hosts or (self.any_ip_literal and _is_ip_literal(name))

        if host is None or not ours(host):
            raise RequestError(403, f"this server answers requests for http://127.0.0.1:{self.server_address[1]}/ "
                               f"only, not Host {host!r}; open the page at that address.")
        if origin is not None:
            parts = urlsplit(origin)
            if parts.scheme != "http" or not ours(parts.netloc) or parts.path not in ("", "/"):
                raise RequestError(403, f"requests from {origin} are refused; use the page this server serves.")

    def answer(self, body: bytes) -> dict:
        query = parse_request(body, self.max_chars)
        if not self.waiting.acquire(blocking=False):
            raise RequestError(503, f"the server is busy with {MAX_WAITING + 1} requests; try again in a moment.")
        try:
            with self.model_lock:
                return self.inspect(query)
        except UsageError as error:
            raise RequestError(400, str(error)) from None
        finally:
            self.waiting.release()


def _is_unspecified(bound: str) -> bool:
    try:
        return ipaddress.ip_address(bound).is_unspecified
    except ValueError:
        return False


class InspectHandler(BaseHTTPRequestHandler):
    server: InspectServer
    timeout = SOCKET_TIMEOUT_S
    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.1"  # no HTTP/0.9: a garbled request line still gets a status line and JSON

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        log.info("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, document: dict) -> None:
        self._send(status, strict_json(document).encode("utf-8"), "application/json; charset=utf-8")

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a malformed request line or header, an unknown method) as JSON too; the
        connection closes, as its request may not have been read to the end."""
        if code == HTTPStatus.NOT_IMPLEMENTED:  # an HTTP method the server has no handler for
            code, message = HTTPStatus.METHOD_NOT_ALLOWED, f"method {self.command!r} is not served; use GET or POST."
        self.log_error("code %d, message %s", code, message)
        self.close_connection = True
        body = strict_json({"error": message or self.responses.get(code, ("error",))[0]}).encode("utf-8")
        self.send_response(code)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _refused(self, error: RequestError, body_unread: bool = False) -> None:
        """Answer a refused request; a connection whose request body was not read cannot carry another one."""
        if body_unread:
            self.close_connection = True
        self._json(error.status, {"error": str(error)})

    def _checked(self) -> bool:
        try:
            self.server.check_origin(self.headers.get("Host"), self.headers.get("Origin"))
        except RequestError as error:
            self._refused(error, body_unread=self.command == "POST")
            return False
        return True

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if not self._checked():
            return
        if self.path in ("/", "/index.html"):
            self._send(200, self.server.page, "text/html; charset=utf-8")
        elif self.path == "/api/health":
            self._json(200, {"ok": True})
        else:
            self._json(404, {"error": f"no page {self.path}; the page is at /."})

    def _body(self) -> bytes:
        """The request body, or a RequestError for a missing, malformed or too large Content-Length."""
        length = self.headers.get("Content-Length")
        if length is None or not (length.isascii() and length.isdigit()):  # "²".isdigit() is True
            raise RequestError(411, "the request needs a Content-Length header: the body's size in bytes, 0-9 digits.")
        if int(length) > MAX_BODY_BYTES:
            raise RequestError(413, f"the request body has {int(length):,} bytes; the limit is {MAX_BODY_BYTES:,}.")
        return self.rfile.read(int(length))

    def do_POST(self) -> None:  # noqa: N802
        if not self._checked():
            return
        try:
            body = self._body()
        except RequestError as error:
            self._refused(error, body_unread=True)
            return
        if self.path != "/api/inspect":
            self._json(404, {"error": f"no endpoint {self.path}; POST to /api/inspect."})
            return
        try:
            self._json(200, self.server.answer(body))
        except RequestError as error:
            self._json(error.status, {"error": str(error)})
        except Exception as error:  # a model failure answers this request only; the server goes on
            log.exception("inspect failed")
            self._json(500, {"error": f"inspecting this sentence failed: {type(error).__name__}: {error}"})


def serve(page: str, inspect: Callable[[Query], dict], host: str, port: int,
          max_chars: int = MAX_SENTENCE_CHARS) -> None:
    """Serve until Ctrl-C."""
    try:
        server = InspectServer((host, port), page, inspect, max_chars)
    except OSError as error:
        raise UsageError(f"cannot listen on {host}:{port}: {error.strerror or error}; choose another --port.") from error
    with server:
        print(f"serving the attention page on http://{host}:{server.server_address[1]}/ (Ctrl-C stops)",
              file=sys.stderr, flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
