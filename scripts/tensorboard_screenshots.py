"""Screenshot TensorBoard the way a user sees it: Scalars, Images, Text and HParams pages of a logdir, as PNG files.

    python scripts/tensorboard_screenshots.py runs --out docs/images
    python scripts/tensorboard_screenshots.py runs/tatoeba_zh_en --out docs/images --images-filter 'layer_6$'

Starts `tensorboard --logdir LOGDIR` on 127.0.0.1 (never another interface), opens each page in headless Chromium and
writes scalars.png, images.png, text.png and hparams.png into --out; TensorBoard and Chromium are stopped afterwards,
also on errors and Ctrl-C. This is how the README's screenshots are made; rerun it after a training run to refresh them.

  scalars.png  the Time Series dashboard, filtered to --scalars-filter (train loss/lr, valid loss/BLEU by default)
  images.png   the Images dashboard at actual image size, filtered to --images-filter (the attention heatmaps)
  text.png     the Text dashboard (validation samples, BLEU by length)
  hparams.png  the HParams table: one row per run, hyperparameters against final metrics (columns past the window's
               right edge are cut off: retake it wider, e.g. `--pages hparams --width 2200 --height 700`)

Needs Debian's Chromium (`apt-get install chromium`) and, for Chinese text, a CJK font (`apt-get install
fonts-noto-cjk`); nothing from pip: the browser is driven over the DevTools protocol on a pipe
(--remote-debugging-pipe) with only the standard library. Each page is captured once its data and image requests have
gone quiet and its images have loaded. A page still loading at --page-timeout, or showing TensorBoard's "no data"
message, is saved anyway and reported (exit status 1), so what went wrong can be seen.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--enable-unsafe-swiftshader",  # software WebGL for the scalar charts (only local TensorBoard pages are opened)
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
    "--remote-debugging-pipe",
)
DEFAULT_SCALARS_FILTER = r"^(train/(loss|lr)|valid/(loss|bleu))$"
DEFAULT_IMAGES_FILTER = r"^attention/\d+(/layer_\d+)?$"  # per-layer heatmaps; the wide per-head grids left out
# Requests whose end means data has arrived. Scripts are left out: the scalar charts' worker script is fetched by the
# worker, whose "finished" event never reaches the page, and the page's own scripts are done by its load event anyway.
WATCHED_REQUESTS = ("Document", "XHR", "Fetch", "Image", "Media")
# TensorBoard's own empty-state messages; a page showing one of these rendered, but has nothing to show.
EMPTY_MESSAGES = (
    "No dashboards are active",
    "No scalar data was found",
    "No image data was found",
    "No text data was found",
    "No hparams data was found",
    "No matches for tag filter",
)

# Walks the page including every shadow root (TensorBoard's legacy dashboards are Polymer web components).
PAGE_STATE_JS = """
(() => {
  const state = {images: 0, loaded: 0, canvases: 0, text: ""};
  const texts = [];
  const walk = (root) => {
    for (const el of root.querySelectorAll("*")) {
      if (el.tagName === "IMG" && el.getBoundingClientRect().width > 0) {
        state.images++;
        if (el.complete && el.naturalWidth > 0) state.loaded++;
      }
      if (el.tagName === "CANVAS") state.canvases++;
      if (el.shadowRoot) { texts.push(el.shadowRoot.textContent || ""); walk(el.shadowRoot); }
    }
  };
  walk(document);
  texts.push(document.body ? document.body.innerText : "");
  state.text = texts.join(" ").replace(/\\s+/g, " ");
  return JSON.stringify(state);
})()
"""


# The Images dashboard squeezes each image into a ~300 px card, too small to read a heatmap's labels; its "Show actual
# image size" box (not kept in the URL or localStorage) is ticked as a user would. The Time Series image cards are not
# used for images.png: they cap the card height, so an actual-size heatmap is cut off there.
SHOW_ACTUAL_IMAGE_SIZE_JS = """
(() => {
  const find = (root) => {
    for (const el of root.querySelectorAll("*")) {
      if (el.tagName === "PAPER-CHECKBOX" && el.textContent.includes("Show actual image size")) return el;
      if (el.shadowRoot) { const hit = find(el.shadowRoot); if (hit) return hit; }
    }
    return null;
  };
  const box = find(document);
  if (!box) return "no checkbox";
  if (!box.checked) box.click();
  return box.checked ? "ok" : "not ticked";
})()
"""


@dataclass
class Page:
    name: str
    url: str
    card_min_width: int | None = None  # Time Series card width in px (a TensorBoard setting kept in localStorage)
    action: str | None = None  # JavaScript run once the page has rendered; the page is then awaited again
    plugin: str | None = None  # TensorBoard plugin whose tags the filters below select
    tag_filter: str = ""
    run_filter: str = ""


class ScreenshotError(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------------- TensorBoard


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


def start_tensorboard(logdir: Path, port: int, log_path: Path) -> subprocess.Popen:
    if port_in_use(port):
        raise ScreenshotError(f"something already listens on {HOST}:{port}; pick another --port.")
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", HOST, "--port", str(port)]
    with open(log_path, "wb") as log:
        # Its own process group, so TensorBoard and the data server it starts are stopped together.
        return subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )


def wait_for_tensorboard(proc: subprocess.Popen, port: int, log_path: Path, timeout: float) -> list[str]:
    """Wait until TensorBoard answers and its runs and scalar tags have stopped changing; returns the run names."""
    base = f"http://{HOST}:{port}/data"
    deadline = time.monotonic() + timeout
    answered, previous = False, None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ScreenshotError(f"TensorBoard exited with status {proc.returncode}:\n{tail(log_path)}")
        try:
            with urllib.request.urlopen(f"{base}/runs", timeout=5) as response:
                runs = json.load(response)
            with urllib.request.urlopen(f"{base}/plugin/scalars/tags", timeout=5) as response:
                tags = json.load(response)
            answered = True
            current = (runs, tags)
            if runs and current == previous:  # the event files found so far have been read
                return runs
            previous = current
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            pass
        time.sleep(1.0)
    if answered:
        raise ScreenshotError(f"TensorBoard found no runs under the logdir within {timeout:.0f} s:\n{tail(log_path)}")
    raise ScreenshotError(f"TensorBoard did not answer on {HOST}:{port} within {timeout:.0f} s:\n{tail(log_path)}")


def stop_process_group(proc: subprocess.Popen | None, grace: float = 5.0) -> None:
    """Stop a process started with start_new_session=True and everything left in its process group."""
    if proc is None:
        return
    if proc.poll() is None:
        signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            signal_group(proc.pid, signal.SIGKILL)
            proc.wait(timeout=grace)
    # Helpers (Chromium's renderers, TensorBoard's data server) may outlive the leader for a moment.
    signal_group(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while signal_group(proc.pid, 0) and time.monotonic() < deadline:
        time.sleep(0.1)
    signal_group(proc.pid, signal.SIGKILL)


def signal_group(pgid: int, sig: int) -> bool:
    """Send `sig` to the process group `pgid`; False once the group is gone."""
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


# Chromium's log lines that say nothing about a failure here: no D-Bus, no GPU, software WebGL.
LOG_NOISE = re.compile(r"dbus|WebGL|GL Driver|swiftshader|gpu/command_buffer", re.IGNORECASE)


def tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join([line for line in text if not LOG_NOISE.search(line)][-lines:])


# ----------------------------------------------------------------------------------------------------- Chromium


class Browser:
    """Headless Chromium driven by the DevTools protocol on fds 3/4 (--remote-debugging-pipe): no websocket, no pip."""

    def __init__(self, chromium: str, width: int, height: int, profile: Path, log_path: Path):
        to_chrome_r, self._write_fd = os.pipe()
        self._read_fd, from_chrome_w = os.pipe()
        # Chromium expects the protocol on fds 3 (commands in) and 4 (replies out). Park the child's ends on high,
        # close-on-exec fds first so the dup2s below cannot clobber one another.
        child_in = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD_CLOEXEC, 10)
        child_out = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_chrome_r)
        os.close(from_chrome_w)

        def attach_pipe() -> None:
            os.dup2(child_in, 3)
            os.dup2(child_out, 4)

        cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"]
        cmd.append("about:blank")
        try:
            with open(log_path, "wb") as log:
                # close_fds=False: Python's own fds are not inheritable anyway, and closing would drop the new fds 3/4.
                self.proc = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    preexec_fn=attach_pipe, close_fds=False, start_new_session=True,
                )
        except OSError:
            os.close(self._write_fd)
            os.close(self._read_fd)
            raise
        finally:
            os.close(child_in)
            os.close(child_out)
        self.log_path = log_path
        self._next_id = 0
        self._buffer = b""
        self._replies: dict[int, dict] = {}
        self.events: list[dict] = []

    # -- protocol

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30.0) -> dict:
        self._next_id += 1
        message: dict = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[os.write(self._write_fd, data):]
        deadline = time.monotonic() + timeout
        while self._next_id not in self._replies:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ScreenshotError(f"Chromium did not answer {method} within {timeout:.0f} s.")
            self.pump(min(left, 0.5))
        reply = self._replies.pop(self._next_id)
        if "error" in reply:
            raise ScreenshotError(f"Chromium refused {method}: {reply['error'].get('message', reply['error'])}")
        return reply.get("result", {})

    def pump(self, timeout: float) -> None:
        """Read whatever Chromium sent within `timeout` seconds; replies are kept by id, events appended in order."""
        ready, _, _ = select.select([self._read_fd], [], [], max(timeout, 0.0))
        if not ready:
            return
        chunk = os.read(self._read_fd, 1 << 20)
        if not chunk:
            raise ScreenshotError(
                f"Chromium closed the DevTools pipe (exit status {self.proc.poll()}):\n{tail(self.log_path)}"
            )
        self._buffer += chunk
        *messages, self._buffer = self._buffer.split(b"\0")
        for raw in messages:
            message = json.loads(raw)
            if "id" in message:
                self._replies[message["id"]] = message
            else:
                self.events.append(message)

    # -- pages

    def screenshot(self, page: Page, path: Path, width: int, height: int, scale: float, timeout: float,
                   settle: float) -> dict:
        """Open `page` in a fresh tab, wait until it has rendered, save a PNG of the viewport; return the page state."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        try:
            self.send("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": height, "deviceScaleFactor": scale, "mobile": False}, session)
            self.send("Page.enable", session=session)
            self.send("Network.enable", session=session)
            self.send("Page.addScriptToEvaluateOnNewDocument", {"source": settings_script(page)}, session)
            self.events.clear()
            self.send("Page.navigate", {"url": page.url}, session)
            state = self._wait_until_rendered(session, timeout, settle)
            if page.action and not state.get("timed_out"):
                result = self.send("Runtime.evaluate", {"expression": page.action, "returnByValue": True}, session)
                state = self._wait_until_rendered(session, timeout, settle, loaded=True)
                state["action"] = result.get("result", {}).get("value")
            data = self.send("Page.captureScreenshot", {"format": "png", "fromSurface": True}, session)["data"]
            path.write_bytes(base64.b64decode(data))
            return state
        finally:
            try:
                self.send("Target.closeTarget", {"targetId": target}, timeout=5)
            except (ScreenshotError, OSError):
                pass  # the browser has gone; the error that got us here says why

    def _wait_until_rendered(self, session: str, timeout: float, settle: float, loaded: bool = False) -> dict:
        """Loaded, no HTTP request in flight for `settle` seconds, every visible <img> decoded: then one more settle."""
        start = time.monotonic()
        in_flight: dict[str, str] = {}
        last_activity = start
        state: dict = {}
        while True:
            now = time.monotonic()
            self.pump(0.1)
            for event in self.events:
                if event.get("sessionId") != session:
                    continue
                method, params = event.get("method"), event.get("params", {})
                if method == "Page.loadEventFired":
                    loaded = True
                elif method == "Network.requestWillBeSent" and params.get("type") in WATCHED_REQUESTS:
                    in_flight[params["requestId"]] = params["request"]["url"]
                elif method in ("Network.loadingFinished", "Network.loadingFailed"):
                    in_flight.pop(params.get("requestId"), None)
                else:
                    continue
                last_activity = now
            self.events.clear()
            quiet = loaded and not in_flight and now - last_activity >= settle
            if quiet:
                state = self.page_state(session)
                if state["images"] == state["loaded"]:
                    break
            if now - start > timeout:
                state = self.page_state(session) if loaded else {"images": 0, "loaded": 0, "canvases": 0, "text": ""}
                state["timed_out"] = True
                state["pending"] = sorted(in_flight.values()) if loaded else ["(page load)"]
                return state
        # Charts are drawn after their data arrives (in a worker for the scalar cards): give them a moment.
        end = time.monotonic() + settle
        while time.monotonic() < end:
            self.pump(0.1)
        self.events.clear()
        return self.page_state(session)

    def page_state(self, session: str) -> dict:
        result = self.send("Runtime.evaluate", {"expression": PAGE_STATE_JS, "returnByValue": True}, session)
        return json.loads(result["result"]["value"])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("Browser.close", timeout=5)
            except (ScreenshotError, OSError):
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        stop_process_group(self.proc)
        for fd in (self._write_fd, self._read_fd):
            try:
                os.close(fd)
            except OSError:
                pass


def settings_script(page: Page) -> str:
    """Runs before TensorBoard's own scripts: Time Series settings pane closed, and the card width this page wants."""
    settings: dict = {"timeSeriesSettingsPaneOpened": False}
    if page.card_min_width:
        settings["timeSeriesCardMinWidth"] = page.card_min_width
    return (
        "try { const key = '_tb_global_settings';"
        " const old = JSON.parse(localStorage.getItem(key) || '{}');"
        f" localStorage.setItem(key, JSON.stringify(Object.assign(old, {json.dumps(settings)}))); }} catch (e) {{}}"
    )


# ----------------------------------------------------------------------------------------------------- main


def has_cjk_font() -> bool:
    """Whether fontconfig (which Chromium uses on Linux) knows a font for Chinese; True when that cannot be told."""
    fc_list = shutil.which("fc-list")
    if fc_list is None:
        return True
    try:
        found = subprocess.run([fc_list, ":lang=zh", "family"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return True
    return bool(found.strip())


def matching_tags(port: int, page: Page) -> int | None:
    """How many (run, tag) pairs of the page's plugin its filters select; None when that cannot be told.

    The legacy dashboards show every tag when the filter matches none, so an empty match would go unnoticed on the PNG.
    """
    if page.plugin is None:
        return None
    try:
        tag_re = re.compile(page.tag_filter, re.IGNORECASE)
        run_re = re.compile(page.run_filter, re.IGNORECASE)
        with urllib.request.urlopen(f"http://{HOST}:{port}/data/plugin/{page.plugin}/tags", timeout=10) as response:
            run_to_tags = json.load(response)
    except (re.error, urllib.error.URLError, OSError, json.JSONDecodeError):
        return None  # a JavaScript-only regex, or an older TensorBoard: let the screenshot speak
    return sum(
        1 for run, tags in run_to_tags.items() if run_re.search(run) for tag in tags if tag_re.search(tag)
    )


def build_pages(port: int, width: int, args: argparse.Namespace) -> list[Page]:
    base = f"http://{HOST}:{port}/"

    def time_series(tag_filter: str) -> str:
        query = {"tagFilter": tag_filter}
        if args.run_filter:
            query["runFilter"] = args.run_filter
        return base + "?" + urllib.parse.urlencode(query) + "#timeseries"

    def legacy(dashboard: str, tag_filter: str = "") -> str:
        hash_ = dashboard
        if tag_filter:
            hash_ += "&tagFilter=" + urllib.parse.quote(tag_filter, safe="")
        if args.run_filter:
            hash_ += "&regexInput=" + urllib.parse.quote(args.run_filter, safe="")
        return base + "#" + hash_

    # The Time Series grid is the window less the runs sidebar: two scalar cards a row (TensorBoard allows 335-735 px).
    grid = int(width * 0.78)
    return [
        Page("scalars", time_series(args.scalars_filter), card_min_width=min(735, max(335, grid // 2 - 40)),
             plugin="scalars", tag_filter=args.scalars_filter, run_filter=args.run_filter),
        Page("images", legacy("images", args.images_filter), action=SHOW_ACTUAL_IMAGE_SIZE_JS,
             plugin="images", tag_filter=args.images_filter, run_filter=args.run_filter),
        Page("text", legacy("text", args.text_filter), plugin="text", tag_filter=args.text_filter,
             run_filter=args.run_filter),
        Page("hparams", legacy("hparams")),
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    summary, details = __doc__.split("\n\n", 1)
    parser = argparse.ArgumentParser(
        description=summary, epilog=details, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("logdir", type=Path, help="folder TensorBoard serves (e.g. runs, or runs/<data>)")
    parser.add_argument("--out", type=Path, default=Path("docs/images"), help="PNG folder (default: docs/images)")
    parser.add_argument("--port", type=int, default=6123, help="TensorBoard port on 127.0.0.1 (default: 6123)")
    parser.add_argument("--width", type=int, default=1600, help="viewport width in CSS pixels (default: 1600)")
    parser.add_argument("--height", type=int, default=1000, help="viewport height in CSS pixels (default: 1000)")
    parser.add_argument("--scale", type=float, default=1.0, help="device pixel ratio; 2 gives sharper, 2x-sized PNGs")
    parser.add_argument("--pages", default="scalars,images,text,hparams", help="comma-separated subset to capture")
    parser.add_argument("--scalars-filter", default=DEFAULT_SCALARS_FILTER, help="tag regex for scalars.png")
    parser.add_argument("--images-filter", default=DEFAULT_IMAGES_FILTER, help="tag regex for images.png")
    parser.add_argument("--text-filter", default="", help="tag regex for text.png (default: all text)")
    parser.add_argument("--run-filter", default="", help="run regex applied to every page but HParams")
    parser.add_argument("--chromium", default=CHROMIUM, help=f"Chromium binary (default: {CHROMIUM})")
    parser.add_argument("--page-timeout", type=float, default=45.0, help="seconds to wait for one page to render")
    parser.add_argument("--settle", type=float, default=1.5, help="seconds of network quiet that count as rendered")
    parser.add_argument("--startup-timeout", type=float, default=90.0, help="seconds to wait for TensorBoard")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    chromium = shutil.which(args.chromium)
    if chromium is None:
        print(
            f"error: Chromium not found at {args.chromium}. Install Debian's packages first:\n"
            "    sudo apt-get update && sudo apt-get install -y chromium chromium-driver\n"
            "(or point --chromium at another Chromium/Chrome binary).",
            file=sys.stderr,
        )
        return 2
    if not args.logdir.is_dir():
        print(f"error: logdir {args.logdir} is not a folder.", file=sys.stderr)
        return 2
    if next(args.logdir.rglob("*tfevents*"), None) is None:
        print(f"error: no TensorBoard event files (*tfevents*) under {args.logdir}.", file=sys.stderr)
        return 2
    wanted = [name.strip() for name in args.pages.split(",") if name.strip()]
    pages = [page for page in build_pages(args.port, args.width, args) if page.name in wanted]
    unknown = set(wanted) - {page.name for page in pages}
    if unknown:
        choices = ", ".join(page.name for page in build_pages(args.port, args.width, args))
        print(f"error: unknown page(s) {', '.join(sorted(unknown))}; choose from {choices}.", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    if not has_cjk_font():
        print("note: no Chinese font is installed for Chromium, so Chinese text in text.png shows as boxes; "
              "`apt-get install fonts-noto-cjk` fixes that.", file=sys.stderr)

    problems: list[str] = []
    started = time.monotonic()
    tensorboard = browser = None
    with tempfile.TemporaryDirectory(prefix="tb-screenshots-") as tmp:
        tmp_path = Path(tmp)
        try:
            tensorboard = start_tensorboard(args.logdir, args.port, tmp_path / "tensorboard.log")
            runs = wait_for_tensorboard(tensorboard, args.port, tmp_path / "tensorboard.log", args.startup_timeout)
            print(f"TensorBoard on http://{HOST}:{args.port}/ serves {len(runs)} run(s) from {args.logdir}")
            browser = Browser(chromium, args.width, args.height, tmp_path / "profile", tmp_path / "chromium.log")
            for page in pages:
                path = args.out / f"{page.name}.png"
                t0 = time.monotonic()
                state = browser.screenshot(
                    page, path, args.width, args.height, args.scale, args.page_timeout, args.settle
                )
                note = f"{state['loaded']}/{state['images']} images"
                print(f"  {path}  ({time.monotonic() - t0:.1f} s, {note})  {page.url}")
                if state.get("timed_out"):
                    pending = ", ".join(state.get("pending", [])[:5])
                    problems.append(
                        f"{page.name}: still loading after {args.page_timeout:.0f} s, saved as it was "
                        f"(waiting for {pending})"
                    )
                if state.get("action") not in (None, "ok"):
                    problems.append(f"{page.name}: could not tick 'Show actual image size' ({state['action']})")
                if matching_tags(args.port, page) == 0:
                    problems.append(
                        f"{page.name}: no {page.plugin} tag matches the tag filter {page.tag_filter!r}"
                        + (f" in runs matching {page.run_filter!r}" if page.run_filter else "")
                        + " (TensorBoard then shows all of them)"
                    )
                empty = [message for message in EMPTY_MESSAGES if message in state["text"]]
                if empty:
                    problems.append(f"{page.name}: TensorBoard says {empty[0]!r} (check the logdir and filters)")
                if page.name == "images" and not state["loaded"] and not empty:
                    problems.append("images: no image was displayed")
        except (ScreenshotError, OSError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        finally:
            if browser is not None:
                browser.close()
            stop_process_group(tensorboard)
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    print(f"done in {time.monotonic() - started:.1f} s")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
