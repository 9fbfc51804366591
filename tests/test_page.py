"""The interactive page and its server: `inspect --html` opened in a real headless browser (every model's panel,
no script error, the weights of the --json diagnostics), and `inspect --serve` answering good and bad requests."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser

import numpy as np
import pytest

from seq2seq.analysis import server as page_server

SENTENCE = "我是一个学生。"
ONE = json.dumps({"sentence": "一"}).encode("ascii")  # a request body the echo server answers
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _browser() -> str:
    for name in BROWSERS:
        if path := shutil.which(name):
            return path
    pytest.skip(f"no headless browser installed (looked for {', '.join(BROWSERS)}); on Debian: "
                "apt-get install -y chromium")


class _Dom(HTMLParser):
    """The parts of the dumped DOM the test reads: body attributes, #errors, panels and their cells."""

    def __init__(self) -> None:
        super().__init__()
        self.body: dict = {}
        self.errors = ""
        self.panels: dict[str, list[list[float]]] = {}
        self._panel: str | None = None
        self._in_errors = False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attributes = dict(attrs)
        if tag == "body":
            self.body = attributes
        elif tag == "pre" and attributes.get("id") == "errors":
            self._in_errors = True
        elif tag == "section" and "panel" in (attributes.get("class") or ""):
            self._panel = attributes["data-model"]
            self.panels[self._panel] = []
        elif tag == "tr" and self._panel is not None:
            self.panels[self._panel].append([])
        elif tag == "td" and self._panel is not None and "data-w" in attributes:
            self.panels[self._panel][-1].append(float(attributes["data-w"]))

    def handle_endtag(self, tag: str) -> None:
        if tag == "pre":
            self._in_errors = False

    def handle_data(self, data: str) -> None:
        if self._in_errors:
            self.errors += data


def _three(checkpoints) -> list[str]:
    return [arg for name in ("rnn", "bahdanau", "transformer") for arg in ("--checkpoint", str(checkpoints[name]))]


def test_page_in_a_headless_browser_shows_every_model_with_the_json_weights(checkpoints, tmp_path):
    browser = _browser()
    page, report = tmp_path / "page.html", tmp_path / "page.json"
    run = subprocess.run([sys.executable, "-m", "seq2seq.inspect", *_three(checkpoints), SENTENCE, "--words",
                          "--html", str(page), "--json", str(report)], capture_output=True, timeout=300)
    assert run.returncode == 0, run.stderr.decode()
    html = page.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html), "the page must not fetch anything"
    dumped = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         "--dump-dom", page.as_uri()],
        capture_output=True, timeout=180, env={**os.environ, "HOME": str(tmp_path)},
    )
    assert dumped.returncode == 0, dumped.stderr.decode()[-2000:]
    dom = _Dom()
    dom.feed(dumped.stdout.decode("utf-8"))
    assert dom.body.get("data-ready") == "1", "the page's script did not finish"
    assert dom.errors.strip() == ""
    models = json.loads(report.read_text(encoding="utf-8"))["models"]
    assert list(dom.panels) == [model["model"] for model in models]
    for model in models:
        cells = [row for row in dom.panels[model["model"]] if row]
        if not model["has_attention"]:
            assert cells == []
            continue
        np.testing.assert_allclose(np.array(cells), np.array(model["weights"]), atol=2e-4)


def _request(port: int, method: str, path: str, body: bytes | None = None,
             headers: dict | None = None) -> tuple[int, dict | str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        payload = response.read().decode("utf-8")
        kind = response.getheader("Content-Type", "")
        return response.status, json.loads(payload) if kind.startswith("application/json") else payload
    finally:
        connection.close()


def _post(port: int, document) -> tuple[int, dict]:
    body = document if isinstance(document, bytes) else json.dumps(document).encode("utf-8")
    return _request(port, "POST", "/api/inspect", body, {"Content-Type": "application/json"})


@pytest.fixture(scope="module")
def served(checkpoints):
    """`inspect --serve --port 0` with the bahdanau and transformer checkpoints; yields the port it chose."""
    process = subprocess.Popen(
        [sys.executable, "-m", "seq2seq.inspect", "--checkpoint", str(checkpoints["bahdanau"]), "--checkpoint",
         str(checkpoints["transformer"]), "--serve", "--port", "0"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )
    try:
        for line in process.stderr:
            if match := re.search(r"http://127\.0\.0\.1:(\d+)/", line):
                break
        else:
            pytest.fail(f"the server did not start (exit {process.wait()})")
        threading.Thread(target=process.stderr.read, daemon=True).start()  # keep the pipe drained
        yield int(match.group(1))
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_server_translates_a_sentence_and_serves_the_page(served):
    status, page = _request(served, "GET", "/")
    assert status == 200 and 'id="data"' in page and '"live": true' in page
    status, answer = _post(served, {"sentence": SENTENCE, "reference": None})
    assert status == 200, answer
    assert [model["family"] for model in answer["models"]] == ["bahdanau", "transformer"]
    assert all(model["words"]["layers"] for model in answer["models"])
    status, answer = _post(served, {"sentence": SENTENCE, "reference": "I am a student."})
    assert status == 200 and all(model["forced"] for model in answer["models"])


def test_server_answers_bad_requests_and_survives(served):
    assert _post(served, {"sentence": "   "})[0] == 400
    status, answer = _post(served, {"sentence": "学" * 10_000})
    assert status == 413 and "10,000 characters" in answer["error"]
    status, answer = _post(served, b'{"sentence": "\xff\xfe"}')
    assert status == 400 and "UTF-8" in answer["error"]
    assert _post(served, b"not json")[0] == 400
    assert _post(served, {"text": SENTENCE})[0] == 400
    assert _request(served, "POST", "/api/inspect", b"x" * 10, {"Content-Length": str(10 ** 9)})[0] == 413
    assert _request(served, "GET", "/nothing")[0] == 404
    with ThreadPoolExecutor(max_workers=12) as pool:
        statuses = list(pool.map(lambda _: _post(served, {"sentence": "他昨天去了图书馆。"})[0], range(12)))
    assert set(statuses) <= {200, 503} and 200 in statuses
    assert _post(served, {"sentence": SENTENCE})[0] == 200  # still serving


@pytest.fixture(scope="module")
def _echo():
    """An InspectServer in this process whose "model" echoes the query (and a NaN for the sentence "nan")."""
    answered: list[page_server.Query] = []

    def inspect(query: page_server.Query) -> dict:
        answered.append(query)
        return {"sentence": query.sentence, "prefix": query.prefix, "weight": float("nan") if query.sentence == "nan"
                else 0.5}

    server = page_server.InspectServer(("127.0.0.1", 0), "<html></html>", inspect)
    server.answered = answered
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def echo_server(_echo):
    _echo.answered.clear()
    return _echo


def test_server_says_busy_when_the_queue_is_full(echo_server):
    port = echo_server.server_address[1]
    for _ in range(page_server.MAX_WAITING + 1):  # as many requests as may run or wait
        echo_server.waiting.acquire()
    status, answer = _post(port, {"sentence": "一"})
    assert status == 503 and "busy" in answer["error"] and echo_server.answered == []
    for _ in range(page_server.MAX_WAITING + 1):
        echo_server.waiting.release()
    assert _post(port, {"sentence": "一"}) == (200, {"sentence": "一", "prefix": None, "weight": 0.5})


def _exchange(port: int, raw: bytes, answers: int = 1) -> list[tuple[int, dict, dict]]:
    """Send raw bytes on one connection and read `answers` responses: (status, headers, JSON body) each."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(raw)
        reader = connection.makefile("rb")
        responses = []
        for _ in range(answers):
            status_line = reader.readline().decode("latin-1")
            assert status_line.startswith("HTTP/1."), f"no status line: {status_line!r}"
            headers = http.client.parse_headers(reader)
            body = reader.read(int(headers["Content-Length"]))
            assert headers["Content-Type"].startswith("application/json"), body
            responses.append((int(status_line.split()[1]), dict(headers), json.loads(body, parse_constant=_no_nan)))
        return responses


def _no_nan(name: str):
    raise AssertionError(f"the answer is not strict JSON: it holds {name}")


def _raw(method: str, path: str, body: bytes = b"", port: int | None = None, **headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"] if port else [f"{method} {path} HTTP/1.1"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    if body and "Content_Length" not in headers:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body  # header bytes are Latin-1 in HTTP


def test_a_post_to_an_unknown_path_reads_its_body_so_the_connection_stays_in_step(echo_server):
    port = echo_server.server_address[1]
    body = _raw("GET", "/smuggled", port=port)  # a body that looks like a request: it must not be answered
    (status, _, answer), (second, _, health) = _exchange(
        port, _raw("POST", "/api/nothing", body, port) + _raw("GET", "/api/health", port=port), answers=2)
    assert status == 404 and "POST to /api/inspect" in answer["error"]
    assert (second, health) == (200, {"ok": True})


@pytest.mark.parametrize("length", ["²", "¹²", "-1", "1e3", ""])  # "²".isdigit() is True, int("²") fails
def test_a_content_length_that_is_no_ascii_number_is_refused(echo_server, length):
    port = echo_server.server_address[1]
    ((status, headers, answer),) = _exchange(port, _raw("POST", "/api/inspect", b"{}", port, Content_Length=length))
    assert status == 411 and "Content-Length" in answer["error"] and headers.get("Connection") == "close"
    assert _post(port, {"sentence": "一"})[0] == 200


def test_answers_are_strict_json_with_null_for_what_is_not_a_number(echo_server):
    port = echo_server.server_address[1]
    ((status, _, answer),) = _exchange(port, _raw("POST", "/api/inspect", b'{"sentence": "nan"}', port))
    assert status == 200 and answer == {"sentence": "nan", "prefix": None, "weight": None}


@pytest.mark.parametrize("host, origin", [
    ("evil.example", None),  # a DNS-rebinding page: its name, pointed at 127.0.0.1
    ("127.0.0.1:{port}", "http://evil.example"),  # another site posting from the user's browser
    ("127.0.0.1:{port}", "null"),  # a sandboxed frame or a file:// page
    ("localhost:1", None),  # another port
    ("127.0.0.1:{port}", "http://127.0.0.1:1"),
    (None, None),
])
def test_requests_for_another_host_or_from_another_origin_are_refused(echo_server, host, origin):
    port = echo_server.server_address[1]
    headers = {"Host": host.format(port=port)} if host else {}
    if origin:
        headers["Origin"] = origin
    for method, body in (("GET", b""), ("POST", ONE)):
        ((status, _, answer),) = _exchange(port, _raw(method, "/api/inspect" if body else "/", body, **headers))
        assert status == 403 and "refused" in answer["error"] or "only" in answer["error"]
    assert echo_server.answered == []


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "[::1]:{port}", "LOCALHOST:{port}"])
def test_the_page_s_own_host_and_origin_are_served(echo_server, host):
    port = echo_server.server_address[1]
    host = host.format(port=port)
    ((status, _, answer),) = _exchange(port, _raw("POST", "/api/inspect", ONE, Host=host,
                                                  Origin=f"http://{host}"))
    assert status == 200 and answer["sentence"] == "一"


def test_hosts_a_server_bound_elsewhere_answers():
    assert "192.168.1.5:8000" in page_server.allowed_hosts("192.168.1.5", 8000)
    assert "localhost" in page_server.allowed_hosts("127.0.0.1", 80)  # port 80 may go unsaid
    assert not any("0.0.0.0" in host for host in page_server.allowed_hosts("0.0.0.0", 8000))


@pytest.mark.parametrize("raw", [
    b"BREW /coffee HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n",  # a method the server does not know
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n" + b"X-Long: " + b"x" * 70_000 + b"\r\n\r\n",  # header too long
    b"GARBAGE\r\n\r\n",  # no request line
    b"POST /api/inspect HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 999999999\r\n\r\n{}",  # oversized
    b"POST /api/inspect HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n",  # no length
])
def test_malformed_requests_get_a_4xx_json_answer_and_the_server_goes_on(echo_server, raw):
    port = echo_server.server_address[1]
    ((status, headers, answer),) = _exchange(port, raw.replace(b"{port}", str(port).encode()))
    assert 400 <= status < 500 and answer["error"] and headers.get("Connection") == "close"
    assert _post(port, {"sentence": "一"})[0] == 200


@pytest.mark.parametrize("document, message", [
    ({"sentence": "一", "prefix": "I", "reference": "I am."}, "not both"),
    ({"sentence": "一", "prefix": "I", "prefix_ids": [5], "prefix_model": 0}, "once"),
    ({"sentence": "一", "prefix_ids": [5]}, "prefix_model"),
    ({"sentence": "一", "prefix_ids": ["5"], "prefix_model": 0}, "piece ids"),
    ({"sentence": "一", "prefix_ids": [True], "prefix_model": 0}, "piece ids"),
    ({"sentence": "一", "prefix_model": 0}, "both or neither"),
    ({"sentence": "一", "prefix": 3}, "string or null"),
])
def test_what_if_queries_that_make_no_sense_are_refused(echo_server, document, message):
    status, answer = _post(echo_server.server_address[1], document)
    assert status == 400 and message in answer["error"]


def test_page_data_cannot_close_its_script_element():
    from seq2seq.analysis.page import render_page

    html = render_page([], {"mode": "mean", "layer": None, "head": None, "units": "words", "describe": ""},
                       "</script><script>alert(1)</script>")
    assert html.count("</script>") == 2 and "<title>&lt;/script&gt;" in html
