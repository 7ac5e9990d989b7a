"""Config checks shared by the peft-based methods, and peft's errors in adapterkit's words."""

from __future__ import annotations

import contextlib
import math
import os
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from adapterkit import ConfigValueError, TargetError, UnsupportedOperationError
from peft.utils.error import NoMatchingPeftModuleError
from torch import nn

__all__ = ["check_memory", "merge_errors", "peft_errors", "validate_peft_config", "warn_unmatched_patterns"]

# Config keys that set the rank of the weights peft allocates (AdaLoRA allocates init_r).
_RANK_KEYS = ("r", "init_r")


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


def check_memory(method: str, name: str, config: Any, model: nn.Module) -> None:
    """Refuse, before anything is allocated, ranks whose weights would not fit in the memory available.

    The bytes are estimated from the layers the config may target (``target_modules`` by
    peft's matching rule; every layer when it is left to peft) and each one's rank (``r``,
    or the ``rank_pattern`` entry matching the layer): ``rank * (out + in)`` values per layer,
    an upper bound of what peft creates. Raises :class:`~adapterkit.ConfigValueError` naming
    the key and value when the total exceeds the memory available on the layers' device.
    """
    ranks = {key: value for key in _RANK_KEYS if isinstance(value := getattr(config, key, None), int)}
    if not ranks:
        return  # a method without ranks (IA3): its weights are the size of a layer's features
    rank_key, rank = max(ranks.items(), key=lambda item: item[1])
    patterns = dict(getattr(config, "rank_pattern", None) or {})
    targets = getattr(config, "target_modules", None)
    needed: dict[torch.device, int] = {}
    driver: dict[torch.device, tuple[int, str, str]] = {}  # the largest layer per device, and the key behind it
    for key, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() < 2 or weight.is_meta or not _targeted(key, targets):
            continue
        pattern = _matching_pattern(patterns, key)
        layer_rank, source = (
            (patterns[pattern], f"rank_pattern[{pattern!r}]={_short(patterns[pattern])}") if pattern is not None
            and isinstance(patterns[pattern], int) else (rank, f"{rank_key}={_short(rank)}")
        )
        size = max(torch.get_default_dtype().itemsize, weight.element_size())
        count = layer_rank * (weight.shape[0] + math.prod(weight.shape[1:])) * size
        needed[weight.device] = needed.get(weight.device, 0) + count
        if count > driver.get(weight.device, (0, "", ""))[0]:
            driver[weight.device] = (count, key, source)
    for device, total in needed.items():
        free = _available(device)
        if free is not None and total > free:
            _, key, source = driver[device]
            raise ConfigValueError(
                f"{method} adapter {name!r}: config key {source} would allocate about {_human(total)} of adapter "
                f"weights on {device} (the most for {key!r}), more than the {_human(free)} available; "
                "use a smaller rank"
            )


def _targeted(key: str, targets: Any) -> bool:
    """Whether peft may target module ``key`` (its matching rule, without layers_to_transform: an upper bound)."""
    if not key:
        return False
    if targets is None or targets == "all-linear":
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    return any(key == target or key.endswith(f".{target}") for target in targets)


def _available(device: torch.device) -> int | None:
    """Bytes of memory available on ``device`` now; None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _human(count: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if count < 1024:
            return f"{count} {unit}"
        count //= 1024
    # Past 4300 digits Python will not print an int: give its order of magnitude from its bits.
    return f"{count} TiB" if count < 10**6 else f"10^{int(count.bit_length() * math.log10(2))} TiB"


def _short(number: int) -> str:
    return str(number) if number.bit_length() < 64 else f"<an int of {number.bit_length()} bits>"


def _matching_pattern(patterns: dict[str, Any], key: str) -> str | None:
    """The first ``rank_pattern`` key that peft applies to module ``key`` (peft's get_pattern_key rule)."""
    for pattern in patterns:
        try:
            if re.match(rf"(.*\.)?({pattern})$", key):
                return pattern
        except re.error as exc:
            raise ConfigValueError(
                f"config key 'rank_pattern' has {pattern!r}, which is not a valid regular expression ({exc}); fix it"
            ) from None
    return None


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
