"""MkDocs hooks: the site is built offline and refers to nothing outside itself; the benchmark figure is included.

- ``on_files``: ``benchmarks/results/fanout.png`` (written by ``hatch run bench``) becomes ``assets/fanout.png``, so
  the benchmarks page shows the figure of the last run without a copy kept in docs/.
- ``on_post_page``: a page whose HTML loads a font, script, style sheet or image from another host fails the build
  (Material loads Google Fonts unless ``theme.font`` is false; a plugin or an extension could add others).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
FIGURES = {"assets/fanout.png": ROOT / "benchmarks" / "results" / "fanout.png"}
# What a browser fetches on its own: <script src>, <link href> (styles, fonts, icons), <img src>, CSS url(), @import.
_EXTERNAL = re.compile(
    r"""<(?:script|img|source|iframe)\b[^>]*\bsrc=["']?(?:https?:)?//"""
    r"""|<link\b[^>]*\bhref=["']?(?:https?:)?//"""
    r"""|url\(\s*["']?(?:https?:)?//"""
    r"""|@import\s+["'](?:https?:)?//""",
    re.IGNORECASE,
)


def on_files(files: Files, config: Any) -> Files:
    """Add the benchmark figure to the site."""
    for uri, source in FIGURES.items():
        if not source.is_file():
            raise PluginError(f"{source} is missing: run `hatch run bench` to draw it")
        files.append(File.generated(config, uri, abs_src_path=str(source)))
    return files


def on_post_page(output: str, page: Any, config: Any) -> str:
    """Fail on a page that would make the reader's browser fetch anything from another host."""
    match = _EXTERNAL.search(output)
    if match is not None:
        start = max(0, match.start() - 80)
        raise PluginError(f"{page.file.src_uri} refers to an external asset: {output[start : match.end() + 80]!r}")
    return output
