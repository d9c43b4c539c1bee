"""Exception types. Every user-facing error says what was wrong and where (file, line, field, flag)."""


class MtLoraError(ValueError):
    """A user error (bad config, bad data, bad flag); the CLI prints it as one line and exits non-zero."""


class ConfigError(MtLoraError):
    """Invalid adapter or training configuration."""


class PlacementError(MtLoraError):
    """The adapter cannot be placed into the given model (names the module path)."""


class CheckpointError(MtLoraError):
    """An adapter checkpoint does not match the model (names the key and both shapes)."""


class DataError(MtLoraError):
    """Malformed data (names the file, line and field)."""
