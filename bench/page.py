"""A script's block in a docs page: the text between its two marks is replaced, the rest of the page kept."""

from __future__ import annotations

from pathlib import Path


def put_block(doc: Path, start: str, end: str, body: str, heading: str) -> None:
    """Write `body` between the marks `start` and `end` in `doc`; the first time, append it under `heading`."""
    page = doc.read_text() if doc.exists() else ""
    block = f"{start}\n\n{body}\n\n{end}"
    if start in page and end in page:
        page = page[: page.index(start)] + block + page[page.index(end) + len(end):]
    else:
        page = page.rstrip() + f"\n\n## {heading}\n\n" + block + "\n"
    doc.write_text(page)
