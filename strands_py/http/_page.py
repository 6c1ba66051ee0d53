"""The chat page served at ``/`` by ``python -m strands_py serve``."""

from __future__ import annotations

import html


def render_page(root_path: str) -> str:
    """The page, with its API under ``root_path``."""
    return f"<!doctype html><title>strands-py</title><p>{html.escape(root_path)}</p>"
