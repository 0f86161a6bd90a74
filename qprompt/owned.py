"""Which names in an output folder qprompt wrote, so `--overwrite` never removes anything else.

A name is claimed (appended to the folder's `.qprompt-files`) *before* the file or folder of that
name is created, so even a run killed mid-write leaves a record that covers everything it made.
The record is rewritten atomically; a name claimed but never written costs nothing.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import QPromptError

RECORD = ".qprompt-files"


def has_record(folder: Path) -> bool:
    return (folder / RECORD).is_file()


def owned(folder: Path) -> set[str]:
    """The names qprompt has claimed in `folder` (empty when it holds no record)."""
    path = folder / RECORD
    if not path.is_file():
        return set()
    return {line for line in path.read_text().splitlines() if line and "/" not in line and line not in (".", "..")}


def _write(folder: Path, names: set[str]) -> None:
    tmp = folder / (RECORD + ".partial")
    tmp.write_text("".join(f"{n}\n" for n in sorted(names)))
    os.replace(tmp, folder / RECORD)


def claim(folder: Path, *names: str) -> None:
    """Record `names` as qprompt's; call this before creating them."""
    current = owned(folder)
    if not set(names) <= current:
        _write(folder, current | set(names))


def remove(folder: Path, names: set[str]) -> None:
    """Delete the given claimed names (files or folders), then drop them from the record."""
    for name in sorted(names):
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    if has_record(folder):
        _write(folder, owned(folder) - names)


def refuse_foreign(folder: Path, names: set[str], mine: set[str], fix: str) -> None:
    """Stop before qprompt would write over an existing name it did not write."""
    foreign = sorted(n for n in names if n not in mine and (folder / n).exists())
    if foreign:
        listed = ", ".join(foreign[:3]) + (" ..." if len(foreign) > 3 else "")
        raise QPromptError(f"{folder} holds {listed}, which qprompt did not write and will not replace; {fix}")
