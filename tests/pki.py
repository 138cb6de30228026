"""Test certificates made with the openssl command line in a test's temporary directory.

Nothing here is ever committed: every test makes its own CA, node and client certificates.
RSA 2048 keys, so that every TLS profile of DCMTK accepts them.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Identity:
    """A certificate and its key (PEM files)."""

    cert: Path
    key: Path


def _openssl(*args: str, cwd: Path) -> None:
    tool = shutil.which("openssl")
    if tool is None:
        pytest.skip("the openssl command line tool is not installed (apt-get install openssl)")
    result = subprocess.run([tool, *args], cwd=cwd, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"openssl {' '.join(args)} failed:\n{result.stderr}"


class Pki:
    """A private CA in ``directory`` that issues server and client certificates."""

    def __init__(self, directory: Path, name: str = "Test CA") -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "index.txt").write_text("")
        (directory / "serial").write_text("1000\n")
        self.ca = Identity(directory / "ca.pem", directory / "ca.key")
        _openssl(
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(self.ca.key),
            "-out",
            str(self.ca.cert),
            "-days",
            "3",
            "-subj",
            f"/CN={name}",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            cwd=directory,
        )
        (directory / "ca.cnf").write_text(
            "[ca]\ndefault_ca = test\n"
            "[test]\n"
            f"database = {directory / 'index.txt'}\nserial = {directory / 'serial'}\n"
            f"new_certs_dir = {directory}\ndefault_md = sha256\npolicy = anything\n"
            "unique_subject = no\ncopy_extensions = none\n"
            "[anything]\ncommonName = supplied\n"
        )

    def issue(
        self,
        name: str,
        *,
        hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
        start: str | None = None,
        end: str | None = None,
    ) -> Identity:
        """A certificate for ``hosts`` (DNS names and IP addresses) usable as server and client.

        ``start`` / ``end`` (``YYYYMMDDHHMMSSZ``) set the validity; default: from now for 2 days.
        """
        identity = Identity(self.directory / f"{name}.pem", self.directory / f"{name}.key")
        csr = self.directory / f"{name}.csr"
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(identity.key),
            "-out",
            str(csr),
            "-subj",
            f"/CN={hosts[0] if hosts else name}",
            cwd=self.directory,
        )
        alt = ",".join(f"IP:{h}" if h.replace(".", "").isdigit() else f"DNS:{h}" for h in hosts)
        extensions = self.directory / f"{name}.ext"
        extensions.write_text(
            "[ext]\nbasicConstraints = critical,CA:FALSE\n"
            "keyUsage = critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage = serverAuth,clientAuth\n" + (f"subjectAltName = {alt}\n" if alt else "")
        )
        dates = ["-startdate", start] if start else []
        dates += ["-enddate", end] if end else ["-days", "2"]
        _openssl(
            "ca",
            "-batch",
            "-config",
            str(self.directory / "ca.cnf"),
            "-cert",
            str(self.ca.cert),
            "-keyfile",
            str(self.ca.key),
            "-in",
            str(csr),
            "-out",
            str(identity.cert),
            "-extfile",
            str(extensions),
            "-extensions",
            "ext",
            "-notext",
            *dates,
            cwd=self.directory,
        )
        identity.key.chmod(0o600)
        return identity
