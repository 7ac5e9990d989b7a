"""Config values that name exactly a given set of modules (for adapters built, not written, e.g. by ``combine``)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

__all__ = ["exact_modules"]


def exact_modules(paths: Sequence[str], others: Iterable[str], separator: str = ".") -> list[str] | str:
    """``paths`` as a peft module list (``target_modules``, ``feedforward_modules``) matching exactly them.

    peft matches a list entry against a module path as the path itself or a suffix after
    ``separator`` (``"."`` for ``target_modules``; IA3's ``feedforward_modules`` use ``""``).
    When one of ``others`` (the paths peft will test) would match too, the result is instead
    a regex of the escaped paths, which peft matches against whole paths.
    """
    chosen = sorted(set(paths))
    if any(path not in chosen and any(path.endswith(f"{separator}{target}") for target in chosen) for path in others):
        return "|".join(re.escape(path) for path in chosen)
    return chosen
