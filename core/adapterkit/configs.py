"""Choosing a method and its settings: config strings, dicts, config objects.

Config-string grammar (whitespace allowed between tokens)::

    spec    := method [ "[" [ option ( "," option )* [","] ] "]" ]
    method  := a registered method name or alias, e.g. lora, LORA, ia3
    option  := key "=" value
    key     := a field name of the method's config type (a Python identifier)
    value   := a Python literal: 8, 0.05, True, None, "text", ['q_proj', 'v_proj'], {'a': 1}

Quoted strings may contain any character, brackets and commas included.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import functools
import difflib
import enum
import math
import re
import types
import typing
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from .errors import (
    CheckpointError,
    ConfigError,
    ConfigSyntaxError,
    ConfigValueError,
    PluginError,
    UnknownConfigKeyError,
    UnknownMethodError,
)
from .files import OversizedNumber
from .registry import Method, MethodRegistry, default_registry

__all__ = ["parse_config", "parse_config_string", "format_config", "config_to_dict"]

_SPEC = re.compile(r"\s*(?P<method>[A-Za-z_][\w.-]*)\s*(?:\[(?P<body>.*)\])?\s*", re.DOTALL)


def parse_config_string(spec: str) -> tuple[str, dict[str, Any]]:
    """Split a config string into its method name and options, without looking the method up.

    >>> parse_config_string('lora[r=8, target_modules=["q_proj", "v_proj"]]')
    ('lora', {'r': 8, 'target_modules': ['q_proj', 'v_proj']})
    """
    match = _SPEC.fullmatch(spec)
    if match is None:
        raise ConfigSyntaxError(
            f"cannot parse config string {spec!r}: expected method[key=value, ...], "
            'e.g. lora[r=8, target_modules=["q_proj", "v_proj"]] (check the brackets)'
        )
    body = match["body"]
    if body is None or not body.strip():
        return match["method"], {}
    try:
        # The options read as the keyword arguments of a call: Python's own
        # tokenizer handles quotes, nesting and whitespace.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "invalid escape sequence" in regex strings: keep them as written
            call = ast.parse(f"_({body}\n)", mode="eval").body
    except (SyntaxError, ValueError) as exc:
        raise ConfigSyntaxError(
            f"cannot parse the options of config string {_short(spec)}: {_short(getattr(exc, 'msg', exc), 200)}. "
            "Write key=value pairs separated by commas, values as Python literals (quote strings)."
        ) from None
    except (MemoryError, RecursionError):
        raise ConfigSyntaxError(
            f"cannot parse the options of config string {spec[:80]!r}...: nested too deeply. "
            "Write key=value pairs separated by commas, values as Python literals."
        ) from None
    assert isinstance(call, ast.Call)
    if call.args or any(kw.arg is None for kw in call.keywords):
        raise ConfigSyntaxError(f"config string {spec!r}: every option must be written key=value")
    options: dict[str, Any] = {}
    for kw in call.keywords:
        if kw.arg in options:
            raise ConfigSyntaxError(f"config string {spec!r} sets {kw.arg!r} twice; keep one")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                options[kw.arg] = ast.literal_eval(kw.value)  # type: ignore[index]
        except (ValueError, TypeError, MemoryError, RecursionError):
            # TypeError: an unhashable dict key or set element ({[1]: 2}).
            raise ConfigSyntaxError(
                f"config string {spec!r}: the value of {kw.arg!r}, {ast.unparse(kw.value)!r}, is not a "
                "Python literal (or holds a list, dict or set as a dict key or set element); quote strings "
                "and use numbers, True/False/None, lists, tuples or dicts"
            ) from None
    return match["method"], options


def _fields(config_type: type) -> dict[str, dataclasses.Field[Any] | attrs.Attribute[Any] | None]:
    if dataclasses.is_dataclass(config_type):
        return {f.name: f for f in dataclasses.fields(config_type) if f.init}
    if attrs.has(config_type):
        return {a.alias or a.name: a for a in attrs.fields(config_type) if a.init}
    import inspect

    params = inspect.signature(config_type).parameters.values()
    return {p.name: None for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


@functools.lru_cache(maxsize=256)  # resolving annotations is most of a config's cost (register() reads thousands)
def _type_hints(config_type: type) -> dict[str, Any]:
    """The config type's resolved annotations (callers only read the dict)."""
    try:
        return typing.get_type_hints(config_type)
    except Exception:  # unresolvable forward references: skip type checks
        return {}


def _matches(value: Any, tp: Any) -> bool:
    """A forgiving check of ``value`` against a type annotation; unknown forms pass."""
    if tp is Any or tp is object:
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(tp))
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin in (list, tuple, set, frozenset) or tp in (list, tuple, set, frozenset):
        container = origin or tp
        accepted = (list, tuple, set, frozenset) if container is not tuple else (list, tuple)
        if not isinstance(value, accepted):
            return False
        args = typing.get_args(tp)
        if len(args) == 1 or (container is tuple and len(args) == 2 and args[1] is Ellipsis):
            return all(_matches(v, args[0]) for v in value)
        return True
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return isinstance(value, (tp, str))
    if isinstance(tp, type) and (dataclasses.is_dataclass(tp) or attrs.has(tp)):
        return isinstance(value, (tp, dict))  # a nested config: the object or its dict
    return True


def _config_from_options(method: Method, options: Mapping[str, Any], registry: MethodRegistry) -> Any:
    fields = _fields(method.config_type)
    unknown = [key for key in options if key not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, list(fields), n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UnknownConfigKeyError(
            f"{method.name} has no config key {key!r}.{hint} "
            f"Valid keys are the fields of {method.config_type.__name__}."
        )
    _check_values(method, options)
    try:
        config = method.config_type(**options)
    except (TypeError, ValueError) as exc:
        raise ConfigValueError(f"invalid {method.name} config {dict(options)!r}: {exc}") from exc
    return config


def _check_values(method: Method, options: Mapping[str, Any]) -> None:
    """Refuse values of the wrong type for their key (bools are bools, lists are lists) and numbers that are not finite."""
    hints = _type_hints(method.config_type)
    for key, value in options.items():
        if key in hints and not _matches(value, hints[key]):
            raise ConfigValueError(
                f"{method.name} config key {key!r} expects {_type_name(hints[key])}, got {_short(value)} "
                f"({type(value).__name__})"
            )
        problem = _not_finite(value, key in hints and _wants_float(hints[key]))
        if problem is not None:
            raise ConfigValueError(
                f"{method.name} config key {key!r} must hold finite numbers, got {_short(value)}"
                f"{'' if problem is value else f' (holds {_short(problem)})'}; use a finite number"
            )


def _not_finite(value: Any, as_float: bool = False) -> Any:
    """The first number in ``value`` (or inside it, recursively) that is NaN, infinite, or too long to use; else None."""
    if isinstance(value, OversizedNumber):
        return value
    if isinstance(value, float):
        return None if math.isfinite(value) else value
    if isinstance(value, int) and not isinstance(value, bool):
        if as_float:
            try:
                float(value)
            except OverflowError:  # an int a float cannot hold: the computation would overflow
                return value
        return None
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            found = _not_finite(item, as_float)
            if found is not None:
                return found
    return None


def _wants_float(tp: Any) -> bool:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_wants_float(arg) for arg in typing.get_args(tp))
    return tp is float


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut short (a 5000-digit number makes a message nobody reads)."""
    try:
        text = value if isinstance(value, str) and limit > 80 else repr(value)
    except ValueError:  # an int past sys.get_int_max_str_digits() digits
        return f"<an int of {value.bit_length()} bits>"
    return text if len(text) <= limit else f"{text[: limit - 20]}... ({len(text)} characters)"


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is not None:  # Union[...], Optional[...], Literal[...], list[str]: spell it out
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _whole_numbers(value: Any, tp: Any) -> Any:
    """``value`` with floats that hold whole numbers made ``int`` where ``tp`` wants an int (``16.0`` -> ``16``).

    Other tools write saved configs, and some write ``"lora_alpha": 16.0`` for an int field;
    peft reads it. A fraction stays a float (and fails the type check).
    """
    if isinstance(value, float) and value.is_integer() and _wants(tp, int) and not _wants(tp, float):
        return int(value)
    args = typing.get_args(tp)
    if isinstance(value, dict) and typing.get_origin(tp) is dict and len(args) == 2:
        return {k: _whole_numbers(v, args[1]) for k, v in value.items()}
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for arg in args:
            if typing.get_origin(arg) is dict:
                return _whole_numbers(value, arg) if isinstance(value, dict) else value
    return value


def _wants(tp: Any, kind: type) -> bool:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_wants(arg, kind) for arg in typing.get_args(tp))
    return tp is kind


def _config_from_saved(method: Method, data: Mapping[str, Any], registry: MethodRegistry) -> Any:
    fields = _fields(method.config_type)
    hints = _type_hints(method.config_type)
    data = {key: _whole_numbers(value, hints[key]) if key in hints else value for key, value in data.items()}
    _check_values(method, {key: value for key, value in data.items() if key in fields})
    if registry.implements(method, "adapterkit_config_from_dict"):
        try:
            config = registry.call(method, "adapterkit_config_from_dict", data=dict(data))
        except PluginError as exc:
            # The config type refusing a value (peft's __post_init__) is a bad config, not a broken plugin.
            if isinstance(exc.__cause__, (TypeError, ValueError)):
                raise ConfigValueError(f"invalid saved {method.name} config: {exc.__cause__}") from exc.__cause__
            raise
        if config is not None:
            return config
    return _config_from_options(method, {k: v for k, v in data.items() if k in fields}, registry)


def resolve_config(
    spec: Any, registry: MethodRegistry | None = None, *, method_name: str | None = None
) -> tuple[Method, Any]:
    """Return ``(method, config)`` for any accepted spec; the config is a fresh object.

    ``method_name`` overrides the method a saved config dict names (a plugin's
    claim recorded in the weights file, see :mod:`adapterkit.files`).
    """
    registry = registry or default_registry()
    if isinstance(spec, str):
        name, options = parse_config_string(spec)
        method = registry.get(name)
        config = _config_from_options(method, options, registry)
    elif isinstance(spec, Mapping):
        data = dict(spec)
        if method_name is not None:
            method = registry.get(method_name)
            data.pop("method", None)
            config = _config_from_saved(method, data, registry)
        elif "method" in data:
            method = registry.get(str(data.pop("method")))
            config = _config_from_options(method, data, registry)
        elif "peft_type" in data:
            method = registry.get(str(getattr(data["peft_type"], "value", data["peft_type"])))
            config = _config_from_saved(method, data, registry)
        else:
            raise ConfigError(
                f"a config dict needs a 'method' key (or a saved config's 'peft_type'); got keys {sorted(data)}"
            )
    else:
        try:
            method = registry.method_for_config(spec)
        except UnknownMethodError:
            raise UnknownMethodError(
                f"cannot use {spec!r} as an adapter config: pass a config string such as 'lora[r=8]', "
                "a dict with a 'method' key, a saved adapter_config.json dict, or a config object "
                f"of an installed method ({', '.join(sorted(registry.methods)) or 'none installed'})"
            ) from None
        config = copy.deepcopy(spec)
        _check_values(method, {key: getattr(config, key) for key in _fields(method.config_type) if hasattr(config, key)})
    if registry.implements(method, "adapterkit_validate_config"):
        registry.call(method, "adapterkit_validate_config", config=config)
    return method, config


def checkpoint_method(
    registry: MethodRegistry,
    config: Mapping[str, Any],
    metadata: Mapping[str, str],
    keys: Sequence[str],
    *,
    recorded_key: str,
    where: str,
) -> str | None:
    """The method a saved adapter belongs to, before ``peft_type``: the one its files record, else a plugin's claim.

    ``None`` means no file record and no claim: the saved config's ``peft_type`` decides.
    Two plugins claiming the same files is a :class:`CheckpointError` naming both.
    """
    recorded = metadata.get(recorded_key)
    if recorded:
        return recorded
    claimed = registry.claims(config, metadata, keys)
    if len(claimed) > 1:
        names = ", ".join(f"{m.name!r} (plugin {m.plugin_name!r})" for m in claimed)
        raise CheckpointError(
            f"{where} is claimed by several installed methods: {names}. Choose one with "
            f"load(..., method={claimed[0].name!r}) or pass config=, or block a plugin with ADAPTERKIT_BLOCK_PLUGINS"
        )
    return claimed[0].name if claimed else None


def parse_config(spec: Any) -> Any:
    """Turn a config string, dict, saved ``adapter_config.json`` dict or config object into a config object.

    The result is the method's own config type (for LoRA, peft's ``LoraConfig``).
    Raises :class:`UnknownMethodError` (a ``KeyError``) naming the installed
    methods and the distribution to install, :class:`UnknownConfigKeyError`
    naming the closest valid keys, :class:`ConfigValueError` naming key and
    value, or :class:`ConfigSyntaxError`.
    """
    return resolve_config(spec)[1]


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def config_to_dict(config: Any, registry: MethodRegistry | None = None) -> dict[str, Any]:
    """The JSON-able dict saved as ``adapter_config.json`` for ``config``."""
    registry = registry or default_registry()
    method = registry.method_for_config(config)
    if registry.implements(method, "adapterkit_config_to_dict"):
        data = registry.call(method, "adapterkit_config_to_dict", config=config)
        if data is not None:
            return data
    if dataclasses.is_dataclass(config):
        data = {f.name: _plain(getattr(config, f.name)) for f in dataclasses.fields(config)}
    elif attrs.has(type(config)):
        data = {k: _plain(v) for k, v in attrs.asdict(config, recurse=False).items()}
    else:
        raise ConfigError(f"cannot serialise config {config!r}: the {method.name} plugin needs adapterkit_config_to_dict")
    data.setdefault("peft_type", (method.aliases[0] if method.aliases else method.name).upper())
    return data


_NO_DEFAULT = object()


def _declared_default(field: Any) -> Any:
    if isinstance(field, dataclasses.Field):
        if field.default is not dataclasses.MISSING:
            return field.default
        if field.default_factory is not dataclasses.MISSING:
            return field.default_factory()
    elif isinstance(field, attrs.Attribute) and field.default is not attrs.NOTHING:
        default = field.default
        return default.factory() if isinstance(default, attrs.Factory) else default  # type: ignore[call-arg]
    return _NO_DEFAULT


def format_config(config: Any, registry: MethodRegistry | None = None) -> str:
    """Write ``config`` as a config string that :func:`parse_config` turns back into an equal config.

    Only options that differ from the config type's defaults are written.
    """
    registry = registry or default_registry()
    method = registry.method_for_config(config)
    fields = _fields(method.config_type)
    try:
        defaults = {key: getattr(method.config_type(), key) for key in fields}
    except Exception:  # the type has required keys (AdaLoRA's total_step): use the declared defaults
        defaults = {key: _declared_default(field) for key, field in fields.items()}
    options = []
    for key in fields:
        value = getattr(config, key)
        if key in defaults and defaults[key] == value:
            continue
        options.append(f"{key}={_plain(value)!r}")
    return f"{method.name}[{', '.join(options)}]" if options else method.name
