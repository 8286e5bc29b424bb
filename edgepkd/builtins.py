"""Where the built-in recipes, export targets and device profiles are read from.

The repository's top-level ``recipes/``, ``export/`` and ``devices/`` folders are the only copy in the source tree.
The build maps them into the package (``[tool.setuptools] package-dir`` in pyproject.toml: ``edgepkd._builtins.
<kind>`` is ``<kind>/``), so a wheel, and a wheel built from the sdist, carry them as ``edgepkd/_builtins/<kind>/``.

    checkout (editable install, PYTHONPATH)   <repo>/<kind>/
    installed wheel                           <site-packages>/edgepkd/_builtins/<kind>/ (importlib.resources)
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

KINDS = ("recipes", "export", "devices")


def checkout_root() -> Path | None:
    """The repository this ``edgepkd`` package is imported from, or None for an installed package."""
    root = Path(__file__).resolve().parent.parent
    try:
        return root if 'name = "edgepkd"' in (root / "pyproject.toml").read_text() else None
    except OSError:
        return None


def builtin_dir(kind: str) -> Path:
    """The folder of built-in ``kind`` files (one of KINDS): the checkout's top-level folder, else the packaged copy.
    It may be missing (a broken install); the loaders then say that nothing was found and where they looked."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind of built-in {kind!r} (kinds: {', '.join(KINDS)})")
    root = checkout_root()
    if root is not None and (root / kind).is_dir():
        return root / kind
    return Path(str(importlib.resources.files("edgepkd") / "_builtins" / kind))
