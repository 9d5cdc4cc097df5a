"""Groups of click options shared by several commands."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def option_group(*options: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """One decorator applying `options` so --help lists them in the order given."""

    def decorate(func: Any) -> Any:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate
