"""The interactive attention page: one self-contained HTML file (inline CSS and JavaScript, the data embedded as
JSON, nothing fetched), written by `python -m seq2seq.inspect ... --html page.html` and served by `--serve`.

Each model's heatmap side by side; hovering a target word highlights the source words it attends to, with their
weights; the view switches between the mean of all layers and heads, one layer (mean of its heads) and one
head, and between SentencePiece pieces and words (`diagnostics.merge_words`); the diagnostics table of the
inspector sits below. Under each map, the search that chose the translation (`search.explore`): the top-k
next words of every step with their probabilities, and the beam tree with its scores, where clicking a node
shows its attention and its next words. In server mode a form sends new sentences to the server, which
answers with the same data, and "what if" asks it to force a target prefix and search on from there: typed
in the form, or by clicking a next word (the path up to it, then that word). Everything drawn is SVG, and the
current view exports as one SVG or PNG file.

The page marks itself with `data-ready="1"` on <body> once drawn and `data-pending` with the number of
requests in flight, and lists any script error in #errors, so a headless browser can check it
(tests/test_page.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from seq2seq.analysis import diagnostics as analysis
from seq2seq.analysis.inspection import Inspection, View
from seq2seq.models.base import NO_ATTENTION

WEIGHT_DECIMALS = 5


def _layers(layers: np.ndarray) -> list:
    return np.round(layers.astype(np.float64), WEIGHT_DECIMALS).tolist()


def page_item(inspection: Inspection) -> dict:
    """The JSON one sentence contributes to the page: every model's maps over pieces and over words (all
    layers and heads; the page averages them for the mean views), its gradient attributions (one map per
    method, `inspect --explain`), its recorded search and the inspector's diagnostics."""
    models = []
    for item, report in zip(inspection.inspected, inspection.reports):
        model: dict = {"label": item.label, "family": item.family, "translation": item.translation,
                       "forced": item.forced, "has_attention": item.layers is not None, "report": report,
                       "src_pieces": item.src_pieces, "prefix": item.prefix, "search": item.search}
        src, tgt = analysis.merge_words(item.src_pieces), analysis.merge_words(item.tgt_pieces)
        if item.layers is None:
            model["note"] = f"no attention: {NO_ATTENTION}"
        else:
            model["pieces"] = {"src": item.src_pieces, "tgt": item.tgt_pieces, "layers": _layers(item.layers)}
            model["words"] = {"src": src.labels, "tgt": tgt.labels,
                              "layers": _layers(analysis.merge_attention(item.layers, src, tgt))}
        model["attributions"] = {method: {
            "pieces": {"src": item.src_pieces, "tgt": item.tgt_pieces, "map": _layers(pieces)},
            "words": {"src": src.labels, "tgt": tgt.labels, "map": _layers(analysis.merge_attention(pieces, src, tgt))},
        } for method, pieces in item.attributions.items()}
        models.append(model)
    prefix = next((item.prefix for item in inspection.inspected if item.prefix), None)
    return {"sentence": inspection.sentence, "reference": inspection.reference, "prefix": prefix, "models": models,
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


def _finite(value: Any) -> Any:
    """`value` with every float that is not finite (NaN, inf) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def strict_json(document: Any) -> str:
    """JSON a browser's JSON.parse accepts: a diverged model's NaN or infinite numbers become null (Python's
    json would write NaN, and the page would stay blank)."""
    try:
        return json.dumps(document, ensure_ascii=False, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(document), ensure_ascii=False, allow_nan=False)


def _embedded(document: dict) -> str:
    """JSON safe inside <script>: no "</script>" or "<!--" can close or confuse the element."""
    return strict_json(document).replace("<", "\\u003c").replace(">", "\\u003e")


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
  #live input[type=text] { width: 22em; font-size: 1em; padding: .2em .4em; }
  #status { font-size: .9em; color: #555; }
  #status.error { color: #b00020; }
  #panels { display: grid; grid-auto-flow: column; grid-auto-columns: minmax(18em, 1fr); gap: 1em;
            align-items: start; overflow-x: auto; }
  .panel { border: 1px solid #ddd; border-radius: 6px; padding: .6em; min-width: 0; overflow-x: auto; }
  .panel h2 { font-size: 1em; margin: 0 0 .2em; }
  .panel h3 { font-size: .9em; margin: .8em 0 .2em; color: #444; }
  .translation { font-size: .95em; margin: 0 0 .5em; color: #333; }
  .translation .prefix { background: #fff3cd; border-bottom: 2px dashed #c77c00; }
  .note { color: #666; font-size: .9em; padding: 1em; max-width: 22em; }
  .hint { color: #666; font-size: .8em; margin: 0 0 .3em; max-width: 40em; }
  svg text { font-family: system-ui, "Noto Sans", "Noto Sans CJK SC", "WenQuanYi Micro Hei", sans-serif; }
  svg .clickable { cursor: pointer; }
  svg .clickable:hover rect.box { stroke: #d62728; stroke-width: 2; }
  #diagnostics { margin-top: 1.2em; }
  #diagnostics table { border-collapse: collapse; font-size: .9em; }
  #diagnostics th, #diagnostics td { border-bottom: 1px solid #eee; padding: 2px 8px; text-align: left; }
  #errors { color: #b00020; white-space: pre-wrap; }
  .legend { font-size: .8em; color: #555; }
</style>
</head>
<body data-ready="0" data-pending="0">
<h1 id="title"></h1>
<form id="live" autocomplete="off">
  <input id="sentence" type="text" placeholder="a sentence to translate" required>
  <input id="prefix" type="text" placeholder="what if the translation began with… (optional)">
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
  <button type="button" id="export-svg">export SVG</button>
  <button type="button" id="export-png">export PNG</button>
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
  window.addEventListener("unhandledrejection", (event) => { errors.textContent += "error: " + event.reason + "\n"; });
  const data = JSON.parse(document.getElementById("data").textContent);
  const state = { item: Math.max(data.items.length - 1, 0), mode: data.view.mode,
                  layer: data.view.layer || 1, head: data.view.head || 1, units: data.view.units, expanded: {} };
  const $ = (id) => document.getElementById(id);
  const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  const SVG = "http://www.w3.org/2000/svg";
  const FONT = 'system-ui, "Noto Sans", "Noto Sans CJK SC", "WenQuanYi Micro Hei", sans-serif';
  const CELL = 22, BEST = "#d62728", FORCED = "#fff3cd", FINISHED = "#e3f1e3";

  function colour(w) {
    if (typeof w !== "number") return "#ccc";  // a weight that was not a number (a diverged model)
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

  // SVG elements carry their styles as attributes, so an exported file looks as the page does.
  function svg(tag, attributes, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attributes || {})) node.setAttribute(key, value);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function label(x, y, text, size, extra) {
    return svg("text", Object.assign({ x: x, y: y, "font-size": size, "font-family": FONT, fill: "#222" }, extra), text);
  }

  const measure = (() => {
    const context = document.createElement("canvas").getContext("2d");
    return (text, size) => { context.font = size + "px " + FONT; return context.measureText(text).width; };
  })();

  const number = (value, digits) => typeof value === "number" ? value.toFixed(digits) : "n/a";

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
      out.push(row.map((v) => Number.isFinite(v) ? v / chosen.length : null));
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

  // A heatmap: rows `tgt`, columns `src`, cells coloured by weight; hovering a row shows its weights per column.
  function heatmap(src, tgt, matrix, kind) {
    const left = Math.max(0, ...tgt.map((t) => measure(t, 13))) + 10;
    const top = Math.max(0, ...src.map((s) => measure(s, 13))) * 0.87 + 24;
    const width = left + src.length * CELL + 30, height = top + tgt.length * CELL + 4;
    const root = svg("svg", { width: width, height: height, "data-kind": kind, class: "map" });
    const heads = src.map((text, s) => {
      const x = left + s * CELL + CELL / 2;
      root.appendChild(label(x, top - 16, text, 13, { transform: "rotate(-60 " + x + " " + (top - 16) + ")" }));
      return root.appendChild(label(x, top - 3, "", 10, { fill: "#b00020", "text-anchor": "middle", class: "weight" }));
    });
    matrix.forEach((row, t) => {
      const g = root.appendChild(svg("g", { class: "row", "data-row": t }));
      const y = top + t * CELL;
      const name = g.appendChild(label(left - 6, y + 15, tgt[t], 13, { "text-anchor": "end" }));
      row.forEach((w, s) => {
        const cell = g.appendChild(svg("rect", { x: left + s * CELL, y: y, width: CELL - 1, height: CELL - 1,
          fill: colour(w), "data-w": typeof w === "number" ? w.toFixed(4) : "nan" }));
        cell.appendChild(svg("title", {}, tgt[t] + " → " + src[s] + ": " + number(w, 3)));
      });
      g.addEventListener("mouseenter", () => {
        name.setAttribute("fill", BEST);
        row.forEach((w, s) => { heads[s].textContent = typeof w === "number" && w >= 0.01 ? w.toFixed(2) : ""; });
      });
      g.addEventListener("mouseleave", () => {
        name.setAttribute("fill", "#222");
        heads.forEach((head) => { head.textContent = ""; });
      });
    });
    return root;
  }

  // ------------------------------------------------------------------ the search: next words, beam tree, what if

  function pathOf(search, id) {
    const path = [];
    for (let node = search.nodes[id]; node; node = node.parent === null ? null : search.nodes[node.parent]) path.unshift(node);
    return path;  // from the start (<s>) to node `id`
  }

  function tokensOf(path) { return path.slice(1).map((node) => node.token); }

  // One column per step of the chosen translation: the words the model proposed there, with their probabilities.
  function nextWords(modelIndex, model) {
    const search = model.search, path = search.best_path.map((id) => search.nodes[id]);
    const columns = path.slice(0, -1).map((node, t) => {
      const chosen = path[t + 1], words = node.next.slice();
      if (!words.some((w) => w.token === chosen.token)) words.push({ token: chosen.token, piece: chosen.piece, p: chosen.p });
      return { node: node, chosen: chosen, words: words, width: Math.max(60, ...words.map((w) => measure(w.piece, 12) + 44)) };
    });
    const rows = Math.max(0, ...columns.map((c) => c.words.length));
    const width = columns.reduce((sum, c) => sum + c.width + 4, 0) + 4, height = 18 + rows * 20;
    const root = svg("svg", { width: width, height: height, "data-kind": "next-words" });
    let x = 2;
    columns.forEach((column, t) => {
      root.appendChild(label(x + 2, 12, "step " + (t + 1), 10, { fill: "#666" }));
      column.words.forEach((word, k) => {
        const isChosen = word.token === column.chosen.token;
        const g = root.appendChild(svg("g", { class: "word" + (data.live ? " clickable" : ""), "data-step": t,
          "data-piece": word.piece, "data-p": number(word.p, 4), "data-chosen": isChosen ? "1" : "0" }));
        const y = 18 + k * 20;
        g.appendChild(svg("rect", { class: "box", x: x, y: y, width: column.width, height: 18, rx: 3,
          fill: isChosen && column.chosen.forced ? FORCED : "#f4f6fb", stroke: isChosen ? BEST : "#dde",
          "stroke-width": isChosen ? 2 : 1 }));
        g.appendChild(svg("rect", { x: x + 1, y: y + 14, width: Math.max(0, (column.width - 2) * (word.p || 0)),
          height: 3, fill: "#4c78a8" }));
        g.appendChild(label(x + 4, y + 12, word.piece, 12, { "font-weight": isChosen ? "bold" : "normal" }));
        g.appendChild(label(x + column.width - 4, y + 12, number(word.p, 2), 11, { "text-anchor": "end", fill: "#555" }));
        g.appendChild(svg("title", {}, "p(" + word.piece + " | " + tokensOf(pathOf(search, column.node.id)).length +
          " words before) = " + number(word.p, 4) + (data.live ? "; click: what if the translation went this way?" : "")));
        g.addEventListener("click", () => whatIf(modelIndex, [...tokensOf(pathOf(search, column.node.id)), word.token]));
      });
      x += column.width + 4;
    });
    return root;
  }

  // The beam tree: one column per step, every hypothesis the search kept open or finished, its score below.
  function beamTree(modelIndex, model) {
    const search = model.search, nodes = search.nodes, best = new Set(search.best_path);
    const byStep = new Map();
    for (const node of nodes) {
      if (!byStep.has(node.step)) byStep.set(node.step, []);
      byStep.get(node.step).push(node);
    }
    const rowOf = new Map([[0, 0]]);
    const steps = [...byStep.keys()].sort((a, b) => a - b);
    for (const step of steps) {  // children near their parent, the likelier first
      byStep.get(step).sort((a, b) => (rowOf.get(a.parent) ?? 0) - (rowOf.get(b.parent) ?? 0) || b.score - a.score)
        .forEach((node, row) => rowOf.set(node.id, row));
    }
    const COLUMN = 92, ROW = 38, BOX = 80;
    const rows = Math.max(1, ...steps.map((step) => byStep.get(step).length));
    const root = svg("svg", { width: steps.length * COLUMN + 8, height: rows * ROW + 8, "data-kind": "beam-tree" });
    const at = (node) => [4 + (node.step + 1) * COLUMN, 4 + rowOf.get(node.id) * ROW];
    for (const node of nodes) {
      if (node.parent === null) continue;
      const [x, y] = at(node), [px, py] = at(nodes[node.parent]);
      const onBest = best.has(node.id);
      root.appendChild(svg("path", { d: "M" + (px + BOX) + "," + (py + 15) + " C" + (px + BOX + 8) + "," + (py + 15) + " " +
        (x - 8) + "," + (y + 15) + " " + x + "," + (y + 15), fill: "none", stroke: onBest ? BEST : "#999",
        "stroke-width": onBest ? 2.5 : 1 }));
    }
    for (const node of nodes) {
      const [x, y] = at(node), onBest = best.has(node.id), finished = node.final !== null;
      const g = root.appendChild(svg("g", { class: "node clickable", "data-node": node.id, "data-piece": node.piece,
        "data-score": number(node.score, 4), "data-best": onBest ? "1" : "0", "data-finished": finished ? "1" : "0" }));
      g.appendChild(svg("rect", { class: "box", x: x, y: y, width: BOX, height: 30, rx: 4,
        fill: node.forced ? FORCED : finished ? FINISHED : "#fff", stroke: onBest ? BEST : "#888",
        "stroke-width": state.expanded[modelIndex] === node.id ? 3 : onBest ? 2 : 1,
        "stroke-dasharray": node.forced ? "4 2" : "none" }));
      const text = node.piece.length > 11 ? node.piece.slice(0, 10) + "…" : node.piece;
      g.appendChild(label(x + 4, y + 12, text, 12, { "font-weight": onBest ? "bold" : "normal" }));
      g.appendChild(label(x + 4, y + 26, node.parent === null ? "start" :
        (finished ? "final " + number(node.final, 2) : number(node.score, 2)), 10, { fill: "#555" }));
      g.appendChild(svg("title", {}, tokensOf(pathOf(search, node.id)).length + " words, score " + number(node.score, 3) +
        " (sum of log-probabilities; p of this word " + number(node.p, 3) + ")" +
        (finished ? ", finished: score / length penalty = " + number(node.final, 3) : "") + "; click for its attention"));
      g.addEventListener("click", () => {
        state.expanded[modelIndex] = state.expanded[modelIndex] === node.id ? undefined : node.id;
        draw();
      });
    }
    return root;
  }

  // The expanded node: its path, the attention of each of its steps, and its next words (what if from here).
  function nodeDetails(modelIndex, model, id) {
    const search = model.search, path = pathOf(search, id), box = element("div", { class: "node-details", "data-node": id });
    const words = path.slice(1).map((node) => node.piece);
    box.appendChild(element("p", { class: "hint" }, "hypothesis: " + (words.join(" ") || "(start)") + "  ·  score " +
      number(path[path.length - 1].score, 3) + (path[path.length - 1].final !== null ?
      "  ·  finished, normalised " + number(path[path.length - 1].final, 3) : "")));
    if (path.length > 1 && path[1].attention) {
      box.appendChild(element("p", { class: "hint" }, "attention while choosing each of its words (" +
        (model.family === "transformer" ? "last decoder layer, mean of its heads" : "the model's attention") + ")"));
      box.appendChild(heatmap(model.src_pieces, words, path.slice(1).map((node) => node.attention), "node-attention"));
    }
    const next = path[path.length - 1].next;
    if (next.length) {
      box.appendChild(element("p", { class: "hint" }, "next words" + (data.live ? " (click: what if it went on with this one?)" : "")));
      const list = box.appendChild(element("div", { class: "next" }));
      for (const word of next) {
        const button = list.appendChild(element("button", { type: "button", "data-piece": word.piece },
          word.piece + " " + number(word.p, 2)));
        button.disabled = !data.live;
        button.addEventListener("click", () => whatIf(modelIndex, [...tokensOf(path), word.token]));
      }
    }
    return box;
  }

  async function ask(query) {
    const status = $("status");
    document.body.dataset.pending = String(Number(document.body.dataset.pending) + 1);
    status.className = "";
    status.textContent = "translating…";
    try {
      const response = await fetch("api/inspect", { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify(query) });
      const answer = await response.json();
      if (!response.ok) throw new Error(answer.error || response.statusText);
      data.items.push(answer);
      state.item = data.items.length - 1;
      state.expanded = {};
      fillItems();
      draw();
      status.textContent = "";
    } catch (error) {
      status.className = "error";
      status.textContent = String(error.message || error);
    } finally {
      document.body.dataset.pending = String(Number(document.body.dataset.pending) - 1);
    }
  }

  function whatIf(modelIndex, tokens) {
    if (!data.live) return;
    ask({ sentence: data.items[state.item].sentence, prefix_ids: tokens, prefix_model: modelIndex });
  }

  function translationLine(model) {
    const line = element("p", { class: "translation" }, model.forced ? "reference (forced): " : "translation: ");
    const text = model.translation || "(empty)";
    if (model.prefix && text.startsWith(model.prefix)) {
      line.appendChild(element("span", { class: "prefix", title: "forced prefix" }, model.prefix));
      line.appendChild(document.createTextNode(text.slice(model.prefix.length)));
    } else {
      line.appendChild(document.createTextNode(text));
    }
    return line;
  }

  function panel(model, modelIndex) {
    const section = element("section", { class: "panel", "data-model": model.label });
    section.appendChild(element("h2", {}, model.label));
    section.appendChild(translationLine(model));
    const method = attributionOf();
    if (method !== null) {
      const side = model.attributions[method][state.units];
      section.appendChild(heatmap(side.src, side.tgt, side.map, "attribution"));
    } else if (!model.has_attention) {
      section.appendChild(element("div", { class: "note" }, model.note));
    } else {
      const side = model[state.units];
      section.appendChild(heatmap(side.src, side.tgt, viewMap(side.layers), "attention"));
    }
    const search = model.search;
    if (search) {
      if (search.note) section.appendChild(element("div", { class: "note search-note" }, search.note));
      if (search.best_path.length > 1) {
        section.appendChild(element("h3", {}, "next words at each step (probabilities)"));
        section.appendChild(nextWords(modelIndex, model));
      }
      section.appendChild(element("h3", {}, "beam search (beam " + search.beam_size + ")" +
        (search.prefix_length ? ", " + search.prefix_length + " forced piece(s) first" : "")));
      section.appendChild(element("p", { class: "hint" }, "score: sum of log-probabilities; red: the chosen " +
        "translation; green: finished; yellow, dashed: forced. Click a node to see its attention and next words."));
      section.appendChild(beamTree(modelIndex, model));
      const expanded = state.expanded[modelIndex];
      if (expanded !== undefined && search.nodes[expanded]) section.appendChild(nodeDetails(modelIndex, model, expanded));
    }
    return section;
  }

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
        ? [r.model, number(entropy, 2), number(r.uniform_entropy, 2), number(r.eos_share, 2), number(r.punctuation_share, 2),
           r.uncovered.join(" ") || "-", number(r.loss, 2)]
        : [r.model, "no attention", "", "", "", "", number(r.loss, 2)];
      for (const cell of cells) tr.appendChild(element("td", {}, cell));
    }
    for (const pair of item.agreement) {
      box.appendChild(element("p", { class: "agreement" }, pair.models[0] + " vs " + pair.models[1] + ": agreement " +
        number(pair.agreement, 2) + ", overlap " + number(pair.overlap, 2) + " over " + pair.compared_words + " words"));
    }
  }

  // Gradient attributions (inspect --explain) are maps of their own, chosen in the "map" list beside attention.
  const ATTRIBUTION = "attribution:";
  const attributionOf = () => state.mode.startsWith(ATTRIBUTION) ? state.mode.slice(ATTRIBUTION.length) : null;

  function fillMaps(item) {
    const select = $("mode");
    for (const option of [...select.options]) if (option.value.startsWith(ATTRIBUTION)) option.remove();
    const methods = [...new Set(item.models.flatMap((model) => Object.keys(model.attributions || {})))];
    for (const method of methods) select.appendChild(element("option", { value: ATTRIBUTION + method }, method + " (attribution)"));
    if (attributionOf() !== null && !methods.includes(attributionOf())) state.mode = "mean";
    select.value = state.mode;
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
    fillMaps(item);
    $("layer").disabled = state.mode === "mean" || attributionOf() !== null;
    $("head").disabled = state.mode !== "head";
    item.models.forEach((model, i) => panels.appendChild(panel(model, i)));
    diagnostics(item);
  }

  function itemName(item) {
    return item.sentence + (item.prefix ? "  →  " + item.prefix + "…" : "") + (item.reference ? "  |  " + item.reference : "");
  }

  function fillItems() {
    const select = $("item");
    select.textContent = "";
    data.items.forEach((item, i) => select.appendChild(element("option", { value: String(i) }, itemName(item))));
    select.value = String(state.item);
    $("item-label").style.display = data.items.length > 1 ? "" : "none";
  }

  // ------------------------------------------------------------------ export: the panels as one SVG, or a PNG of it

  function wrap(text, columns) {
    const lines = [];
    for (const word of text.split(/\s+/)) {
      if (lines.length && (lines[lines.length - 1] + " " + word).length <= columns) lines[lines.length - 1] += " " + word;
      else if (word) lines.push(word);
    }
    return lines;
  }

  function exportSVG() {
    const root = svg("svg", { xmlns: SVG, "font-family": FONT });
    root.appendChild(svg("rect", { width: "100%", height: "100%", fill: "#fff" }));
    const item = data.items[state.item];
    root.appendChild(label(16, 24, data.title + (item ? "  —  " + itemName(item) : ""), 15, { "font-weight": "bold" }));
    let x = 16, bottom = 40;
    for (const section of document.querySelectorAll("#panels .panel")) {
      let y = 56, width = 0;
      for (const part of section.querySelectorAll("h2, h3, p, .note, .next, svg[data-kind]")) {
        if (part.tagName.toLowerCase() === "svg") {
          const copy = part.cloneNode(true);
          copy.setAttribute("x", x);
          copy.setAttribute("y", y);
          root.appendChild(copy);
          width = Math.max(width, Number(part.getAttribute("width")));
          y += Number(part.getAttribute("height")) + 10;
          continue;
        }
        const size = /^h[23]$/i.test(part.tagName) ? 14 : 12;
        const text = part.classList.contains("next") ? [...part.children].map((b) => b.textContent).join("   ")
          : part.textContent.trim();
        for (const line of wrap(text, 80)) {
          root.appendChild(label(x, y + size, line, size, { "font-weight": size === 14 ? "bold" : "normal" }));
          width = Math.max(width, measure(line, size));
          y += size + 6;
        }
      }
      x += width + 32;
      bottom = Math.max(bottom, y);
    }
    root.setAttribute("width", Math.ceil(x));
    root.setAttribute("height", Math.ceil(bottom + 16));
    return new XMLSerializer().serializeToString(root);
  }

  function exportPNG() {
    const text = exportSVG();
    return new Promise((resolve, reject) => {
      const image = new Image();
      image.onload = () => {
        const canvas = document.createElement("canvas");
        canvas.width = image.width * 2;
        canvas.height = image.height * 2;
        const context = canvas.getContext("2d");
        context.scale(2, 2);
        context.drawImage(image, 0, 0);
        resolve(canvas.toDataURL("image/png"));
      };
      image.onerror = () => reject(new Error("the view could not be drawn as an image"));
      image.src = "data:image/svg+xml;charset=utf-8," + encodeURIComponent(text);
    });
  }

  function download(url, name) {
    const link = document.body.appendChild(element("a", { href: url, download: name }));
    link.click();
    link.remove();
  }

  $("export-svg").addEventListener("click", () => {
    const url = URL.createObjectURL(new Blob([exportSVG()], { type: "image/svg+xml" }));
    download(url, "attention.svg");
    setTimeout(() => URL.revokeObjectURL(url), 1000);
  });
  $("export-png").addEventListener("click", async () => download(await exportPNG(), "attention.png"));
  window.attentionPage = { exportSVG: exportSVG, exportPNG: exportPNG };  // for scripts and the browser test

  $("title").textContent = data.title;
  $("mode").value = state.mode;
  for (const radio of document.querySelectorAll("input[name=units]")) {
    radio.checked = radio.value === state.units;
    radio.addEventListener("change", () => { state.units = radio.value; draw(); });
  }
  $("mode").addEventListener("change", (e) => { state.mode = e.target.value; draw(); });
  $("layer").addEventListener("change", (e) => { state.layer = Number(e.target.value); draw(); });
  $("head").addEventListener("change", (e) => { state.head = Number(e.target.value); draw(); });
  $("item").addEventListener("change", (e) => { state.item = Number(e.target.value); state.expanded = {}; draw(); });

  if (data.live) {
    $("live").style.display = "flex";
    if (data.max_chars) for (const id of ["sentence", "prefix", "reference"]) $(id).maxLength = data.max_chars;
    $("live").addEventListener("submit", (event) => {
      event.preventDefault();
      ask({ sentence: $("sentence").value, prefix: $("prefix").value || null, reference: $("reference").value || null });
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
