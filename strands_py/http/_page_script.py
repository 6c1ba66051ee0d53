"""The chat page's conversation: turns posted with their keys, followed with ``EventSource``, resumed, stopped.

``SCRIPT`` is the second half of the page's script, after ``_page_view.VIEW`` (see ``_page.py``).
"""

SCRIPT = r"""// ---- the conversation: requests, streams, turns -------------------------------------------------------
let conversation = null;  // this tab's conversation id; null: the server serves no conversations (one-off turns)
let known = 0;            // messages of the conversation the page knows of: where the next turn's messages start
let turn = null;          // the turn this tab follows

const enc = encodeURIComponent;
const statusUrl = (key) => BASE + "/invocations/" + enc(key);
const DONE_TYPES = {cancelled: "invocation-cancelled", stale: "interrupt-stale", pending: "interrupts-pending"};
const isType = (problem, name) => typeof problem.type === "string" && problem.type.endsWith("/" + DONE_TYPES[name]);

async function problemOf(response) {
  try {
    const problem = await response.json();
    if (problem && problem.title) return problem;
  } catch (e) { /* not problem details */ }
  return {status: response.status, title: response.statusText || "Error", detail: ""};
}

function saved() {
  try { return JSON.parse(sessionStorage.getItem(STORE.turn) || "null"); } catch (e) { return null; }
}

// The conversation's messages from `offset`, page after page; null when they cannot be read.
async function messagesFrom(offset) {
  const messages = [];
  let url = BASE + "/sessions/" + enc(conversation) + "/messages?limit=100&offset=" + offset;
  while (url) {
    let response;
    try { response = await fetch(url); } catch (e) { return null; }
    if (!response.ok) return null;
    const page = await response.json();
    for (const item of page.messages) messages.push(item.message);
    url = page.next;
  }
  return messages;
}

class Turn {
  constructor(request) {
    this.request = request;  // {key, body, base, label, conversation}: kept in sessionStorage until the turn ends
    this.key = request.key;
    this.view = new TurnView(request.label);
    this.lineage = null;     // the lineage of the events shown: a new one means a new sequence
    this.lastId = "";        // the id of the last event shown: where a new EventSource goes on from
    this.source = null;
    this.poller = null;
    this.resuming = false;
    this.over = false;
    $("key").textContent = this.key;
    delete document.body.dataset.corrected;
    delete document.body.dataset.notice;
  }

  postUrl() {
    return conversation === null ? BASE + "/invocations" : BASE + "/sessions/" + enc(conversation) + "/invocations";
  }

  async post() {
    clearError();
    this.over = false;
    setState("starting", this.resuming ? "The server restarted; resuming…" : "Sending…");
    const headers = {
      "Content-Type": "application/json", "Accept": "text/event-stream", "Idempotency-Key": JSON.stringify(this.key),
    };
    if (this.lastId) headers["Last-Event-ID"] = this.lastId;
    const abort = new AbortController();
    let response;
    try {
      response = await fetch(this.postUrl(), {
        method: "POST", headers: headers, body: JSON.stringify(this.request.body), signal: abort.signal,
      });
    } catch (e) {
      this.fail({status: 0, title: "Network error",
        detail: "the request may have reached the server: Retry sends it again with the same key, it runs once"});
      return;
    }
    if (response.status === 202) {  // the conversation is busy: this turn waits in its line
      const status = await response.json().catch(() => ({}));
      this.queued(status.position);
      this.follow();
      return;
    }
    if (!response.ok) { this.problem(await problemOf(response), false); return; }
    abort.abort();  // the turn runs on the server now: follow it with EventSource, which survives reloads
    this.follow();
  }

  queued(position) {
    if (this.lineage !== null || this.over) return;
    const ahead = position === 1 ? "1 turn" : (position || "other") + " turns";
    setState("queued", "Queued: " + ahead + " of this conversation ahead of yours");
    clearTimeout(this.poller);
    this.poller = setTimeout(async () => {
      try {
        const response = await fetch(statusUrl(this.key));
        const status = response.ok ? await response.json() : {};
        if (status.status === "queued") this.queued(status.position);
      } catch (e) { this.queued(position); }
    }, 1000);
  }

  follow() {
    if (this.source) this.source.close();
    let url = statusUrl(this.key) + "/events";
    if (this.lastId) url += "?last_event_id=" + enc(this.lastId);
    const events = new EventSource(url);
    this.source = events;
    if (document.body.dataset.state !== "queued") setState("streaming", "Thinking…");
    const on = (name, handle) => events.addEventListener(name, (event) => {
      if (this.source !== events || typeof event.data !== "string") return;  // a connection error: onerror's
      const id = event.lastEventId;
      if (lineageOf(id) !== this.lineage) {
        if (this.lineage !== null) {
          this.view.items = []; this.view.rebuild();
          if (this.resuming) this.notice("rerun", "The server restarted: this answer ran again from the start.");
        }
        this.lineage = lineageOf(id);
      } else if (this.resuming) {
        this.notice("resumed", "The server restarted: the answer was resumed where it was; nothing ran twice.");
      }
      this.resuming = false;
      this.lastId = id;
      clearTimeout(this.poller);
      handle(JSON.parse(event.data), positionOf(id));
    });
    on("data", (data, position) => {
      this.view.add({kind: "text", position: position, text: data.text});
      setState("streaming", "Answering…");
    });
    on("reasoning", (data, position) => this.view.add({kind: "reasoning", position: position, text: data.text}));
    on("tool_use", (data, position) => {
      this.view.add({kind: "tool", position: position, id: data.tool_use_id, name: data.name});
      setState("streaming", "Calling " + data.name + "…");
    });
    on("message", (data, position) => {
      this.view.add({kind: "message", position: position, message: data.message});
      const blocks = data.message.content || [];
      const calls = blocks.filter((block) => block.toolUse).map((block) => block.toolUse.name);
      if (blocks.some((block) => block.toolResult)) setState("streaming", "Thinking…");
      else if (calls.length) setState("streaming", "Running " + calls.join(", ") + "…");
    });
    // A takeover: what the dead server streamed after "to" was never journaled, and the new one streams it anew.
    on("rewind", (data) => this.view.withdraw(data.to));
    on("result", (result) => this.finish(result));
    on("error", (problem) => this.problem(problem, true));
    events.onerror = () => {
      if (this.source !== events) return;
      if (events.readyState !== EventSource.CLOSED) { setState("reconnecting", "Reconnecting…"); return; }
      this.source = null;
      this.probe(url);
    };
  }

  async reattach() {
    this.follow();
    try {
      const response = await fetch(statusUrl(this.key));
      const status = response.ok ? await response.json() : {};
      if (status.status === "queued") this.queued(status.position);
    } catch (e) { /* the stream says what happens */ }
  }

  close() {
    if (this.source) this.source.close();
    this.source = null;
    clearTimeout(this.poller);
  }

  notice(name, text) { document.body.dataset.notice = name; this.view.note(text); }

  // EventSource hides why it stopped: ask once more, then the status of the key.
  async probe(url) {
    let response;
    const abort = new AbortController();
    try {
      response = await fetch(url, {signal: abort.signal});
    } catch (e) {
      setState("reconnecting", "Reconnecting…");
      setTimeout(() => { if (turn === this && !this.over) this.follow(); }, 1000);
      return;
    }
    if (response.ok && response.status !== 204) { abort.abort(); this.follow(); return; }
    if (response.status !== 204 && response.status !== 404) { this.problem(await problemOf(response), true); return; }
    let status;
    try {
      const answer = await fetch(statusUrl(this.key));
      status = answer.status === 404 ? null : await answer.json();
    } catch (e) {
      setTimeout(() => this.probe(url), 1000);
      return;
    }
    if (status === null) { this.lost(); return; }
    if (status.status === "completed" && status.result) { this.finish(status.result); return; }
    if (status.status === "cancelled") { this.stopped(); return; }
    // Nobody runs it any more (its server stopped mid-answer) or another server does: post it again, same key. A
    // durable store resumes it from its journal: the answer goes on where it was.
    this.resuming = true;
    this.post();
  }

  async finish(result) {
    this.close();
    if (this.over) return;
    this.over = true;
    sessionStorage.removeItem(STORE.turn);
    const interrupts = result.interrupts || [];
    if (result.stop_reason !== "interrupt") this.view.settle((result.text || "").replace(/\s+$/, ""));
    await this.refresh(true);
    if (interrupts.length) {
      showApprovals(this.view.box, interrupts, conversation === null ? null : send);
      setState("approval", "The agent waits for your approval");
    } else {
      setState("done", "");
    }
  }

  // The turn's messages as the server keeps them (with whatever other clients added meanwhile): shown instead of
  // the live view (with `show`), and counted, so that the next turn knows where its own messages start.
  async refresh(show) {
    if (conversation === null) return;
    const messages = await messagesFrom(this.request.base);
    if (messages === null) return;
    known = this.request.base + messages.length;
    if (show && messages.length) this.view.replace(messages);
  }

  problem(problem, following) {
    if (isType(problem, "cancelled")) { this.stopped(); return; }
    if (following && problem.status === 503 && !this.over) {
      // The server is stopping (or overloaded): follow again when it says, from the last event shown.
      this.close();
      setState("reconnecting", "The server is unavailable; reconnecting…");
      setTimeout(() => { if (turn === this && !this.over) this.follow(); }, (problem.retry_after || 1) * 1000);
      return;
    }
    if (isType(problem, "stale") || isType(problem, "pending")) {
      this.close();
      this.over = true;
      sessionStorage.removeItem(STORE.turn);
      showError(problem, false);
      showApprovals(this.view.box, problem.pending || [], send);
      setState("error", "Failed");
      return;
    }
    const retry = problem.status === 0 || problem.status === 409 || problem.status === 429 || problem.status >= 500;
    this.fail(problem, retry);
  }

  fail(problem, retry) {
    this.close();
    this.over = true;
    showError(problem, retry !== false);
    setState("error", "Failed");
  }

  // The same request with the same key: a run that failed runs again, one that succeeded meanwhile is replayed.
  retry() {
    this.close();
    this.lineage = null; this.lastId = "";
    this.view.items = []; this.view.rebuild();
    this.post();
  }

  lost() {
    this.close();
    this.over = true;
    document.body.dataset.notice = "lost";
    showError({title: "Answer lost", detail: "the server restarted and its store kept nothing of this request " +
      "(an in-memory store). Retry sends it again with the same key: it runs anew."}, true);
    setState("lost", "The server restarted and lost the answer");
  }

  stopped() {
    this.close();
    if (this.over && document.body.dataset.state === "stopped") return;
    this.over = true;
    sessionStorage.removeItem(STORE.turn);
    this.view.note("Stopped: this turn was cancelled and is not part of the conversation.");
    setState("stopped", "Stopped");
    this.refresh(false);
  }

  async stop() {
    setState("stopping", "Stopping…");
    let response;
    try {
      response = await fetch(statusUrl(this.key), {method: "DELETE"});
    } catch (e) {
      setState("streaming", "Could not reach the server to stop the answer");
      return;
    }
    const body = response.ok ? await response.json() : await problemOf(response);
    if (!response.ok) { showError(body, false); setState("streaming", "Not stopped"); return; }
    if (body.status === "cancelled") this.stopped();
    // cancelling: the stream ends with the cancel; completed: the result arrives
  }
}

function send(body, label, key) {
  if (turn && !turn.over) turn.close();
  clearError();
  const request = {key: key || uuid(), body: body, base: known, label: label, conversation: conversation};
  sessionStorage.setItem(STORE.turn, JSON.stringify(request));
  turn = new Turn(request);
  turn.post();
  return turn;
}

// Another conversation in this tab ("New conversation", or another #conversation= in the address).
function switchTo(id) {
  if (turn) turn.close();
  turn = null;
  sessionStorage.removeItem(STORE.turn);
  $("key").textContent = "";
  ready = start(id);
}

async function start(id) {
  delete document.body.dataset.ready;
  log.replaceChildren();
  clearError();
  known = 0;
  sessionStorage.setItem(STORE.conversation, id);
  history.replaceState(null, "", "#conversation=" + enc(id));
  let state = null;
  let served = CONVERSATIONS;
  try {
    const response = await fetch(BASE + "/sessions/" + enc(id));
    if (served === null) served = response.status !== 404;
    if (response.ok) state = await response.json();
  } catch (e) { served = served === true; }
  conversation = served ? id : null;
  document.body.dataset.mode = served ? "conversation" : "single";
  $("new").hidden = !served;
  $("conversation").textContent = served ? id : "none (one-off questions)";
  const pending = saved();
  const ours = pending && pending.conversation === conversation;
  if (served) {
    const messages = await messagesFrom(0);
    if (messages === null) {
      $("conversation").textContent = id + " (its messages cannot be read)";
    } else {
      known = messages.length;
      const shown = ours ? messages.slice(0, pending.base) : messages;
      for (const message of shown) renderMessage(log, message);
    }
  }
  if (ours) {  // a reload mid-turn: follow the same key again; the agent does not run again
    turn = new Turn(pending);
    turn.reattach();
  } else {
    if (pending) sessionStorage.removeItem(STORE.turn);
    setState("idle", "");
    if (state && state.pending_interrupts && state.pending_interrupts.length) {
      showApprovals(log, state.pending_interrupts, send);
      setState("approval", "The agent waits for your approval");
    }
  }
  document.body.dataset.ready = "true";
}

$("ask").addEventListener("submit", (event) => {
  event.preventDefault();
  const prompt = $("prompt").value.trim();
  if (!prompt || $("send").disabled) return;
  $("prompt").value = "";
  ready.then(() => send({prompt: prompt}, prompt));  // sent once the page knows its conversation
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("ask").requestSubmit();
  }
});
$("stop").addEventListener("click", () => { if (turn && !turn.over) turn.stop(); });
$("retry").addEventListener("click", () => { if (turn) turn.retry(); });
$("new").addEventListener("click", () => switchTo(uuid()));

function named() {
  const match = /^#conversation=(.+)$/.exec(location.hash);
  return match ? decodeURIComponent(match[1]) : null;
}
addEventListener("hashchange", () => {
  const id = named();
  if (id && id !== sessionStorage.getItem(STORE.conversation)) switchTo(id);
});

window.chat = {send: send, get turn() { return turn; }};
let ready = start(named() || sessionStorage.getItem(STORE.conversation) || uuid());
"""
