"""User-facing errors: each one becomes a single line on stderr and a non-zero exit code."""


class EdgepkdError(Exception):
    """An error the user can fix; the CLI prints ``edgepkd: error: <message>`` and exits ``exit_code``."""

    exit_code = 1


class ConfigError(EdgepkdError):
    """A recipe, override or profile is invalid (unknown key, wrong type, bad value)."""

    exit_code = 2


class DataError(EdgepkdError):
    """A dataset cannot be found or read."""

    exit_code = 2


class RunError(EdgepkdError):
    """A run directory is missing, incomplete, or would be overwritten."""

    exit_code = 2
