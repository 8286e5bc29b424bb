"""One small registry used for every kind of named thing (teachers, students, datasets, scan backends...).

    TEACHERS = Registry("teacher")

    @TEACHERS.register("cnn")
    def cnn(num_classes, in_chans, image_size, width=32): ...

    TEACHERS.get("cnnn")  # ConfigError: unknown teacher 'cnnn'; did you mean 'cnn'? (valid: cnn, resnet18, resnet8)
"""

from __future__ import annotations

import difflib
import fnmatch
from typing import Generic, Iterator, TypeVar

from edgepkd.errors import ConfigError

T = TypeVar("T")


def closest(name: str, choices) -> str:
    """' did you mean 'x'?' for the closest choice, or '' when nothing is close."""
    match = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean '{match[0]}'?" if match else ""


class Registry(Generic[T]):
    """Name -> object mapping. Duplicate names fail; unknown names list the valid ones."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str | None = None, obj: T | None = None):
        """Register ``obj`` under ``name``; used bare (``@R.register()``) it takes the function's name."""

        def add(o: T) -> T:
            key = name or getattr(o, "__name__")
            if key in self._items:
                raise ValueError(f"{self.kind} '{key}' is already registered")
            self._items[key] = o
            return o

        return add(obj) if obj is not None else add

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} '{name}'{closest(name, self._items)} (valid: {', '.join(self.names())})"
            ) from None

    def names(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._items if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

    def items(self) -> list[tuple[str, T]]:
        return [(n, self._items[n]) for n in self.names()]
