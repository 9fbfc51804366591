"""The interactive page and its server: `inspect --html` opened in a real headless browser (every model's panel,
no script error, the weights of the --json diagnostics), and `inspect --serve` answering good and bad requests."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser

import numpy as np
import pytest

from seq2seq.analysis import server as page_server

SENTENCE = "我是一个学生。"
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


def test_server_says_busy_when_the_queue_is_full():
    answered = []
    server = page_server.InspectServer(("127.0.0.1", 0), "<html></html>",
                                       lambda sentence, reference: answered.append(sentence) or {"ok": sentence})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        for _ in range(page_server.MAX_WAITING + 1):  # as many requests as may run or wait
            server.waiting.acquire()
        status, answer = _post(port, {"sentence": "一"})
        assert status == 503 and "busy" in answer["error"] and answered == []
        for _ in range(page_server.MAX_WAITING + 1):
            server.waiting.release()
        assert _post(port, {"sentence": "一"}) == (200, {"ok": "一"})
    finally:
        server.shutdown()
        server.server_close()


def test_page_data_cannot_close_its_script_element():
    from seq2seq.analysis.page import render_page

    html = render_page([], {"mode": "mean", "layer": None, "head": None, "units": "words", "describe": ""},
                       "</script><script>alert(1)</script>")
    assert html.count("</script>") == 2 and "<title>&lt;/script&gt;" in html
