"""Exception hierarchy of pacs-agent: the shared classes (:mod:`inference.errors`) and the service's own.

Every error the node raises on purpose derives from :class:`PacsAgentError`. The worker maps the
subclasses to job states: :class:`InputError` fails a job at once (the input will not get better
by retrying), anything else is retried and finally marked dead.
"""

from inference.errors import ConfigError, InputError, ModelPackageError, PacsAgentError

__all__ = [
    "ConfigError",
    "DeliveryError",
    "InputError",
    "ModelPackageError",
    "PacsAgentError",
    "StorageError",
]


class StorageError(PacsAgentError):
    """The spool or database cannot take an object (disk full, permissions)."""


class DeliveryError(PacsAgentError):
    """A result could not be delivered to a destination (association refused, failure status)."""
