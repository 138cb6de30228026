"""Exception hierarchy of pacs-agent, in the lowest layer so that every package raises the same classes.

Every error raised on purpose derives from :class:`PacsAgentError`. The worker maps the subclasses
to job states: :class:`InputError` fails a job at once (the input will not get better by
retrying), anything else is retried and finally marked dead. The service adds its own
(:mod:`pacs_agent.errors`: storage, delivery).
"""


class PacsAgentError(Exception):
    """Root of all errors raised by pacs-agent on purpose."""


class ConfigError(PacsAgentError):
    """A configuration (the node's file, an environment override, a training configuration) is invalid.

    ``problems`` lists every problem found, each as ``"section.key: message"``.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid configuration:\n  " + "\n  ".join(self.problems))


class InputError(PacsAgentError):
    """A study, series or object cannot be processed as sent (bad geometry, missing data, ...).

    Not retried automatically: the message says what is wrong with the input in words an
    imaging IT person can act on.
    """


class ModelPackageError(PacsAgentError):
    """A model package is invalid, tampered with or incompatible."""
