"""The interactive attention page: one self-contained HTML file (inline CSS and JavaScript, the data embedded as
JSON, nothing fetched), written by `python -m seq2seq.inspect ... --html page.html` and served by `--serve`.

Each model's heatmap side by side; hovering a target word highlights the source words it attends to, with their
weights; the view switches between the mean of all layers and heads, one layer (mean of its heads) and one
head, and between SentencePiece pieces and words (`diagnostics.merge_words`); the diagnostics table of the
inspector sits below. In server mode a form sends new sentences to the server, which answers with the same data.

The page marks itself with `data-ready="1"` on <body> once drawn and lists any script error in #errors, so a
headless browser can check it (tests/test_page.py).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

from seq2seq.analysis import diagnostics as analysis
from seq2seq.analysis.inspection import Inspection, View
from seq2seq.models.base import NO_ATTENTION

WEIGHT_DECIMALS = 5


def _layers(layers: np.ndarray) -> list:
    return np.round(layers.astype(np.float64), WEIGHT_DECIMALS).tolist()


def page_item(inspection: Inspection) -> dict:
    """The JSON one sentence contributes to the page: every model's maps over pieces and over words (all
    layers and heads; the page averages them for the mean views) and the inspector's diagnostics."""
    models = []
    for item, report in zip(inspection.inspected, inspection.reports):
        model: dict = {"label": item.label, "family": item.family, "translation": item.translation,
                       "forced": item.forced, "has_attention": item.layers is not None, "report": report}
        if item.layers is None:
            model["note"] = f"no attention: {NO_ATTENTION}"
        else:
            src, tgt = analysis.merge_words(item.src_pieces), analysis.merge_words(item.tgt_pieces)
            model["pieces"] = {"src": item.src_pieces, "tgt": item.tgt_pieces, "layers": _layers(item.layers)}
            model["words"] = {"src": src.labels, "tgt": tgt.labels,
                              "layers": _layers(analysis.merge_attention(item.layers, src, tgt))}
        models.append(model)
    return {"sentence": inspection.sentence, "reference": inspection.reference, "models": models,
            "agreement": inspection.agreement}


def page_view(view: View, words: bool) -> dict:
    """The view the page opens with (the one the diagnostics were computed on)."""
    if view.head is not None:
        mode = "head"
    elif view.layer is not None:
        mode = "layer"
    else:
        mode = "mean"
    return {"mode": mode, "layer": view.layer, "head": view.head, "units": "words" if words else "pieces",
            "describe": view.describe()}


def _embedded(document: dict) -> str:
    """JSON safe inside <script>: no "</script>" or "<!--" can close or confuse the element."""
    return json.dumps(document, ensure_ascii=False).replace("<", "\\u003c").replace(">", "\\u003e")


def render_page(items: Sequence[dict], view: dict, title: str, live: bool = False,
                max_chars: int | None = None) -> str:
    """The whole page as one string. `live`: with the form that posts sentences to the server's /api/inspect."""
    document = {"items": list(items), "view": view, "title": title, "live": live, "max_chars": max_chars}
    return (PAGE_TEMPLATE.replace("__TITLE__", _html_text(title))
            .replace("__DATA__", _embedded(document)))


def _html_text(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


PAGE_TEMPLATE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
  body { font-family: system-ui, "Noto Sans", "Noto Sans CJK SC", "WenQuanYi Micro Hei", sans-serif; margin: 1em 1.5em;
         color: #222; }
  h1 { font-size: 1.2em; margin: 0 0 .5em; }
  #controls { display: flex; flex-wrap: wrap; gap: 1em; align-items: center; margin-bottom: .8em; }
  #controls label { font-size: .9em; }
  #live { margin-bottom: 1em; display: none; gap: .5em; flex-wrap: wrap; align-items: center; }
  #live input[type=text] { width: 28em; font-size: 1em; padding: .2em .4em; }
  #status { font-size: .9em; color: #555; }
  #status.error { color: #b00020; }
  #panels { display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; }
  .panel { border: 1px solid #ddd; border-radius: 6px; padding: .6em; max-width: 100%; overflow: auto; }
  .panel h2 { font-size: 1em; margin: 0 0 .2em; }
  .translation { font-size: .95em; margin: 0 0 .5em; color: #333; }
  .note { color: #666; font-size: .9em; padding: 2em 1em; max-width: 18em; }
  table.map { border-collapse: collapse; font-size: 13px; }
  table.map th { font-weight: normal; padding: 1px 4px; white-space: nowrap; }
  table.map thead th { vertical-align: bottom; }
  table.map tbody th { text-align: right; cursor: default; }
  table.map td { width: 22px; height: 22px; min-width: 22px; border: 1px solid #fff; }
  table.map tr.hover td { outline: 1px solid #f33; }
  table.map tr.hover th { background: #fde0e0; }
  table.map th.src { transition: background .1s; }
  .weight { display: block; font-size: 10px; color: #b00020; min-height: 12px; }
  #diagnostics { margin-top: 1.2em; }
  #diagnostics table { border-collapse: collapse; font-size: .9em; }
  #diagnostics th, #diagnostics td { border-bottom: 1px solid #eee; padding: 2px 8px; text-align: left; }
  #errors { color: #b00020; white-space: pre-wrap; }
  .legend { font-size: .8em; color: #555; }
</style>
</head>
<body data-ready="0">
<h1 id="title"></h1>
<form id="live" autocomplete="off">
  <input id="sentence" type="text" placeholder="a sentence to translate" required>
  <input id="reference" type="text" placeholder="reference translation (optional: forced decoding)">
  <button type="submit">Translate</button>
  <span id="status"></span>
</form>
<div id="controls">
  <label id="item-label">sentence <select id="item"></select></label>
  <label>map <select id="mode">
    <option value="mean">mean of layers and heads</option>
    <option value="layer">one layer (mean of its heads)</option>
    <option value="head">one head</option>
  </select></label>
  <label>layer <select id="layer"></select></label>
  <label>head <select id="head"></select></label>
  <label><input type="radio" name="units" value="words"> words</label>
  <label><input type="radio" name="units" value="pieces"> pieces</label>
  <span class="legend">rows: target, columns: source; hover a target word to see its source weights</span>
</div>
<div id="panels"></div>
<div id="diagnostics"></div>
<pre id="errors"></pre>
<script type="application/json" id="data">__DATA__</script>
<script>
"use strict";
(function () {
  const errors = document.getElementById("errors");
  window.addEventListener("error", (event) => { errors.textContent += "error: " + event.message + "\n"; });
  const data = JSON.parse(document.getElementById("data").textContent);
  const state = { item: Math.max(data.items.length - 1, 0), mode: data.view.mode,
                  layer: data.view.layer || 1, head: data.view.head || 1, units: data.view.units };
  const $ = (id) => document.getElementById(id);
  const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];

  function colour(w) {
    const x = Math.min(Math.max(w, 0), 1) * (VIRIDIS.length - 1);
    const i = Math.min(Math.floor(x), VIRIDIS.length - 2), f = x - i;
    const c = VIRIDIS[i].map((v, k) => Math.round(v + f * (VIRIDIS[i + 1][k] - v)));
    return "rgb(" + c.join(",") + ")";
  }

  function element(tag, attributes, text) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attributes || {})) node.setAttribute(key, value);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // (T, S) map of the current view from the (L, H, T, S) weights: a model with fewer layers or heads shows its last.
  function viewMap(layers) {
    const L = layers.length, H = layers[0].length;
    let chosen;
    if (state.mode === "mean") chosen = layers.flat();
    else if (state.mode === "layer") chosen = layers[Math.min(state.layer, L) - 1];
    else chosen = [layers[Math.min(state.layer, L) - 1][Math.min(state.head, H) - 1]];
    const T = chosen[0].length, S = chosen[0][0].length;
    const out = [];
    for (let t = 0; t < T; t++) {
      const row = new Array(S).fill(0);
      for (const m of chosen) for (let s = 0; s < S; s++) row[s] += m[t][s];
      out.push(row.map((v) => v / chosen.length));
    }
    return out;
  }

  function fillSelect(select, count, value) {
    select.textContent = "";
    for (let i = 1; i <= count; i++) select.appendChild(element("option", { value: String(i) }, String(i)));
    select.value = String(Math.min(value, Math.max(count, 1)));
  }

  function depth(item) {
    let layers = 1, heads = 1;
    for (const model of item.models) {
      if (!model.has_attention) continue;
      layers = Math.max(layers, model.pieces.layers.length);
      heads = Math.max(heads, model.pieces.layers[0].length);
    }
    return [layers, heads];
  }

  function heatmap(model) {
    const side = model[state.units];
    const matrix = viewMap(side.layers);
    const table = element("table", { class: "map" });
    const head = table.appendChild(element("thead")).appendChild(element("tr"));
    head.appendChild(element("th"));
    const sourceCells = side.src.map((label) => {
      const th = element("th", { class: "src" });
      th.appendChild(element("span", {}, label));
      const weight = th.appendChild(element("span", { class: "weight" }));
      head.appendChild(th);
      return [th, weight];
    });
    const body = table.appendChild(element("tbody"));
    matrix.forEach((row, t) => {
      const tr = body.appendChild(element("tr"));
      tr.appendChild(element("th", { class: "tgt" }, side.tgt[t]));
      row.forEach((w, s) => {
        const td = element("td", { "data-w": w.toFixed(4), title: side.tgt[t] + " → " + side.src[s] + ": " + w.toFixed(3) });
        td.style.background = colour(w);
        tr.appendChild(td);
      });
      tr.addEventListener("mouseenter", () => {
        tr.classList.add("hover");
        row.forEach((w, s) => {
          sourceCells[s][0].style.background = "rgba(255, 80, 80, " + Math.min(w * 1.5, 1).toFixed(3) + ")";
          sourceCells[s][1].textContent = w >= 0.01 ? w.toFixed(2) : "";
        });
      });
      tr.addEventListener("mouseleave", () => {
        tr.classList.remove("hover");
        sourceCells.forEach(([th, weight]) => { th.style.background = ""; weight.textContent = ""; });
      });
    });
    return table;
  }

  function panel(model) {
    const section = element("section", { class: "panel", "data-model": model.label });
    section.appendChild(element("h2", {}, model.label));
    section.appendChild(element("p", { class: "translation" },
      (model.forced ? "reference (forced): " : "translation: ") + (model.translation || "(empty)")));
    if (!model.has_attention) {
      section.appendChild(element("div", { class: "note" }, model.note));
    } else {
      section.appendChild(heatmap(model));
    }
    return section;
  }

  function fixed(value, digits) { return typeof value === "number" ? value.toFixed(digits) : "n/a"; }

  function diagnostics(item) {
    const box = $("diagnostics");
    box.textContent = "";
    box.appendChild(element("h2", { style: "font-size:1em" }, "Diagnostics on words (" + data.view.describe + ")"));
    const table = box.appendChild(element("table"));
    const header = table.appendChild(element("tr"));
    for (const name of ["model", "mean entropy", "uniform", "</s> share", "punctuation share", "uncovered", "loss (nats)"])
      header.appendChild(element("th", {}, name));
    for (const model of item.models) {
      const r = model.report, tr = table.appendChild(element("tr"));
      const entropy = r.has_attention ? r.row_entropy.reduce((a, b) => a + b, 0) / r.row_entropy.length : null;
      const cells = r.has_attention
        ? [r.model, fixed(entropy, 2), fixed(r.uniform_entropy, 2), fixed(r.eos_share, 2), fixed(r.punctuation_share, 2),
           r.uncovered.join(" ") || "-", fixed(r.loss, 2)]
        : [r.model, "no attention", "", "", "", "", fixed(r.loss, 2)];
      for (const cell of cells) tr.appendChild(element("td", {}, cell));
    }
    for (const pair of item.agreement) {
      box.appendChild(element("p", { class: "agreement" }, pair.models[0] + " vs " + pair.models[1] + ": agreement " +
        fixed(pair.agreement, 2) + ", overlap " + fixed(pair.overlap, 2) + " over " + pair.compared_words + " words"));
    }
  }

  function draw() {
    const panels = $("panels");
    panels.textContent = "";
    $("diagnostics").textContent = "";
    if (!data.items.length) { panels.appendChild(element("p", {}, "Type a sentence above.")); return; }
    const item = data.items[state.item];
    const [layers, heads] = depth(item);
    fillSelect($("layer"), layers, state.layer);
    fillSelect($("head"), heads, state.head);
    $("layer").disabled = state.mode === "mean";
    $("head").disabled = state.mode !== "head";
    for (const model of item.models) panels.appendChild(panel(model));
    diagnostics(item);
  }

  function fillItems() {
    const select = $("item");
    select.textContent = "";
    data.items.forEach((item, i) => select.appendChild(element("option", { value: String(i) }, item.sentence)));
    select.value = String(state.item);
    $("item-label").style.display = data.items.length > 1 ? "" : "none";
  }

  $("title").textContent = data.title;
  $("mode").value = state.mode;
  for (const radio of document.querySelectorAll("input[name=units]")) {
    radio.checked = radio.value === state.units;
    radio.addEventListener("change", () => { state.units = radio.value; draw(); });
  }
  $("mode").addEventListener("change", (e) => { state.mode = e.target.value; draw(); });
  $("layer").addEventListener("change", (e) => { state.layer = Number(e.target.value); draw(); });
  $("head").addEventListener("change", (e) => { state.head = Number(e.target.value); draw(); });
  $("item").addEventListener("change", (e) => { state.item = Number(e.target.value); draw(); });

  if (data.live) {
    const form = $("live"), status = $("status");
    form.style.display = "flex";
    if (data.max_chars) $("sentence").maxLength = data.max_chars;
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      status.className = "";
      status.textContent = "translating…";
      try {
        const response = await fetch("api/inspect", { method: "POST", headers: { "Content-Type": "application/json" },
          body: JSON.stringify({ sentence: $("sentence").value, reference: $("reference").value || null }) });
        const answer = await response.json();
        if (!response.ok) throw new Error(answer.error || response.statusText);
        data.items.push(answer);
        state.item = data.items.length - 1;
        fillItems();
        draw();
        status.textContent = "";
      } catch (error) {
        status.className = "error";
        status.textContent = String(error.message || error);
      }
    });
  }
  fillItems();
  draw();
  document.body.setAttribute("data-ready", "1");
})();
</script>
</body>
</html>
"""
