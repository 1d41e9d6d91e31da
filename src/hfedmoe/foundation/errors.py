"""User-facing errors: the CLI prints them as one line and exits with status 2."""


class HFedMoEError(Exception):
    """A problem with the user's input (config, files, directories), not a bug."""


class ConfigError(HFedMoEError):
    """A config value is missing, unknown or out of range. The message names the key."""


class WriteError(HFedMoEError):
    """A file could not be written (a full disk, a permission, a read-only folder): nothing
    already written is lost, and once the cause is gone a run resumes. The message names the
    file and the cause."""
