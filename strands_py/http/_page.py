"""The chat page at ``/`` (``AgentApp(page=True)``, ``python -m strands_py serve``): no build step, no external assets.

It starts an invocation with a POST carrying a key it generates (kept in ``sessionStorage``), then follows the
invocation with ``EventSource`` on ``GET /invocations/{key}/events``. A reload follows the same key again, so the
answer continues where it was and the agent does not run again; a dropped connection is resumed by
``EventSource`` itself with ``Last-Event-ID``. Problems (409, 422, 503, ...) are shown as their title and detail.
"""

from __future__ import annotations

import json

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>strands-py agent</title>
<style>
  :root { color-scheme: light dark; --accent: #0b7285; }
  body { font: 16px/1.5 system-ui, sans-serif; max-width: 46rem; margin: 2rem auto; padding: 0 1rem; }
  h1 { font-size: 1.3rem; margin: 0; }
  p.hint { color: GrayText; margin: .25rem 0 1rem; font-size: .9rem; }
  form { display: flex; gap: .5rem; }
  textarea { flex: 1; font: inherit; padding: .5rem; min-height: 3rem; resize: vertical; }
  button { font: inherit; padding: .5rem 1rem; background: var(--accent); color: white; border: 0; }
  button:disabled { opacity: .5; }
  #status { color: GrayText; margin: .75rem 0 .25rem; min-height: 1.5em; }
  #answer { white-space: pre-wrap; border-left: 3px solid var(--accent); padding: .25rem .75rem; min-height: 3em; }
  #error { background: #ffe3e3; color: #8a1c1c; border-radius: 4px; padding: .5rem .75rem; margin-top: .75rem; }
  #key { font: 12px ui-monospace, monospace; color: GrayText; margin-top: 1rem; }
</style>
</head>
<body data-state="idle">
<h1>strands-py agent</h1>
<p class="hint">Each question is one idempotent invocation: reload mid-answer and it picks up where it was.</p>
<form id="ask">
  <textarea id="prompt" placeholder="Ask the agent…" required></textarea>
  <button id="send" type="submit">Send</button>
</form>
<div id="status" role="status"></div>
<div id="answer" aria-live="polite"></div>
<div id="error" role="alert" hidden></div>
<div id="key"></div>
<script>
"use strict";
const BASE = __BASE__;
const STORE = "strands-py.invocation";
const $ = (id) => document.getElementById(id);
let source = null;  // the EventSource following the current invocation
let run = null;     // the lineage of the events shown: a new one means a new sequence (a replay, a re-run)
let lastId = "";    // the id of the last event shown: where a new EventSource goes on from
let chunks = [];    // [position, text] of the data events shown, so that a rewind can withdraw the later ones
let streamed = "";  // the text of the data events, exactly as streamed

// Event ids are "<run>:<position>"; a journaled run is "<lineage>.<server>": after a takeover another server goes
// on with the same lineage and positions, so only a new lineage starts the answer over.
function lineageOf(id) {
  const tag = id.slice(0, id.lastIndexOf(":"));
  const dot = tag.indexOf(".");
  return dot < 0 ? tag : tag.slice(0, dot);
}

function show() {
  streamed = chunks.map((chunk) => chunk[1]).join("");
  $("answer").textContent = streamed;
}

function uuid() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40; b[8] = (b[8] & 0x3f) | 0x80;
  const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  return [h.slice(0, 8), h.slice(8, 12), h.slice(12, 16), h.slice(16, 20), h.slice(20)].join("-");
}

function setState(state, text) {
  document.body.dataset.state = state;
  $("status").textContent = text;
  $("send").disabled = state === "starting" || state === "streaming" || state === "reconnecting";
}

function showProblem(problem) {
  const head = problem.status ? problem.status + " " + problem.title : problem.title;
  $("error").textContent = problem.detail ? head + ": " + problem.detail : head;
  $("error").hidden = false;
  setState("error", "Failed");
}

async function problemOf(response) {
  try {
    const problem = await response.json();
    if (problem && problem.title) return problem;
  } catch (e) { /* not problem details */ }
  return {status: response.status, title: response.statusText || "Error", detail: ""};
}

function reset(key) {
  if (source) source.close();
  source = null; run = null; lastId = ""; chunks = []; streamed = "";
  $("answer").textContent = ""; $("error").hidden = true;
  delete document.body.dataset.corrected;
  $("key").textContent = key ? "Idempotency-Key: " + key : "";
}

async function start(key, prompt) {
  reset(key);
  setState("starting", "Starting…");
  const abort = new AbortController();
  let response;
  try {
    response = await fetch(BASE + "/invocations", {
      method: "POST", signal: abort.signal,
      headers: {
        "Content-Type": "application/json", "Accept": "text/event-stream", "Idempotency-Key": JSON.stringify(key),
      },
      body: JSON.stringify({prompt: prompt}),
    });
  } catch (e) {
    showProblem({status: 0, title: "Network error", detail: "the invocation may have started; send again to retry"});
    return;
  }
  if (!response.ok) { showProblem(await problemOf(response)); return; }
  abort.abort();  // the invocation runs on the server now: follow it with EventSource, which survives reloads
  follow(key);
}

// The server following this invocation lost it (it stopped, or restarted): post the same request again with the
// same key. A durable store resumes it (the journaled steps are not paid again, and the text shown goes on where
// it was); the in-memory store of a restarted server runs it again (a new lineage: the answer starts over).
async function resume(key, prompt) {
  const from = {run: run, lastId: lastId, chunks: chunks};
  setState("reconnecting", "The server stopped; resuming…");
  let response;
  const abort = new AbortController();
  try {
    response = await fetch(BASE + "/invocations", {
      method: "POST", signal: abort.signal,
      headers: {
        "Content-Type": "application/json", "Accept": "text/event-stream", "Idempotency-Key": JSON.stringify(key),
      },
      body: JSON.stringify({prompt: prompt}),
    });
  } catch (e) {
    setTimeout(() => resume(key, prompt), 1000);
    return;
  }
  if (!response.ok) { showProblem(await problemOf(response)); return; }
  abort.abort();
  follow(key, from);
}

function follow(key, from) {
  reset(key);
  if (from) { run = from.run; lastId = from.lastId; chunks = from.chunks; show(); }
  setState("streaming", from ? "Resumed" : "Streaming…");
  let url = BASE + "/invocations/" + encodeURIComponent(key) + "/events";
  if (from && from.lastId) url += "?last_event_id=" + encodeURIComponent(from.lastId);
  const events = new EventSource(url);
  source = events;
  const on = (name, handle) => events.addEventListener(name, (event) => {
    const lineage = lineageOf(event.lastEventId);
    if (lineage !== run) {
      if (run !== null && from) $("status").textContent = "The server restarted and lost the answer: it ran again";
      run = lineage; chunks = []; show();
    }
    lastId = event.lastEventId;
    handle(JSON.parse(event.data), Number(event.lastEventId.slice(event.lastEventId.lastIndexOf(":") + 1)));
  });
  on("data", (data, position) => { chunks.push([position, data.text]); show(); });
  // A takeover: what the dead server streamed after "to" was never journaled, and the new one streams it anew.
  on("rewind", (data) => { chunks = chunks.filter((chunk) => chunk[0] <= data.to); show(); });
  on("tool_use", (data) => setState("streaming", "Calling " + data.name + "…"));
  on("result", (result) => {
    events.close();
    const text = result.text.replace(/\\s+$/, "");
    if (text !== streamed) { $("answer").textContent = text; document.body.dataset.corrected = "true"; }
    setState("done", "Done");
  });
  on("error", (problem) => { events.close(); showProblem(problem); });
  events.onerror = async () => {
    if (events.readyState !== EventSource.CLOSED) { setState("reconnecting", "Reconnecting…"); return; }
    if (source !== events) return;
    const probe = new AbortController();  // EventSource hides the status: ask once more to read the problem
    try {
      const response = await fetch(url, {signal: probe.signal});
      if (response.status === 204) { setState("done", "Done"); return; }
      if (response.ok) { probe.abort(); setTimeout(() => follow(key), 1000); return; }
      if (response.status === 404) {
        const saved = JSON.parse(sessionStorage.getItem(STORE) || "null");
        // Nobody runs it any more: its server stopped mid-answer (post it again to resume), or it expired.
        if (saved && saved.key === key && run !== null) {
          resume(key, saved.prompt); return;
        }
        sessionStorage.removeItem(STORE); reset(null); setState("idle", ""); return;
      }
      const problem = await problemOf(response);
      showProblem(problem);
      if (problem.retry_after) setTimeout(() => { if (source === events) follow(key); }, problem.retry_after * 1000);
    } catch (e) {
      setState("reconnecting", "Reconnecting…");
      setTimeout(() => { if (source === events) follow(key); }, 1000);
    }
  };
}

$("ask").addEventListener("submit", (event) => {
  event.preventDefault();
  const prompt = $("prompt").value.trim();
  if (!prompt) return;
  const key = uuid();
  sessionStorage.setItem(STORE, JSON.stringify({key: key, prompt: prompt}));
  start(key, prompt);
});

const saved = JSON.parse(sessionStorage.getItem(STORE) || "null");
if (saved) { $("prompt").value = saved.prompt; follow(saved.key); }
</script>
</body>
</html>
"""


def render_page(root_path: str) -> str:
    """The page, calling the API under ``root_path`` (where the app is mounted)."""
    # JSON inside <script>: escape "<" so that no root path can close the script element.
    return _PAGE.replace("__BASE__", json.dumps(root_path.rstrip("/")).replace("<", "\\u003c"))
