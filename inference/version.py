"""The installed pacs-agent version, in the lowest layer (results and SRs name it)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pacs-agent")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
