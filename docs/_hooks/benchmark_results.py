"""mkdocs hook: the Benchmarks page shows ``benchmarks/RESULTS.md``, the record every benchmark script writes.

The page holds the marker ``<!-- RESULTS.md -->``; at build time it is replaced by the file's sections (its
title dropped, headings one level down, links into the docs rewritten from ``../docs/X`` to ``X``), so the
docs always show the numbers committed with the code.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

MARKER = "<!-- RESULTS.md -->"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if MARKER not in markdown:
        return markdown
    results = Path(config["config_file_path"]).parent / "benchmarks" / "RESULTS.md"
    text = results.read_text(encoding="utf-8")
    text = re.sub(r"\A# [^\n]*\n", "", text)
    text = text.replace("](../docs/", "](")
    text = re.sub(r"^(#{2,5}) ", r"#\1 ", text, flags=re.M)
    return markdown.replace(MARKER, text)
