"""pacs-agent: a DICOM node that turns CT studies with tumour segmentations into DICOM results.

The package ``pacs_agent`` is the service (receive, studies, routing, jobs, send, CLI). It never
imports torch, so the receiving process stays small and fast; models live in ``inference``.
"""

from inference.version import __version__

__all__ = ["__version__"]
