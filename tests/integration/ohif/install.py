"""The OHIF viewer build and playwright-core from npm, cached outside the repository between runs.

``npm pack @ohif/app@VERSION`` fetches only the package tarball (its ``dist/`` is the built
viewer; none of its dependencies are needed to serve it); ``npm install playwright-core`` brings
the small driver that talks to Debian's Chromium over the DevTools protocol (it downloads no
browser). Both land in ``$PACS_AGENT_TEST_CACHE`` (default ``~/.cache/pacs-agent``) under a folder
named by the versions, so ``make test`` installs once per machine. A marker file is written last:
an interrupted install is redone.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

OHIF_VERSION = "3.13.2"
PLAYWRIGHT_VERSION = "1.60.0"  # the newest line that still runs on Debian's Node.js 18
NETWORK_ERRORS = ("ENOTFOUND", "EAI_AGAIN", "ECONNREFUSED", "ECONNRESET", "ETIMEDOUT", "ENETUNREACH", "E503")


class RegistryUnavailable(RuntimeError):
    """npm is missing or cannot reach its registry (the viewer test skips, saying so)."""


@dataclass(frozen=True)
class ViewerInstall:
    """Where the cached viewer and driver are."""

    root: Path

    @property
    def dist(self) -> Path:
        """OHIF's built ``dist/`` (``index.html`` and the bundles)."""
        return self.root / "dist"

    @property
    def node_modules(self) -> Path:
        """The folder holding ``playwright-core`` (for ``NODE_PATH``)."""
        return self.root / "node_modules"


def cache_dir() -> Path:
    """``$PACS_AGENT_TEST_CACHE`` or ``~/.cache/pacs-agent``."""
    configured = os.environ.get("PACS_AGENT_TEST_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "pacs-agent"


def _npm(*args: str, cwd: Path) -> str:
    npm = shutil.which("npm")
    if npm is None:
        raise RegistryUnavailable("npm is not installed (apt-get install npm, or Node.js with npm)")
    result = subprocess.run(
        [npm, *args, "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    if result.returncode != 0:
        output = result.stdout + result.stderr
        if any(code in output for code in NETWORK_ERRORS):
            raise RegistryUnavailable(f"npm cannot reach its registry: {output.strip()[-300:]}")
        raise RuntimeError(f"npm {' '.join(args)} failed ({result.returncode}):\n{output[-2000:]}")
    return result.stdout


def install_viewer(root: Path | None = None) -> ViewerInstall:
    """Return the cached install, fetching it first when it is not there (about 50 MB).

    Raises
    ------
    RegistryUnavailable
        npm is missing or the registry cannot be reached.
    """
    base = root or cache_dir()
    install = ViewerInstall(base / f"ohif-{OHIF_VERSION}-playwright-{PLAYWRIGHT_VERSION}")
    marker = install.root / ".complete"
    if marker.exists():
        return install
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=base, prefix=".install-") as scratch:
        work = Path(scratch)
        tarball = _npm("pack", f"@ohif/app@{OHIF_VERSION}", "--pack-destination", str(work), cwd=work).strip()
        with tarfile.open(work / tarball.splitlines()[-1]) as archive:
            members = [m for m in archive.getmembers() if m.name.startswith("package/dist/")]
            archive.extractall(work, members=members, filter="data")
        (work / "package" / "dist").rename(work / "dist")
        _npm("install", "--no-save", "--prefix", str(work), f"playwright-core@{PLAYWRIGHT_VERSION}", cwd=work)
        if install.root.exists():
            shutil.rmtree(install.root)
        install.root.mkdir()
        (work / "dist").rename(install.dist)
        (work / "node_modules").rename(install.node_modules)
    marker.write_text(f"@ohif/app {OHIF_VERSION}\nplaywright-core {PLAYWRIGHT_VERSION}\n")
    return install
