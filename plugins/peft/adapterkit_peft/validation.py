"""Config checks shared by the peft-based methods, and peft's errors in adapterkit's words."""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from adapterkit import ConfigValueError, TargetError
from peft.utils.error import NoMatchingPeftModuleError

__all__ = ["peft_errors", "validate_peft_config", "warn_unmatched_patterns"]


def validate_peft_config(method: str, config: Any) -> None:
    """The checks every peft-based method shares; raise :class:`~adapterkit.ConfigValueError` naming key and fix."""
    r = getattr(config, "r", None)
    if r is not None and (not isinstance(r, int) or r <= 0):
        raise ConfigValueError(f"{method} config key 'r' must be a positive integer, got {r!r}")
    targets = getattr(config, "target_modules", None)
    for key in ("target_modules", "exclude_modules"):
        pattern = getattr(config, key, None)
        if isinstance(pattern, str):  # peft matches a string with re.fullmatch
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigValueError(
                    f"{method} config key {key!r}={pattern!r} is not a valid regular expression ({exc}); "
                    "fix the pattern or pass a list of module names"
                ) from None
    if targets is not None and not isinstance(targets, str) and len(targets) == 0:
        raise ConfigValueError(
            f"{method} config key 'target_modules' is empty; name modules, e.g. target_modules=['q_proj', 'v_proj']"
        )
    for key, default in (("modules_to_save", None), ("trainable_token_indices", None), ("layer_replication", None)):
        value = getattr(config, key, default)
        if value not in (default, [], ()):
            raise ConfigValueError(
                f"{method} config key {key!r}={value!r} is not supported by adapterkit yet; leave it unset"
            )
    if getattr(config, "target_parameters", None):
        raise ConfigValueError(
            f"{method} config key 'target_parameters' is not supported by adapterkit yet; use target_modules"
        )
    dropout = getattr(config, "lora_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout <= 1:
        # peft replaces a dropout <= 0 by no dropout: a negative one would pass silently.
        raise ConfigValueError(
            f"{method} config key 'lora_dropout' must be a probability between 0 and 1, got {dropout!r}; "
            "e.g. lora_dropout=0.05"
        )
    bias = getattr(config, "bias", "none")
    if bias != "none":
        raise ConfigValueError(
            f"{method} config key 'bias'={bias!r} is not supported (base biases would be saved); use 'none'"
        )


@contextlib.contextmanager
def peft_errors(method: str, name: str) -> Iterator[None]:
    """Turn what peft raises for a config that does not fit the model into adapterkit's errors."""
    try:
        yield
    except NoMatchingPeftModuleError as exc:
        raise TargetError(f"{method} adapter {name!r}: {exc}") from None
    except ValueError as exc:
        if "not supported" in str(exc) or "Target module" in str(exc):
            raise TargetError(f"{method} adapter {name!r}: {exc}") from None
        raise ConfigValueError(f"{method} adapter {name!r}: {exc}") from None
    except (TypeError, AttributeError, KeyError, re.error) as exc:
        # peft trips over a config value of the wrong type (e.g. rank_pattern={'q_proj': 'x'}).
        raise ConfigValueError(
            f"{method} adapter {name!r}: the config does not fit peft ({type(exc).__name__}: {exc}); "
            "check the types of its values"
        ) from None


def warn_unmatched_patterns(config: Any, targeted: Sequence[str]) -> None:
    """peft's warning for ``rank_pattern``/``alpha_pattern`` keys that match no targeted module."""
    for attr in ("rank_pattern", "alpha_pattern"):
        patterns = getattr(config, attr, None)
        if not patterns:
            continue
        unmatched = sorted(p for p in patterns if not any(re.match(rf"(.*\.)?({p})$", key) for key in targeted))
        if unmatched:
            warnings.warn(
                f"The following {attr} keys did not match any targeted module and were ignored: {unmatched}.",
                RuntimeWarning,
                stacklevel=4,
            )
