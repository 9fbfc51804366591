"""The interactive page and its server: `inspect --html` opened in a real headless browser (every model's panel,
no script error, the weights of the --json diagnostics), and `inspect --serve` answering good and bad requests."""

from __future__ import annotations

import base64
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

import numpy as np
import pytest
import torch

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


CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1600,1000")

# What the page draws, read back from its SVG: per panel the attention map, the next words, the beam tree and
# the expanded node's attention.
READ_PAGE = """
const weights = (svg) => svg ? [...svg.querySelectorAll("g.row")].map(
  (g) => [...g.querySelectorAll("rect")].map((r) => Number(r.dataset.w))) : [];
return [...document.querySelectorAll("#panels .panel")].map((p) => ({
  model: p.dataset.model,
  translation: p.querySelector(".translation").textContent.replace(/^[^:]*: /, ""),
  prefix: p.querySelector(".translation .prefix") ? p.querySelector(".translation .prefix").textContent : null,
  weights: weights(p.querySelector("svg[data-kind=attention]")),
  attribution: weights(p.querySelector("svg[data-kind=attribution]")),
  words: [...p.querySelectorAll("svg[data-kind=next-words] g.word")].map((g) => ({
    step: Number(g.dataset.step), piece: g.dataset.piece, p: Number(g.dataset.p), chosen: g.dataset.chosen === "1"})),
  nodes: [...p.querySelectorAll("svg[data-kind=beam-tree] g.node")].map((g) => ({
    id: Number(g.dataset.node), piece: g.dataset.piece, score: Number(g.dataset.score), best: g.dataset.best === "1"})),
  details: weights(p.querySelector("svg[data-kind=node-attention]")),
  note: p.querySelector(".note") ? p.querySelector(".note").textContent : null,
}));
"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium driven by Selenium through Debian's chromedriver."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install -e '.[dev]' installs selenium")
    chromium, driver = _browser(), shutil.which("chromedriver")
    if driver is None:
        pytest.skip("no chromedriver installed; on Debian: apt-get install -y chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('profile')}"):
        options.add_argument(flag)
    session = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    session.set_script_timeout(60)
    try:
        yield session
    finally:
        session.quit()


def _wait(browser, condition: str, timeout: float = 120) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, timeout).until(lambda driver: driver.execute_script("return " + condition))


def _drawn(browser) -> list[dict]:
    assert browser.find_element("id", "errors").text == ""
    return browser.execute_script(READ_PAGE)


def _click(browser, selector: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    element = browser.find_element("css selector", selector)
    browser.execute_script("arguments[0].scrollIntoView({block: 'center', inline: 'center'})", element)
    ActionChains(browser).move_to_element(element).click().perform()


def _png_size(data_url: str) -> tuple[int, int]:
    png = base64.b64decode(data_url.split(",", 1)[1])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def _n_best(checkpoint, count: int) -> list[tuple[float, str]]:
    """`translate --n-best` of SENTENCE: (score, text) best first."""
    run = subprocess.run([sys.executable, "-m", "seq2seq.translate", "--checkpoint", str(checkpoint), "--precision",
                          "fp32", "--n-best", str(count), SENTENCE], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return [(float(score), text) for _, score, text in (line.split("\t") for line in run.stdout.splitlines())]


def _three(checkpoints) -> list[str]:
    return [arg for name in ("rnn", "bahdanau", "transformer") for arg in ("--checkpoint", str(checkpoints[name]))]


def test_page_in_a_headless_browser_draws_the_json_weights_and_translate_s_search(browser, checkpoints, tmp_path):
    page, report = tmp_path / "page.html", tmp_path / "page.json"
    run = subprocess.run([sys.executable, "-m", "seq2seq.inspect", *_three(checkpoints), SENTENCE, "--words",
                          "--explain", "attention", "--explain", "saliency", "--html", str(page), "--json",
                          str(report)], capture_output=True, timeout=300)
    assert run.returncode == 0, run.stderr.decode()
    html = page.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html), "the page must not fetch anything"
    browser.get(page.as_uri())
    _wait(browser, 'document.body.dataset.ready === "1"')
    drawn = _drawn(browser)
    models = json.loads(report.read_text(encoding="utf-8"))["models"]
    searches = browser.execute_script(
        "return JSON.parse(document.getElementById('data').textContent).items[0].models.map((m) => m.search)")
    assert [panel["model"] for panel in drawn] == [model["model"] for model in models]
    for panel, model, search, name in zip(drawn, models, searches, ("rnn", "bahdanau", "transformer")):
        assert panel["translation"] == model["translation"]
        if model["has_attention"]:
            np.testing.assert_allclose(np.array(panel["weights"]), np.array(model["weights"]), atol=2e-4)
        else:
            assert panel["weights"] == [] and "no attention" in panel["note"]
        # The tree holds translate's two best: the chosen path ends in the best score, the runner-up finished too.
        (best_score, best_text), (second_score, _) = _n_best(checkpoints[name], 2)
        assert best_text == model["translation"]
        finals = [node["final"] for node in search["nodes"] if node["final"] is not None]
        assert search["nodes"][search["best_path"][-1]]["final"] == pytest.approx(best_score, abs=1e-3)
        assert any(final == pytest.approx(second_score, abs=1e-3) for final in finals)
        best = [node for node in panel["nodes"] if node["best"]]
        assert [node["id"] for node in best] == search["best_path"] and len(panel["nodes"]) == len(search["nodes"])
        assert best[0]["piece"] == "<s>" and best[-1]["piece"] == "</s>"
        chosen = [word for word in panel["words"] if word["chosen"]]
        assert [word["piece"] for word in chosen] == [node["piece"] for node in best[1:]]
        assert all(0 <= word["p"] <= 1 for word in panel["words"])

    # Gradient attributions are a map of their own beside attention, for every model (the rnn too).
    from selenium.webdriver.support.select import Select

    Select(browser.find_element("id", "mode")).select_by_value("attribution:saliency")
    for panel, model in zip(_drawn(browser), models):
        np.testing.assert_allclose(np.array(panel["attribution"]), np.array(model["attributions"]["saliency"]["weights"]),
                                   atol=2e-4)
    Select(browser.find_element("id", "mode")).select_by_value("mean")

    # Bahdanau's attention while searching is the attention forced decoding reads: expanding the last node of the
    # chosen path draws the same map as the panel (in pieces).
    browser.find_element("css selector", "input[name=units][value=pieces]").click()
    _click(browser, f'section.panel:nth-child(2) g.node[data-node="{searches[1]["best_path"][-1]}"]')
    bahdanau = _drawn(browser)[1]
    np.testing.assert_allclose(np.array(bahdanau["details"]), np.array(bahdanau["weights"]), atol=2e-3)

    svg = browser.execute_script("return window.attentionPage.exportSVG()")
    assert svg.startswith("<svg") and all(model["model"] in svg for model in models)
    width, height = _png_size(browser.execute_async_script(
        "window.attentionPage.exportPNG().then(arguments[0], (e) => arguments[0]('error: ' + e))"))
    assert width > 800 and height > 300


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
    """`inspect --serve --port 0` with the three checkpoints; yields the port it chose."""
    process = subprocess.Popen(
        [sys.executable, "-m", "seq2seq.inspect", *_three(checkpoints), "--serve", "--port", "0"],
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
    assert [model["family"] for model in answer["models"]] == ["rnn", "bahdanau", "transformer"]
    assert all(model["words"]["layers"] for model in answer["models"][1:])
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
    bad = [  # (raw request, the status it must get), sent among good ones from 12 threads at once
        (_raw("POST", "/api/nothing", ONE, served) + _raw("GET", "/api/health", port=served), 404),
        (_raw("POST", "/api/inspect", ONE, served, Content_Length="²"), 411),
        (_raw("POST", "/api/inspect", ONE, Host="evil.example"), 403),
        (_raw("POST", "/api/inspect", ONE, served, Origin="http://evil.example"), 403),
        (_raw("POST", "/api/inspect", b"{", served), 400),
        (_raw("POST", "/api/inspect", b"x", served, Content_Length=str(10 ** 9)), 413),
    ]

    def one(number: int) -> int:
        if number % 2:
            raw, expected = bad[number // 2 % len(bad)]
            ((status, _, answer),) = _exchange(served, raw)
            assert status == expected and answer["error"]
            return status
        status, answer = _post(served, {"sentence": "他昨天去了图书馆。", "prefix": "He" if number % 4 else None})
        assert status in (200, 503), answer
        return status

    with ThreadPoolExecutor(max_workers=12) as pool:
        statuses = list(pool.map(one, range(24)))
    assert 200 in statuses
    assert _post(served, {"sentence": SENTENCE})[0] == 200  # still serving


def test_the_live_page_explores_the_search_as_a_teacher_would(browser, served):
    """Type a sentence, click a next word the model did not choose (what if?), expand a node, type a prefix:
    what is drawn each time is what the server answers for the same question."""
    browser.get(f"http://127.0.0.1:{served}/")
    _wait(browser, 'document.body.dataset.ready === "1"')
    browser.find_element("id", "sentence").send_keys(SENTENCE)
    browser.find_element("css selector", "#live button[type=submit]").click()
    _wait(browser, 'document.body.dataset.pending === "0" && document.querySelectorAll(".panel").length === 3')
    status, answer = _post(served, {"sentence": SENTENCE})
    assert status == 200
    for panel, model in zip(_drawn(browser), answer["models"]):
        assert panel["translation"] == model["translation"] and panel["prefix"] is None
        assert [node["piece"] for node in panel["nodes"]] == [node["piece"] for node in model["search"]["nodes"]]
        assert [node["score"] for node in panel["nodes"]] == [node["score"] for node in model["search"]["nodes"]]

    # What if the Transformer had begun with its second choice?
    transformer = answer["models"][2]["search"]
    start = transformer["nodes"][0]
    chosen = transformer["nodes"][transformer["best_path"][1]]["token"]
    other = next(word for word in start["next"] if word["token"] != chosen and word["piece"].strip("▁"))
    _click(browser, f'section.panel:nth-child(3) g.word[data-step="0"][data-chosen="0"][data-piece="{other["piece"]}"]')
    _wait(browser, 'document.body.dataset.pending === "0" && document.getElementById("item").options.length === 2')
    status, forced = _post(served, {"sentence": SENTENCE, "prefix_ids": [other["token"]], "prefix_model": 2})
    assert status == 200 and forced["prefix"]
    drawn = _drawn(browser)
    for panel, model in zip(drawn, forced["models"]):
        assert panel["translation"] == model["translation"] and panel["prefix"] == model["prefix"]
        assert [node["score"] for node in panel["nodes"]] == [node["score"] for node in model["search"]["nodes"]]
    search = forced["models"][2]["search"]
    first = search["nodes"][search["best_path"][1]]
    assert search["prefix_length"] == 1 and first["forced"] and first["token"] == other["token"]
    assert first["p"] == pytest.approx(other["p"], abs=1e-4)  # the forced word costs what the model said it would

    # Expand the second node of the Transformer's chosen path: its attention, step by step.
    node = search["nodes"][search["best_path"][2]]
    _click(browser, f'section.panel:nth-child(3) g.node[data-node="{node["id"]}"]')
    details = _drawn(browser)[2]["details"]
    expected = [search["nodes"][i]["attention"] for i in search["best_path"][1:3]]
    np.testing.assert_allclose(np.array(details), np.array(expected), atol=1e-4)

    # A typed prefix goes to every model.
    browser.find_element("id", "prefix").send_keys("I am")
    browser.find_element("css selector", "#live button[type=submit]").click()
    _wait(browser, 'document.body.dataset.pending === "0" && document.getElementById("item").options.length === 3')
    drawn = _drawn(browser)
    assert all(panel["prefix"] == "I am" and panel["translation"].startswith("I am") for panel in drawn)
    assert browser.find_element("id", "status").text == ""


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
        assert status == 403 and ("refused" in answer["error"] or "only" in answer["error"])
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


def test_a_diverged_model_is_shown_with_a_note_and_the_others_as_usual(checkpoints):
    """A checkpoint whose weights are NaN: its search finishes nothing, its panel says why, the page data is
    strict JSON, and the other model is unaffected."""
    from seq2seq.analysis import inspection
    from seq2seq.analysis.page import page_item, strict_json

    models = inspection.load_models([checkpoints["bahdanau"], checkpoints["transformer"]], torch.device("cpu"))
    with torch.no_grad():
        for parameter in models[0][1].model.parameters():
            parameter.fill_(float("nan"))
    result = inspection.inspect_sentence(models, SENTENCE, None, inspection.View(), 0.1, None, torch.device("cpu"))
    item = json.loads(strict_json(page_item(result)), parse_constant=_no_nan)
    diverged, healthy = item["models"]
    assert diverged["translation"] == "" and "NaN" in diverged["search"]["note"]
    assert healthy["translation"] and healthy["search"]["note"] is None


def test_inspect_prefix_forces_the_start_of_every_model_s_translation(checkpoints, tmp_path):
    from seq2seq.inspect import main

    report = tmp_path / "prefix.json"
    assert main([*_three(checkpoints), SENTENCE, "--prefix", "I am", "--json", str(report)]) == 0
    models = json.loads(report.read_text(encoding="utf-8"))["models"]
    assert len(models) == 3 and all(model["translation"].startswith("I am") for model in models)
    assert main([*_three(checkpoints), SENTENCE, "--prefix", "I am", "--reference", "I am."]) == 2
