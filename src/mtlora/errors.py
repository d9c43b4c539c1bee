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


def refused_pickle_detail(exc: BaseException) -> str:
    """The one informative line of torch's ``weights_only`` refusal (which global or opcode it refused).

    ``torch.load(..., weights_only=True)`` raises ``pickle.UnpicklingError`` with a page of advice; the CLI
    prints one line, so keep the reason (e.g. ``Unsupported global: GLOBAL os.system``).
    """
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            rest = line.split("WeightsUnpickler error:", 1)[1].strip()
            if not rest and i + 1 < len(lines):
                rest = lines[i + 1]
            return rest.rstrip(".")
    return lines[0] if lines else type(exc).__name__
