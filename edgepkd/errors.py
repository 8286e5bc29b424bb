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


def first_line(e: BaseException, limit: int = 300, with_type: bool = False) -> str:
    """One line for an error that quotes another: the first non-empty line of ``e``'s message, at most ``limit``
    characters; its type's name when the message is empty (``str(e).splitlines()[0]`` raises IndexError there).
    ``with_type``: 'TypeName: first line'."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    return f"{type(e).__name__}: {lines[0][:limit]}" if with_type else lines[0][:limit]
