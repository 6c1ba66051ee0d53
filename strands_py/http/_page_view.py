"""The chat page's view: its DOM, built from messages, tool calls, approvals and a turn's live events (no requests).

``VIEW`` is the first half of the page's script (see ``_page.py``); ``__BASE__`` and ``__CONVERSATIONS__`` are
replaced when the page is rendered.
"""

VIEW = r""""use strict";
// ---- the view: DOM only, no requests -----------------------------------------------------------------------------
const BASE = __BASE__;
const CONVERSATIONS = __CONVERSATIONS__;  // true or false when the server says, null: the page asks
const STORE = {conversation: "strands-py.conversation", turn: "strands-py.turn"};
const $ = (id) => document.getElementById(id);
const log = $("log");

// Keep the newest of the conversation in sight, unless the reader scrolled up to read something older.
let atEnd = true;
addEventListener("scroll", () => { atEnd = innerHeight + scrollY >= document.documentElement.scrollHeight - 80; });
new MutationObserver(() => { if (atEnd) scrollTo(0, document.documentElement.scrollHeight); })
  .observe(log, {childList: true, subtree: true, characterData: true});

function el(tag, className, text) {
  const element = document.createElement(tag);
  if (className) element.className = className;
  if (text !== undefined) element.textContent = text;
  return element;
}

function uuid() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40; b[8] = (b[8] & 0x3f) | 0x80;
  const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  return [h.slice(0, 8), h.slice(8, 12), h.slice(12, 16), h.slice(16, 20), h.slice(20)].join("-");
}

const BUSY = ["starting", "queued", "streaming", "reconnecting", "stopping"];

// One state for the page (body[data-state]) and its status line, always replaced as a whole: nothing stale stays.
function setState(state, text) {
  document.body.dataset.state = state;
  $("status").textContent = text || "";
  $("send").disabled = BUSY.includes(state);
  $("stop").hidden = !BUSY.includes(state) || state === "stopping";
}

function problemText(problem) {
  const head = problem.status ? problem.status + " " + problem.title : problem.title;
  return problem.detail ? head + ": " + problem.detail : head;
}

function showError(problem, retry) {
  $("error-text").textContent = problemText(problem);
  $("retry").hidden = !retry;
  $("error").hidden = false;
}

function clearError() { $("error").hidden = true; $("error-text").textContent = ""; }

function display(value) {
  if (typeof value === "string") return value;
  return value === undefined || value === null ? "" : JSON.stringify(value);
}

function contentText(content) {
  return (content || []).map((block) => (typeof block.text === "string" ? block.text : display(block.json)))
    .join(" ");
}

function toolOf(root, id) {
  for (const chip of [...root.querySelectorAll(".tool"), ...log.querySelectorAll(".tool")]) {
    if (chip.dataset.id === id) return chip;
  }
  return null;
}

// A tool call: its name and input when known, its outcome once its result arrives (a running call says so).
// A call without a result in the stored conversation waits (for an approval, say): it runs only while streamed.
function toolCall(parent, id, name, input, stored) {
  let chip = toolOf(parent, id);
  if (!chip) {
    chip = el("div", "tool");
    chip.dataset.id = id;
    chip.dataset.state = stored ? "waiting" : "running";
    const waiting = el("span", "tool-result", stored ? "waiting…" : "running…");
    chip.append(el("span", "tool-name", name || "tool"), el("code", "tool-input"), waiting);
    parent.append(chip);
  }
  if (input !== undefined) chip.querySelector(".tool-input").textContent = display(input);
  return chip;
}

function toolResult(parent, result) {
  const chip = toolOf(parent, result.toolUseId);
  if (!chip) return;
  chip.dataset.state = result.status === "error" ? "error" : "done";
  chip.querySelector(".tool-result").textContent = contentText(result.content);
}

function bubble(parent, role, text) {
  const element = el("div", "msg " + role, text);
  parent.append(element);
  return element;
}

// A stored message: text, tool calls and results (a result fills in its call, wherever it is), reasoning.
function renderMessage(parent, message) {
  for (const block of message.content || []) {
    if (typeof block.text === "string") bubble(parent, message.role === "user" ? "user" : "assistant", block.text);
    else if (block.toolUse) toolCall(parent, block.toolUse.toolUseId, block.toolUse.name, block.toolUse.input, true);
    else if (block.toolResult) toolResult(parent, block.toolResult);
    else if (block.reasoningContent && block.reasoningContent.reasoningText) {
      bubble(parent, "reasoning", block.reasoningContent.reasoningText.text || "");
    }
  }
}

function markAnswer(element) {
  const previous = $("answer");
  if (previous && previous !== element) previous.removeAttribute("id");
  if (element) element.id = "answer";
}

function reasonText(interrupt) {
  const reason = interrupt.reason;
  if (reason && typeof reason === "object" && typeof reason.message === "string") return reason.message;
  return display(reason) || interrupt.name;
}

// Approve / Deny for interrupts. Both buttons of a card are disabled by the first click, so a double click answers
// once; the answers of one result go together, in one request with a new key, once every card is decided.
function showApprovals(parent, interrupts, answer) {
  const fresh = interrupts.filter((it) => ![...log.querySelectorAll(".approval")].some((c) => c.dataset.id === it.id));
  if (!fresh.length) return;
  const decisions = new Map();
  for (const interrupt of fresh) {
    const card = el("div", "approval");
    card.dataset.id = interrupt.id;
    card.setAttribute("role", "group");
    card.setAttribute("aria-label", "The agent asks for approval: " + interrupt.name);
    const approve = el("button", "approve", "Approve");
    const deny = el("button", "deny", "Deny");
    approve.type = deny.type = "button";
    card.append(el("p", "reason", reasonText(interrupt)), approve, deny);
    if (!answer) {
      approve.disabled = deny.disabled = true;
      card.append(el("p", "hint", "Answering needs a conversation: AgentApp(session_manager=...)."));
    }
    const decide = (approved) => {
      if (card.dataset.decided) return;
      card.dataset.decided = approved ? "approved" : "denied";
      approve.disabled = deny.disabled = true;
      card.append(el("p", "decision", approved ? "Approved" : "Denied"));
      decisions.set(interrupt.id, approved);
      if (decisions.size < fresh.length) return;
      const responses = fresh.map((it) => ({interrupt_id: it.id, response: {approved: decisions.get(it.id)}}));
      answer({interrupt_responses: responses}, null);
    };
    approve.addEventListener("click", () => decide(true));
    deny.addEventListener("click", () => decide(false));
    parent.append(card);
  }
}

function lineageOf(id) {
  const tag = id.slice(0, id.lastIndexOf(":"));
  const dot = tag.indexOf(".");
  return dot < 0 ? tag : tag.slice(0, dot);
}

const positionOf = (id) => Number(id.slice(id.lastIndexOf(":") + 1));

// The live view of one turn: items tagged with the position of the event that brought them, so that a rewind can
// withdraw the later ones and the view be rebuilt from what still holds.
class TurnView {
  constructor(label) {
    this.box = el("div", "turn");
    this.live = el("div", "live");
    this.label = label;
    this.items = [];
    this.remark = null;  // the turn's note (stopped, resumed, ran again), kept across rebuilds
    this.rebuild();
    log.append(this.box);
  }

  rebuild() {
    this.text = null;
    this.live.replaceChildren();
    this.box.replaceChildren(this.live);
    if (this.remark) this.box.append(this.remark);
    if (this.label) bubble(this.live, "user", this.label);
    for (const item of this.items) this.apply(item);
  }

  add(item) { this.items.push(item); this.apply(item); }

  withdraw(position) { this.items = this.items.filter((item) => item.position <= position); this.rebuild(); }

  apply(item) {
    if (item.kind === "text") {
      if (!this.text) { this.text = bubble(this.live, "assistant", ""); markAnswer(this.text); }
      this.text.append(item.text);
      return;
    }
    this.text = null;
    if (item.kind === "reasoning") bubble(this.live, "reasoning", item.text);
    else if (item.kind === "tool") toolCall(this.live, item.id, item.name);
    else if (item.kind === "message") {
      for (const block of item.message.content || []) {
        if (block.toolUse) toolCall(this.live, block.toolUse.toolUseId, block.toolUse.name, block.toolUse.input);
        if (block.toolResult) toolResult(this.live, block.toolResult);
      }
    }
  }

  streamed() {
    return this.items.filter((item) => item.kind === "text").map((item) => item.text).join("");
  }

  // The result is authoritative: a text that differs from what streamed replaces it.
  settle(text) {
    if (text === this.streamed().replace(/\s+$/, "")) return;
    if (!this.text) { this.text = bubble(this.live, "assistant", ""); markAnswer(this.text); }
    this.text.textContent = text;
    document.body.dataset.corrected = "true";
  }

  note(text) {
    if (!this.remark) { this.remark = el("p", "note"); this.box.append(this.remark); }
    this.remark.textContent = text;
  }

  // The conversation as the server keeps it replaces the live view (what it shows of other clients' turns too).
  replace(messages) {
    this.live.replaceChildren();
    for (const message of messages) renderMessage(this.live, message);
    const answers = this.live.querySelectorAll(".msg.assistant");
    markAnswer(answers.length ? answers[answers.length - 1] : null);
  }
}
"""
