"""pacs-agent: a DICOM node that turns CT studies with tumour segmentations into DICOM results.

The package ``pacs_agent`` is the service (receive, studies, routing, jobs, send, CLI). It never
imports torch, so the receiving process stays small and fast; models live in ``inference``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pacs-agent")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
