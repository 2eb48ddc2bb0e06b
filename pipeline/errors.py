"""Exceptions that stop a run before or outside image work.

Everything that goes wrong with one image is data (``status`` + ``error`` on its row);
these are for configuration, preflight and programmer errors, which the CLI turns into a
one-line message and exit code 1.
"""


class PipelineError(Exception):
    """Base class: a problem the user must fix before the run can go on."""


class ConfigError(PipelineError):
    """Invalid or inconsistent settings."""


class ManifestError(PipelineError):
    """The manifest cannot be read or lacks what a run needs."""


class WeightsError(PipelineError):
    """A model file is missing, unreadable, or does not match its architecture."""


class StorageError(PipelineError):
    """An input or output location cannot be used."""


class Fenced(StorageError):
    """This run no longer holds its output (another run has taken it over): nothing more may be written."""


class Stalled(PipelineError):
    """The cluster made no progress for too long (no workers joined, a lost node's actors cannot restart)."""


class Stopped(KeyboardInterrupt):
    """The run was asked to stop (SIGTERM: `ray job stop`, a pod's termination, `kill`). A KeyboardInterrupt,
    like Ctrl-C, so that no ``except Exception`` on the way swallows it."""
