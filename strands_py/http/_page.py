"""The chat page at ``/`` (``AgentApp(page=True)``, ``python -m strands_py serve``): no build step, no external assets.

One conversation per browser tab: its id is kept in ``sessionStorage`` (and in the address, ``#conversation=<id>``,
so that another tab can open the same one); "New conversation" starts another. Its history is read from
``GET /sessions/{id}/messages`` (page after page). Each message the user sends is one turn with a key the page
generates: ``POST /sessions/{id}/invocations``, then ``EventSource`` on ``GET /invocations/{key}/events``, which
resumes a dropped connection with ``Last-Event-ID`` and applies ``rewind``. The turn's key is kept in
``sessionStorage`` until it ends, so a reload follows the same key again and the agent does not run again; once it
ends, the turn is shown as the server keeps it.

Tool calls are shown as they happen (``tool_use``), then with their input and result. Stop cancels the turn
(``DELETE /invocations/{key}``). A result with ``interrupts`` shows Approve and Deny, which answer
``{"interrupt_responses": [{"interrupt_id", "response": {"approved": bool}}]}`` with a new key (the buttons are
disabled by the first click). A failure shows a Retry button that sends the same request with the same key. A busy
conversation queues the turn (202): the page shows its position until it runs. When the server that ran a turn
restarted, the page asks for the key's status: unknown (an in-memory store) says the answer was lost; known (a
durable store) posts the request again, which resumes it from its journal.

Without conversations (an app without ``session_manager=``), each question is a one-off ``POST /invocations``.
"""

from __future__ import annotations

import json

from ._page_script import SCRIPT
from ._page_style import STYLE
from ._page_view import VIEW

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<title>strands-py agent</title>
<style>
__STYLE__</style>
</head>
<body data-state="idle">
<header>
  <h1>strands-py agent</h1>
  <button id="new" type="button" hidden>New conversation</button>
</header>
<p class="hint">Every message is one idempotent invocation with its own key: reload mid-answer and it picks up where
it was, without running the agent again.</p>
<main id="log" role="log" aria-live="polite" aria-label="Conversation"></main>
<div id="dock">
<div id="status" role="status"></div>
<div id="error" role="alert" hidden><span id="error-text"></span><button id="retry" type="button">Retry</button></div>
<form id="ask">
  <label for="prompt" class="visually-hidden">Your message (Enter sends, Shift+Enter starts a new line)</label>
  <textarea id="prompt" rows="2" placeholder="Ask the agent… (Enter sends, Shift+Enter for a new line)"></textarea>
  <button id="send" type="submit">Send</button>
  <button id="stop" type="button" hidden>Stop</button>
</form>
</div>
<footer>Conversation <code id="conversation"></code> · Idempotency-Key <code id="key"></code></footer>
<script>
__SCRIPT__</script>
</body>
</html>
"""


def _json_in_script(value: object) -> str:
    # JSON inside <script>: escape "<" so that no value can close the script element.
    return json.dumps(value).replace("<", "\\u003c")


def render_page(root_path: str, *, conversations: bool | None = None) -> str:
    """The page, calling the API under ``root_path`` (where the app is mounted).

    ``conversations``: whether the app serves ``/sessions/{id}`` (None: the page asks the server once it loads).
    """
    # The root path last: whatever it holds is never taken for a placeholder.
    script = VIEW.replace("__CONVERSATIONS__", _json_in_script(conversations), 1)
    script = script.replace("__BASE__", _json_in_script(root_path.rstrip("/")), 1)
    return _PAGE.replace("__STYLE__", STYLE, 1).replace("__SCRIPT__", script + SCRIPT, 1)
