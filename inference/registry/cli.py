"""``pacs-agent models list | verify | install``: plain functions the CLI calls.

Each takes paths and an output stream and returns the process exit code (0 ok, 1 a package was
refused or has problems). ``pacs_agent.cli`` imports this module inside the sub-command only,
so the receiving process never imports torch.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from inference.errors import ModelPackageError
from inference.registry.package import install_package, list_packages, load_package, verify_package

__all__ = ["EXIT_INVALID", "EXIT_OK", "models_install", "models_list", "models_verify"]

EXIT_OK, EXIT_INVALID = 0, 1


def models_list(models_dir: Path, *, verify: bool = False, out: TextIO | None = None) -> int:
    """Print the installed packages, one line each.

    Parameters
    ----------
    models_dir
        Directory of installed packages (``[models] dir`` of the configuration).
    verify
        Also check checksums and weights of each package (slower).
    out
        Output stream (default: stdout).

    Returns
    -------
    int
        0, or 1 when any listed package has problems.
    """
    out = out or sys.stdout
    entries = list_packages(models_dir, verify=verify)
    if not entries:
        print(f"no model packages in {models_dir}", file=out)
        return EXIT_OK
    for e in entries:
        state = "OK" if not e.problems else f"{len(e.problems)} problem(s)"
        if not verify and not e.problems:
            state = "not verified"
        labels = ",".join(e.labels)
        print(f"{e.name:<28} {e.version:<10} {e.method:<9} {e.validation_status:<9} {labels:<28} {state}", file=out)
        for problem in e.problems:
            print(f"    - {problem}", file=out)
    return EXIT_INVALID if any(e.problems for e in entries) else EXIT_OK


def models_verify(path: Path, *, out: TextIO | None = None) -> int:
    """Verify one package (directory or zip) and print the result.

    Returns
    -------
    int
        0 when the package is valid, else 1 (each problem printed).
    """
    out = out or sys.stdout
    problems = verify_package(path)
    if problems:
        print(f"{path}: {len(problems)} problem(s):", file=out)
        for problem in problems:
            print(f"  - {problem}", file=out)
        return EXIT_INVALID
    package = load_package(path)
    print(
        f"{path}: OK - {package.name} {package.version}, method {package.method}, labels {', '.join(package.labels)}, "
        f"{package.validation_status}, weights sha256 {package.weights_sha256}",
        file=out,
    )
    return EXIT_OK


def models_install(path: Path, models_dir: Path, *, out: TextIO | None = None) -> int:
    """Verify a package and install it into ``models_dir``.

    Returns
    -------
    int
        0 when installed (or already installed), else 1 with the reason printed.
    """
    out = out or sys.stdout
    try:
        target = install_package(path, models_dir)
    except ModelPackageError as exc:
        print(str(exc), file=out)
        return EXIT_INVALID
    print(f"installed {path} -> {target}", file=out)
    return EXIT_OK
