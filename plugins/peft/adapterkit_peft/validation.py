"""Config checks shared by the peft-based methods, and peft's errors in adapterkit's words."""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from adapterkit import ConfigValueError, TargetError, UnsupportedOperationError
from peft.utils.error import NoMatchingPeftModuleError

__all__ = ["merge_errors", "peft_errors", "validate_peft_config", "warn_unmatched_patterns"]


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
    tokens = getattr(config, "trainable_token_indices", None)
    if tokens not in (None, [], (), {}):
        raise ConfigValueError(
            f"{method} config key 'trainable_token_indices'={tokens!r} is not supported by adapterkit yet (planned: "
            "peft's TrainableTokensWrapper per adapter, as modules_to_save is now); meanwhile train the whole "
            "embedding with modules_to_save=['embed_tokens'], or leave it unset"
        )
    replication = getattr(config, "layer_replication", None)
    if replication not in (None, [], ()):
        raise ConfigValueError(
            f"{method} config key 'layer_replication'={replication!r} is not supported by adapterkit yet; leave it unset"
        )
    heads = getattr(config, "modules_to_save", None)
    if heads is not None and (isinstance(heads, str) or not all(isinstance(h, str) and h for h in heads)):
        raise ConfigValueError(
            f"{method} config key 'modules_to_save' must be a list of module names, got {heads!r}; "
            "e.g. modules_to_save=['classifier']"
        )
    dropout = getattr(config, "lora_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout <= 1:
        # peft replaces a dropout <= 0 by no dropout: a negative one would pass silently.
        raise ConfigValueError(
            f"{method} config key 'lora_dropout' must be a probability between 0 and 1, got {dropout!r}; "
            "e.g. lora_dropout=0.05"
        )
    bias = getattr(config, "bias", "none")
    if bias not in ("none", "all") and not (isinstance(bias, str) and bias.endswith("_only")):
        raise ConfigValueError(
            f"{method} config key 'bias'={bias!r} is not an option peft knows: 'none', 'all' (train every bias of "
            f"the model) or '{method}_only' (the biases of the adapted layers)"
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


@contextlib.contextmanager
def merge_errors(method: str, names: Sequence[str], where: Callable[[], str]) -> Iterator[None]:
    """What peft raises when it cannot merge into a layer (a grouped convolution, ``lora_bias`` without a base
    bias, a broken adapter) as :class:`~adapterkit.UnsupportedOperationError`; ``where()`` names the layer."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise
    except (NotImplementedError, RuntimeError, ValueError, TypeError) as exc:
        raise UnsupportedOperationError(
            f"{method} adapters {list(names)}: peft cannot merge them into layer {where()!r} "
            f"({type(exc).__name__}: {exc}); nothing is merged, the model is as it was. Use the adapter unmerged."
        ) from exc


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
