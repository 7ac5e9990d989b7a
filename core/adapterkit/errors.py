"""The exception hierarchy.

Every error adapterkit raises on bad input derives from :class:`AdapterkitError`
and also from the builtin a caller would expect (``KeyError`` for "no such
thing", ``ValueError`` for a bad value, ...), so ``except KeyError`` keeps
working. Messages name the offending value and the fix.
"""

from __future__ import annotations

__all__ = [
    "AdapterkitError",
    "PluginError",
    "UnknownMethodError",
    "ConfigError",
    "ConfigSyntaxError",
    "UnknownConfigKeyError",
    "ConfigValueError",
    "AdapterNameError",
    "AdapterExistsError",
    "UnknownAdapterError",
    "NoAdaptersError",
    "TargetError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "UnsafeCheckpointError",
    "CheckpointExistsError",
    "StateDictMismatchError",
    "HubAccessError",
    "SaveError",
    "AdapterStateError",
    "BudgetError",
    "PerSampleError",
    "UnsupportedOperationError",
    "ArgumentValueError",
]


class AdapterkitError(Exception):
    """Base class of every error adapterkit raises on purpose."""


class PluginError(AdapterkitError, RuntimeError):
    """A plugin could not be loaded, or broke the contract (e.g. a name collision)."""


class _KeyErrorMessage(KeyError):
    # KeyError.__str__ repr()s its argument; show our sentence as written.
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class UnknownMethodError(AdapterkitError, _KeyErrorMessage):
    """No installed plugin provides the requested adapter method."""


class ConfigError(AdapterkitError, ValueError):
    """An adapter configuration could not be understood."""


class ConfigSyntaxError(ConfigError):
    """A config string does not follow the grammar ``method[key=value, ...]``."""


class UnknownConfigKeyError(ConfigError):
    """A config names a key the method's config type does not have."""


class ConfigValueError(ConfigError):
    """A config key has a value of the wrong type or out of range."""


class AdapterNameError(AdapterkitError, ValueError):
    """An adapter name is not usable (empty, contains '.' or '/', reserved)."""


class AdapterExistsError(AdapterNameError):
    """An adapter of this name is already attached; names are never overwritten."""


class UnknownAdapterError(AdapterkitError, _KeyErrorMessage):
    """No adapter of this name is attached to the model."""


class NoAdaptersError(AdapterkitError, RuntimeError):
    """The operation needs at least one adapter and the model has none."""


class TargetError(AdapterkitError, ValueError):
    """The config's targets match no module of the model, or unsupported ones."""


class CheckpointError(AdapterkitError, ValueError):
    """An adapter checkpoint (files or a state dict) is unusable."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The adapter folder, repository, revision or file does not exist."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """The save target already holds an adapter and ``overwrite=True`` was not given."""


class UnsafeCheckpointError(CheckpointError):
    """Only a pickle checkpoint exists and the caller did not allow pickle."""


class StateDictMismatchError(CheckpointError):
    """Checkpoint tensors do not fit the adapter: missing, unexpected or wrong-shaped keys."""


class HubAccessError(CheckpointError, PermissionError):
    """The Hub refused access (authentication or gating)."""


class SaveError(AdapterkitError, OSError):
    """A save could not write its files: disk full, read-only file system, no permission, a bad path.

    An ``OSError`` too, with the ``errno`` of the failure; the message names the folder
    the caller asked for, never a temporary one. The original error is the ``__cause__``.
    """

    def __str__(self) -> str:
        # OSError would print "[Errno N] strerror: filename"; show our sentence as written.
        return str(self.args[0]) if self.args else ""


class AdapterStateError(AdapterkitError, RuntimeError):
    """The operation does not fit the adapters' current state (e.g. merge twice)."""


class BudgetError(AdapterStateError):
    """The adapter memory budget (``Adapters.limit``) cannot hold the adapters an operation needs at once."""


class UnsupportedOperationError(AdapterkitError, NotImplementedError):
    """The adapter's method does not implement this operation."""


class PerSampleError(AdapterkitError, ValueError):
    """A per-sample forward got a batch whose size differs from the number of row names."""


class ArgumentValueError(AdapterkitError, ValueError):
    """An argument of an adapterkit call (not a config key) has a wrong type or an out-of-range value."""
