"""The export folder: where it may go, and how a finished export is put in place without losing anything.

An export is built in a fresh folder beside --output and moved in only once it passed its checks; an
earlier export there is replaced name by name, and only the names that export wrote (its record, see
qprompt/owned.py): files the user added stay.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from .. import owned
from ..deploy.genai import GENAI_CONFIG
from ..deploy.manifest import EXPORT_MANIFEST
from ..errors import QPromptError


def check_export_output(output: Path, artifact: str | Path | None, overwrite: bool) -> None:
    """Refuse an --output that holds more than an export (cwd, the artifact, a folder above either), or an
    earlier export without --overwrite; checked before any work is done."""
    out, cwd = output.resolve(), Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise QPromptError(f"--output {output} is the current folder or one above it; export into a folder of its "
                           "own, e.g. --output export")
    if artifact is not None:
        art = Path(artifact).resolve()
        if out == art or out in art.parents:
            raise QPromptError(f"--output {output} is the artifact folder or one above it; export into a folder "
                               f"of its own, e.g. --output {art.name}-export")
    if output.is_symlink():
        raise QPromptError(f"--output {output} is a symbolic link; export into a plain folder")
    if output.is_dir():
        owned.refuse_links(output, {owned.RECORD, owned.RECORD + ".partial"})
    holds = folder_kind(output)
    if holds not in (None, "export"):
        raise QPromptError(f"{output} holds {holds}, not an export; export into a folder of its own, e.g. --output "
                           f"{output.name}-export (qprompt never removes another kind's files)")
    is_export = holds == "export"
    if is_export and not overwrite:
        raise QPromptError(f"{output} already holds an export; pass --overwrite or choose another --output")
    if output.exists() and any(output.iterdir()) and not is_export:
        raise QPromptError(f"{output} exists and is not an export folder; choose an empty or new --output")


def folder_kind(folder: Path) -> str | None:
    """What a folder holds, by the files qprompt's commands write: "export", "a training run (...)", or None."""
    from ..artifact import ADAPTER_WEIGHTS, MANIFEST

    if (folder / EXPORT_MANIFEST).exists():
        return "export"
    run = [n for n in (MANIFEST, ADAPTER_WEIGHTS, "checkpoint") if (folder / n).exists()]
    if run:
        return f"a training run ({run[0]})"
    return "export" if owned.has_record(folder) else None


def portable_base(base: dict) -> dict:
    """The base model's identity without where it lay on this machine: a local folder is named, not located."""
    kept = {k: v for k, v in base.items() if k != "path"}
    name = str(kept.get("name", ""))
    if os.path.isabs(name) or name.startswith((".", "~")) or os.path.isdir(name):
        kept["name"] = Path(name).name
    return kept


def _earlier_export(output: Path, names: set[str]) -> set[str]:
    """The names an earlier export in `output` wrote: its record, or (written before records) its manifest's
    files plus the names this export writes that the old all-in-one export wrote too (not genai_config.json,
    which only exports with a record write: one in a folder without a record is the user's)."""
    if owned.has_record(output):
        return owned.owned(output)
    files = {EXPORT_MANIFEST, *(names - {GENAI_CONFIG})}
    with contextlib.suppress(OSError, ValueError, AttributeError):
        old = json.loads((output / EXPORT_MANIFEST).read_text())
        files |= {f for name in old.get("files", {}) for f in (name, name + ".data")}
    return {f for f in files if owned.plain(f)}


def install_export(tmp: Path, output: Path) -> None:
    """Move the finished export from `tmp` into `output`, replacing only files an earlier export wrote."""
    names = {p.name for p in tmp.iterdir()}
    if not output.exists():
        owned.claim(tmp, *names)
        os.replace(tmp, output)  # one rename: the folder appears complete or not at all
        return
    mine = _earlier_export(output, names)
    owned.refuse_foreign(output, names, mine, "move it away or choose another --output")
    owned.claim(output, *names)
    owned.remove(output, mine - names - {owned.RECORD})  # e.g. an earlier export's other quantized graph
    for name in sorted(names - {EXPORT_MANIFEST}) + [EXPORT_MANIFEST]:  # the manifest last
        os.replace(tmp / name, output / name)
    tmp.rmdir()


def file_mb(folder: Path, name: str) -> float:
    files = [folder / name] + [p for p in folder.glob(name + ".data")]
    return round(sum(p.stat().st_size for p in files if p.exists()) / 1e6, 2)
