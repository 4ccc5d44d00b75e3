"""qevo's own exception types: problems a user can fix.

A command (:mod:`qevo.cli`) ends on a :class:`QevoError` with one line on stderr and exit
status 2; any other exception is a bug and keeps its traceback. Every class is also a
``ValueError``, so Python callers that catch ``ValueError`` keep working.
"""


class QevoError(ValueError):
    """An input a user can fix: a config value, a data file, a work folder, a device budget."""


class ConfigError(QevoError):
    """A config file, override or argument value is invalid."""


class DataError(QevoError):
    """A dataset file is missing, corrupt, or not laid out as expected."""


class CheckpointError(QevoError):
    """A work folder or checkpoint file is missing, corrupt, or does not match what was asked for."""


class PopulationMemoryError(QevoError):
    """A population program asked for more memory than its devices have."""


class ExportError(QevoError):
    """A model holds an operation the ONNX export has no form for (a model of one's own)."""
