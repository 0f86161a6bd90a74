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


def plain(name: str) -> bool:
    """Whether `name` names an entry *in* a folder: not empty, not . or .., no path separator. Names read from a file
    (a record, a manifest's ledger) are used only if plain, so a crafted file cannot point outside its folder."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")


def has_record(folder: Path) -> bool:
    return (folder / RECORD).is_file()


def owned(folder: Path) -> set[str]:
    """The names qprompt has claimed in `folder` (empty when it holds no record)."""
    path = folder / RECORD
    if not path.is_file():
        return set()
    return {line for line in path.read_text().splitlines() if plain(line)}


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


def refuse_links(folder: Path, names: set[str]) -> None:
    """Stop before qprompt would write through a symbolic link at one of its names in `folder`: writing there would
    change whatever the link points to, possibly outside the folder."""
    links = sorted(n for n in names if (folder / n).is_symlink())
    if links:
        raise QPromptError(f"{folder / links[0]} is a symbolic link; qprompt writes only plain files and folders "
                           "there and will not write through it: remove the link (its target stays) and run again")
