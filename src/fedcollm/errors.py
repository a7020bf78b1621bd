"""The errors a user can cause. Each message is one line naming the culprit (file and line, config field,
client or run directory) and what was expected; the CLI prints it without a traceback (exit code 2)."""


class FedcollmError(Exception):
    """Bad input from outside the program: a config, a data file, a run directory, a model path, a payload."""


class ConfigError(FedcollmError, ValueError):
    """A config value is out of range, of the wrong type, or would be ignored; the message names the field."""


class DataError(FedcollmError, ValueError):
    """A data file is missing or malformed; the message names the file, line and field."""


class RunDirError(FedcollmError):
    """A run directory cannot be created, resumed or reported on as asked; the message names the path."""


class ModelError(FedcollmError):
    """A model or adapter cannot be loaded as configured; the message names it and the fix."""


class InvalidUpdate(FedcollmError, ValueError):
    """A client payload cannot be decoded or does not fit the global adapter; the message names the client."""


class FederationError(FedcollmError):
    """The federation cannot go on as configured (too few clients answered); the message names who is missing."""
