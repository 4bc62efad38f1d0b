// Prism playground. Every call is the public HTTP API; user data is only ever set as text, never as HTML.
"use strict";

// The page may be served under a route prefix (e.g. /faults/): API paths hang off the page's folder.
const BASE = location.pathname.replace(/\/[^/]*$/, "");
const $ = (id) => document.getElementById(id);

// The API key, when the deployment takes keys: this tab's sessionStorage only (gone when the tab closes).
const KEY_SLOT = "prism-api-key";

function keyHeaders() {
  const key = sessionStorage.getItem(KEY_SLOT);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function askForKey(message) {
  const first = $("key-form").hidden || $("key-status").className !== "warn";
  $("key-form").hidden = false;
  $("key-status").textContent = message;
  $("key-status").className = "warn";
  if (first) $("api-key").focus();  // once: the stats refresh must not keep taking the focus
}

async function api(path, options = {}) {
  const init = { ...options, headers: { "Content-Type": "application/json", ...keyHeaders(), ...(options.headers || {}) } };
  const r = await fetch(BASE + path, init);
  const body = await r.json().catch(() => ({}));
  if (r.status === 401) askForKey((body.error || {}).message || "This deployment needs an API key.");
  if (!r.ok) {
    const err = body.error || {};
    throw new Error(`${r.status} ${err.code || ""}: ${err.message || r.statusText}` +
                    (err.request_id ? ` (request ${err.request_id})` : ""));
  }
  return body;
}

function el(tag, text, attrs = {}) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

function fact(dl, term, value) {
  dl.append(el("dt", term));
  const dd = el("dd");
  if (value instanceof Node) dd.append(value); else dd.textContent = value;
  dl.append(dd);
}

function bars(entries, unit) {
  // A small bar chart: one row per entry, widths relative to the largest value.
  const box = el("div");
  const max = Math.max(...entries.map(([, v]) => v), 1e-9);
  for (const [label, v] of entries) {
    const row = el("div", null, { class: "bar" });
    const fill = el("span", null, { class: "fill" });
    fill.style.width = `${Math.max(2, (160 * v) / max)}px`;
    row.append(el("span", label, { class: "label" }), fill, el("span", `${v.toFixed(unit === "ms" ? 1 : 2)}${unit}`));
    box.append(row);
  }
  return box;
}

function ticker(statusEl, what) {
  // An honest progress indicator: elapsed time, updated while the request runs.
  const t0 = performance.now();
  const tick = () => { statusEl.textContent = `${what}… ${((performance.now() - t0) / 1000).toFixed(1)} s`; };
  tick();
  const id = setInterval(tick, 100);
  return () => { clearInterval(id); return (performance.now() - t0) / 1000; };
}

function requestBody() {
  const body = { prompt: $("prompt").value.trim(), size: $("size").value, quality: $("quality").value,
                 user_tier: $("user_tier").value, response_format: "url", previews: true };
  if ($("text").value.trim()) body.text = $("text").value.trim();
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  return body;
}

function describe(dl, prism) {
  const intent = prism.intent;
  fact(dl, "Intent", `${intent.label ?? "none"} (${intent.source}, ${(intent.confidence * 100).toFixed(0)}%)`);
  const scores = Object.entries(intent.scores || {}).sort((a, b) => b[1] - a[1]).slice(0, 6);
  if (scores.length > 1) fact(dl, "Scores", bars(scores, ""));
  fact(dl, "Route", `${prism.route} (rule ${prism.rule})${prism.degraded ? ", degraded" : ""}${prism.canary ? ", canary" : ""}`);
  fact(dl, "Model", `${prism.model} · ${prism.model_version} · tier ${prism.tier}`);
  fact(dl, "User tier", `${prism.user_tier}${(prism.ignored_fields || []).includes("user_tier") ? " (from the key; the form's tier was ignored)" : ""}`);
  fact(dl, "Seed / steps / guidance", `${prism.seed} / ${prism.steps} / ${prism.guidance}`);
  const fb = prism.fallbacks || [];
  fact(dl, "Fallbacks", fb.length ? fb.map((f) => `${f.model}: ${f.reason}`).join("; ") : "none");
  if (prism.ocr) {
    const o = prism.ocr;
    fact(dl, "OCR", `${o.passed ? "passed" : "FAILED"}: read “${o.read}” for “${o.expected}” (CER ${o.cer.toFixed(2)}, ${o.backend})`);
  }
  const timings = Object.entries(prism.timings_ms || {}).filter(([k]) => k !== "total");
  fact(dl, "Timings", bars(timings, "ms"));
  fact(dl, "Total", `${(prism.timings_ms.total || 0).toFixed(0)} ms`);
  fact(dl, "Cost", `$${prism.cost_usd.toFixed(6)}`);
  if ((prism.notes || []).length) fact(dl, "Notes", prism.notes.join(" · "));
  fact(dl, "Record", el("a", prism.request_id, { href: `${BASE}/v1/renders/${encodeURIComponent(prism.request_id)}` }));
}

function imageSrc(datum) {
  return datum.url || `data:image/png;base64,${datum.b64_json}`;
}

async function streamJob(id, onProgress) {
  // The job's Server-Sent Events, read with fetch (EventSource cannot send the API key): progress events to
  // onProgress, then the final succeeded / failed / canceled event.
  const r = await fetch(`${BASE}/v1/jobs/${encodeURIComponent(id)}/events`, { headers: keyHeaders() });
  if (!r.ok) throw new Error(`${r.status}: the job's event stream`);
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const chunk = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let kind = "message", data = "";
      for (const line of chunk.split("\n")) {
        if (line.startsWith("event: ")) kind = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (!data) continue;
      const payload = JSON.parse(data);
      if (kind === "progress") onProgress(payload.progress || {});
      else return { kind, payload };
    }
  }
  throw new Error("the job's event stream ended before the job did");
}

function showProgress(status, bar, t0) {
  // Live progress from the job's events: the stage, and each denoising step of a self-hosted model.
  let events = 0;
  return (p) => {
    events += 1;
    bar.dataset.events = String(events);
    const secs = ((performance.now() - t0) / 1000).toFixed(1);
    if (p.preview) {  // the step's samples, 32x32, scaled up by the browser
      $("result-image").src = p.preview;
      $("result-caption").textContent = `preview at step ${p.step}`;
      $("result").hidden = false;
    }
    if (p.steps) {
      bar.max = p.steps;
      bar.value = p.step;
      status.textContent = `Generating: step ${p.step}/${p.steps} · ${secs} s`;
    } else if (p.stage) {
      status.textContent = `${p.stage[0].toUpperCase()}${p.stage.slice(1)}… ${secs} s`;
    }
  };
}

async function generate(event) {
  event.preventDefault();
  const status = $("status");
  const bar = $("gen-progress");
  status.className = "";
  bar.hidden = false;
  bar.value = 0;
  bar.dataset.events = "0";
  const t0 = performance.now();
  const stop = () => (performance.now() - t0) / 1000;
  $("generate").disabled = true;
  try {
    // An async job (Prefer: respond-async): the page follows its events instead of holding the request.
    const job = await api("/v1/images/generations", { method: "POST", headers: { Prefer: "respond-async" },
                                                      body: JSON.stringify(requestBody()) });
    status.textContent = "Queued…";
    const end = await streamJob(job.id, showProgress(status, bar, t0));
    if (end.kind !== "succeeded") {
      const err = end.payload.error || {};
      throw new Error(`${end.kind}: ${err.code || ""} ${err.message || ""}${err.request_id ? ` (request ${err.request_id})` : ""}`);
    }
    const r = end.payload.result;
    const secs = stop();
    status.textContent = `Done in ${secs.toFixed(1)} s`;
    const img = $("result-image");
    img.src = imageSrc(r.data[0]);
    img.alt = `generated image for: ${$("prompt").value.trim()}`;
    $("result-caption").textContent = `${r.data.length} image(s), ${$("size").value}`;
    const dl = $("result-facts");
    dl.replaceChildren();
    describe(dl, r.prism);
    $("result").hidden = false;
    $("compare-id").value = r.prism.request_id;
    loadHistory();
  } catch (e) {
    status.textContent = e.message;
    status.className = "warn";
  } finally {
    $("generate").disabled = false;
  }
}

async function routeOnly() {
  const status = $("status");
  status.className = "";
  try {
    const r = await api("/v1/route", { method: "POST", body: JSON.stringify(requestBody()) });
    const d = r.decision;
    const dl = $("result-facts");
    dl.replaceChildren();
    fact(dl, "Intent", `${r.intent.label ?? "none"} (${(r.intent.confidence * 100).toFixed(0)}%)`);
    fact(dl, "Route", `${d.route} (rule ${d.rule})`);
    fact(dl, "Model", `${r.model} · ${r.model_version} · tier ${d.tier}`);
    fact(dl, "Fallbacks", d.fallbacks.join(", ") || "none");
    fact(dl, "Why", d.reason);
    $("result-image").removeAttribute("src");
    $("result-caption").textContent = "route only: nothing rendered";
    $("result").hidden = false;
    status.textContent = `Route: ${d.route}`;
  } catch (e) {
    status.textContent = e.message;
    status.className = "warn";
  }
}

function card(title, src, prism, latencyMs) {
  const c = el("div", null, { class: "card", "data-testid": "compare-card" });
  c.append(el("strong", title));
  if (src) c.append(el("img", null, { src, alt: `render by ${title}` }));
  const dl = el("dl", null, { class: "facts" });
  fact(dl, "Model", prism.model || "?");
  fact(dl, "Total", `${(latencyMs || 0).toFixed(0)} ms`);
  fact(dl, "Cost", `$${(prism.cost_usd || 0).toFixed(6)}`);
  fact(dl, "OCR", prism.ocr ? `${prism.ocr.passed ? "passed" : "FAILED"} (“${prism.ocr.read}”)` : "n/a");
  c.append(dl);
  return c;
}

async function replay() {
  const id = $("compare-id").value.trim();
  const models = [...document.querySelectorAll("#compare-models input:checked")].map((i) => i.value);
  const status = $("compare-status");
  status.className = "";
  if (!id || !models.length) { status.textContent = "Pick a render id and at least one model."; return; }
  const grid = $("compare-grid");
  grid.replaceChildren();
  const stop = ticker(status, `Replaying on ${models.length} model(s)`);
  try {
    const rec = await api(`/v1/renders/${encodeURIComponent(id)}`);
    grid.append(card(`original: ${rec.model}`, rec.image_urls[0], rec, rec.latency_ms));
    const results = await Promise.allSettled(models.map((m) => api(`/v1/renders/${encodeURIComponent(id)}/replay`,
      { method: "POST", body: JSON.stringify({ model: m }) })));
    results.forEach((res, i) => {
      if (res.status === "fulfilled") {
        const p = res.value.prism;
        grid.append(card(`replay: ${models[i]}`, imageSrc(res.value.data[0]), p, p.timings_ms.total));
      } else {
        grid.append(el("div", `${models[i]}: ${res.reason.message}`, { class: "card warn" }));
      }
    });
    status.textContent = `Done in ${stop().toFixed(1)} s`;
    loadHistory();
  } catch (e) {
    stop();
    status.textContent = e.message;
    status.className = "warn";
  }
}

async function loadModels() {
  const tiers = await api("/v1/tiers").catch(() => ({}));
  const box = $("compare-models");
  for (const [tier, info] of Object.entries(tiers)) {
    const id = `m-${tier}`;
    const label = el("label", null, { for: id });
    const input = el("input", null, { type: "checkbox", id, value: tier });
    label.append(input, ` ${tier}${info && info.model ? ` (${info.model})` : ""}`);
    box.append(label);
  }
}

let historyCursor = null;

async function loadHistory(event, cursor = null) {
  if (event) event.preventDefault();
  const params = new URLSearchParams({ limit: "10" });
  for (const [key, id] of [["intent", "h-intent"], ["route", "h-route"], ["model", "h-model"], ["failed", "h-failed"]]) {
    if ($(id).value.trim()) params.set(key, $(id).value.trim());
  }
  if (cursor) params.set("cursor", cursor);
  try {
    const page = await api(`/v1/renders?${params}`);
    const body = $("history-table").tBodies[0];
    body.replaceChildren();
    for (const r of page.data) body.append(historyRow(r));
    historyCursor = page.next_cursor;
    $("history-next").disabled = !historyCursor;
  } catch (e) {
    $("history-table").tBodies[0].replaceChildren(el("tr", e.message));
  }
}

function historyRow(r) {
  const tr = el("tr", null, { "data-id": r.id });
  const thumb = el("td");
  if (!r.failed && (r.image_urls || []).length) {  // signed links: an <img> sends no key
    thumb.append(el("img", null, { src: r.image_urls[0], alt: "thumbnail", loading: "lazy" }));
  }
  const when = el("td");
  when.append(el("a", new Date(r.created * 1000).toLocaleTimeString(),
                 { href: `${BASE}/v1/renders/${encodeURIComponent(r.id)}`, title: r.id }));
  tr.append(thumb, when, el("td", r.prompt.length > 60 ? `${r.prompt.slice(0, 57)}…` : r.prompt),
            el("td", r.intent || ""), el("td", r.route || ""), el("td", r.model || ""),
            el("td", r.failed ? `${r.status} ${(r.error || {}).code || ""}` : (r.replay_of ? "replay" : "ok")),
            el("td", r.latency_ms ? r.latency_ms.toFixed(0) : ""));
  return tr;
}

async function loadStats() {
  try {
    const s = await api("/v1/stats?minutes=15");
    const body = $("stats-table").tBodies[0];
    body.replaceChildren();
    for (const row of s.by_route) {
      const tr = el("tr");
      tr.append(el("td", row.route || "(none)"), el("td", row.count), el("td", row.p95_ms == null ? "" : row.p95_ms.toFixed(0)),
                el("td", `${(row.failure_rate * 100).toFixed(1)}%`), el("td", `$${row.cost_usd.toFixed(6)}`));
      body.append(tr);
    }
  } catch (e) { /* records disabled: the section stays empty */ }
}

function loadAll() {
  $("compare-models").querySelectorAll("label").forEach((l) => l.remove());
  loadModels();
  loadHistory();
  loadStats();
}

function useKey(event) {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (key) sessionStorage.setItem(KEY_SLOT, key); else sessionStorage.removeItem(KEY_SLOT);
  $("api-key").value = "";
  $("key-status").className = "";
  $("key-status").textContent = key ? `Using key …${key.slice(-4)} in this tab` : "No key: anonymous";
  loadAll();
}

async function start() {
  const health = await fetch(`${BASE}/healthz`).then((r) => r.json()).catch(() => ({}));
  if (health.auth && health.auth !== "off") {
    $("key-form").hidden = false;
    const key = sessionStorage.getItem(KEY_SLOT);
    if (key) $("key-status").textContent = `Using key …${key.slice(-4)} in this tab`;
    else if (health.auth === "required") { askForKey("This deployment requires an API key."); return; }
    else $("key-status").textContent = "Optional: without a key you are an anonymous free caller.";
  }
  loadAll();
}

$("gen-form").addEventListener("submit", generate);
$("route-only").addEventListener("click", routeOnly);
$("replay").addEventListener("click", replay);
$("history-form").addEventListener("submit", loadHistory);
$("history-next").addEventListener("click", () => loadHistory(null, historyCursor));
$("key-form").addEventListener("submit", useKey);
start();
setInterval(loadStats, 10000);
