"""The chat page's style sheet: light and dark (``prefers-color-scheme``), no external assets."""

STYLE = r""":root {
  color-scheme: light dark;
  --bg: #ffffff; --fg: #1d2125; --muted: #5f6b76; --line: #d8dee4; --panel: #f4f6f8;
  --accent: #0b7285; --accent-fg: #ffffff; --user: #e3f4f7; --tool: #f8f3e6; --tool-line: #e2cf9c;
  --ok: #2b7a3d; --bad: #a4262c; --error-bg: #fde7e9; --error-fg: #8a1c1c; --focus: #1c7ed6;
}
@media (prefers-color-scheme: dark) {
  :root {
    --bg: #15191d; --fg: #e6e9ec; --muted: #9aa5b1; --line: #2f363d; --panel: #1e2429;
    --accent: #3bc9db; --accent-fg: #0b1418; --user: #163a42; --tool: #2b2618; --tool-line: #6b5a2a;
    --ok: #69db7c; --bad: #ff8787; --error-bg: #3d1d20; --error-fg: #ffc9c9; --focus: #74c0fc;
  }
}
* { box-sizing: border-box; }
body { font: 16px/1.5 system-ui, sans-serif; background: var(--bg); color: var(--fg); margin: 0;
  display: flex; flex-direction: column; min-height: 100vh; max-width: 48rem; margin-inline: auto; padding: 0 1rem; }
header { display: flex; align-items: center; gap: 1rem; padding: 1rem 0 .25rem; }
h1 { font-size: 1.25rem; margin: 0; flex: 1; }
p.hint { color: var(--muted); margin: 0 0 .75rem; font-size: .9rem; }
#log { flex: 1; display: flex; flex-direction: column; gap: .5rem; padding-bottom: 1rem; }
.turn, .live { display: flex; flex-direction: column; gap: .5rem; }
.msg { white-space: pre-wrap; padding: .5rem .75rem; border-radius: .75rem; max-width: 85%; overflow-wrap: anywhere; }
.msg.user { align-self: flex-end; background: var(--user); border-bottom-right-radius: .2rem; }
.msg.assistant { align-self: flex-start; background: var(--panel); border-bottom-left-radius: .2rem; }
.msg.reasoning { align-self: flex-start; color: var(--muted); font-style: italic; font-size: .9rem; }
.tool { align-self: flex-start; display: flex; flex-wrap: wrap; gap: .4rem; align-items: baseline; font-size: .85rem;
  background: var(--tool); border: 1px solid var(--tool-line); border-radius: .5rem; padding: .3rem .6rem;
  max-width: 85%; }
.tool::before { content: "⚙"; }
.tool[data-state="done"]::before { content: "✓"; color: var(--ok); }
.tool[data-state="error"]::before { content: "✗"; color: var(--bad); }
.tool-name { font-weight: 600; }
.tool-input { font: .8rem ui-monospace, monospace; color: var(--muted); }
.tool-result { color: var(--muted); }
.tool-result::before { content: "→ "; }
.approval { align-self: flex-start; border: 1px solid var(--accent); border-radius: .5rem; padding: .5rem .75rem;
  display: flex; flex-wrap: wrap; gap: .5rem; align-items: center; max-width: 85%; }
.approval p { margin: 0; flex-basis: 100%; }
.approval .decision { font-weight: 600; }
.note { color: var(--muted); font-size: .9rem; margin: 0; }
#status { color: var(--muted); min-height: 1.5em; font-size: .9rem; }
#error { background: var(--error-bg); color: var(--error-fg); border-radius: .5rem; padding: .5rem .75rem;
  display: flex; gap: .75rem; align-items: center; margin-bottom: .5rem; }
#error[hidden] { display: none; }
#error-text { flex: 1; }
#dock { position: sticky; bottom: 0; background: var(--bg); padding-top: .25rem; }
form { display: flex; gap: .5rem; padding: .25rem 0 .5rem; }
textarea { flex: 1; font: inherit; color: inherit; background: var(--panel); border: 1px solid var(--line);
  border-radius: .5rem; padding: .5rem; min-height: 2.75rem; resize: vertical; }
button { font: inherit; padding: .45rem 1rem; border-radius: .5rem; border: 1px solid var(--accent); cursor: pointer;
  background: var(--accent); color: var(--accent-fg); }
button.deny, button#new, button#stop, #error button { background: transparent; color: var(--fg); }
button:disabled { opacity: .5; cursor: default; }
button:focus-visible, textarea:focus-visible { outline: 2px solid var(--focus); outline-offset: 2px; }
footer { color: var(--muted); font-size: .75rem; padding: .25rem 0 1rem; overflow-wrap: anywhere; }
footer code { font: .75rem ui-monospace, monospace; }
.visually-hidden { position: absolute; width: 1px; height: 1px; overflow: hidden; clip: rect(0 0 0 0);
  white-space: nowrap; }
"""
