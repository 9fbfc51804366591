"""`python -m seq2seq.inspect ... --serve`: the interactive page on a local web server, where new sentences are
typed and every model's translation and attention come back live (Python's standard http.server, no framework).

    GET  /             the page, in live mode (with a form)
    POST /api/inspect  {"sentence": "...", "reference": "..." or null} -> the page's data for that sentence
    GET  /api/health   {"ok": true}

Bound to 127.0.0.1 unless told otherwise: the page runs any sentence through the models, it is not meant for
the open internet. Bad requests get an HTTP 4xx answer with a one-line JSON {"error": ...} and the server goes
on: a body over MAX_BODY_BYTES or without a length, invalid UTF-8 or JSON, an empty sentence or one over
`max_chars` characters. The models run one request at a time under a lock; past MAX_WAITING requests waiting
for it, the answer is 503 (busy, try again). A failure inside a model call is a 500 for that request only.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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


def parse_request(body: bytes, max_chars: int) -> tuple[str, str | None]:
    """The sentence and the optional reference of a POST /api/inspect body, or a RequestError saying what is wrong."""
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
    reference = request.get("reference")
    if reference is not None and not isinstance(reference, str):
        raise RequestError(400, '"reference" must be a string or null.')
    sentence = request["sentence"].strip()
    reference = reference.strip() if reference else None
    if not sentence:
        raise RequestError(400, "the sentence is empty; type a sentence to translate.")
    for name, value in (("sentence", sentence), ("reference", reference)):
        if value is not None and len(value) > max_chars:
            raise RequestError(413, f"the {name} has {len(value):,} characters; the limit is {max_chars:,}.")
    return sentence, reference


class InspectServer(ThreadingHTTPServer):
    """Serves `page` and answers /api/inspect with `inspect(sentence, reference)`, one model call at a time."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], page: str, inspect: Callable[[str, str | None], dict],
                 max_chars: int = MAX_SENTENCE_CHARS) -> None:
        super().__init__(address, InspectHandler)
        self.page = page.encode("utf-8")
        self.inspect = inspect
        self.max_chars = max_chars
        self.model_lock = threading.Lock()
        self.waiting = threading.BoundedSemaphore(MAX_WAITING + 1)  # the running request and those queued

    def answer(self, body: bytes) -> dict:
        sentence, reference = parse_request(body, self.max_chars)
        if not self.waiting.acquire(blocking=False):
            raise RequestError(503, f"the server is busy with {MAX_WAITING + 1} requests; try again in a moment.")
        try:
            with self.model_lock:
                return self.inspect(sentence, reference)
        except UsageError as error:
            raise RequestError(400, str(error)) from None
        finally:
            self.waiting.release()


class InspectHandler(BaseHTTPRequestHandler):
    server: InspectServer
    timeout = SOCKET_TIMEOUT_S
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        log.info("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, document: dict) -> None:
        self._send(status, json.dumps(document, ensure_ascii=False).encode("utf-8"), "application/json; charset=utf-8")

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path in ("/", "/index.html"):
            self._send(200, self.server.page, "text/html; charset=utf-8")
        elif self.path == "/api/health":
            self._json(200, {"ok": True})
        else:
            self._json(404, {"error": f"no page {self.path}; the page is at /."})

    def do_POST(self) -> None:  # noqa: N802
        if self.path != "/api/inspect":
            self._json(404, {"error": f"no endpoint {self.path}; POST to /api/inspect."})
            return
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            self._json(411, {"error": "the request needs a Content-Length header."})
            return
        if int(length) > MAX_BODY_BYTES:
            self.close_connection = True  # the body is not read
            self._json(413, {"error": f"the request body has {int(length):,} bytes; the limit is {MAX_BODY_BYTES:,}."})
            return
        try:
            self._json(200, self.server.answer(self.rfile.read(int(length))))
        except RequestError as error:
            self._json(error.status, {"error": str(error)})
        except Exception as error:  # a model failure answers this request only; the server goes on
            log.exception("inspect failed")
            self._json(500, {"error": f"inspecting this sentence failed: {type(error).__name__}: {error}"})


def serve(page: str, inspect: Callable[[str, str | None], dict], host: str, port: int,
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
