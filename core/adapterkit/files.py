"""peft-format adapter files: finding them (local folder or Hub), reading, writing.

A saved adapter is a folder with ``adapter_config.json`` and
``adapter_model.safetensors`` whose keys carry peft's ``base_model.model.``
prefix. adapterkit also records the method that wrote the file in the
safetensors metadata (``adapterkit_method``), which peft ignores: a plugin whose
config subclasses another method's (a LoRA variant saving ``peft_type: LORA``)
gets its own checkpoints back.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import math
import os
import re
import shutil
import stat
import struct
import sys
import uuid
from collections.abc import Iterator, Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import attrs
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

try:
    import numpy
except ImportError:  # torch runs without numpy; the NaN check then sums with torch
    numpy = None

from .errors import (
    AdapterkitError,
    CheckpointError,
    CheckpointNotFoundError,
    HubAccessError,
    SaveError,
    UnsafeCheckpointError,
)

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "PICKLE_WEIGHTS_NAME",
    "PEFT_PREFIX",
    "resolve",
    "read_config",
    "read_weights",
    "nonfinite",
    "write_adapter",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
METHOD_KEY = "adapterkit_method"
DISTRIBUTION_KEY = "adapterkit_distribution"


@attrs.frozen
class Weights:
    """A weights file and whether it is a pickle."""

    path: Path
    pickle: bool = False


@attrs.frozen
class Found:
    """The files of an adapter, resolved to local paths."""

    config: Path | None
    weights: Weights | None


def adapter_folder(directory: str | PathLike[str], name: str) -> Path:
    """Where peft puts adapter ``name`` inside a save directory."""
    return Path(directory) if name == "default" else Path(directory) / name


def resolve(
    source: str | PathLike[str],
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | PathLike[str] | None = None,
    local_files_only: bool = False,
    allow_pickle: bool = False,
    need_config: bool = True,
    need_weights: bool = True,
) -> Found:
    """Find an adapter's files in a local folder or a Hub repo (one resolved commit)."""
    local = Path(source).expanduser()
    if local.is_dir():
        folder = local / subfolder if subfolder else local
        if not folder.is_dir():
            raise CheckpointNotFoundError(f"adapter folder {str(folder)!r} does not exist (subfolder={subfolder!r})")
    elif not isinstance(source, str):
        # A path object means a local folder: never ask the Hub for it.
        raise CheckpointNotFoundError(
            f"adapter folder {str(local)!r} does not exist; pass an existing folder, or a Hub repo id as a string"
        )
    else:
        folder = _download(
            str(source),
            subfolder=subfolder,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            allow_pickle=allow_pickle,
        )
    config = folder / CONFIG_NAME
    if need_config and not config.is_file():
        raise CheckpointNotFoundError(f"{_where(source, subfolder)} has no {CONFIG_NAME}; is it a peft adapter folder?")
    weights = None
    if need_weights:
        if (folder / WEIGHTS_NAME).is_file():
            weights = Weights(folder / WEIGHTS_NAME)
        elif (folder / PICKLE_WEIGHTS_NAME).is_file():
            if not allow_pickle:
                raise UnsafeCheckpointError(
                    f"{_where(source, subfolder)} has only {PICKLE_WEIGHTS_NAME}, a pickle file that can run code "
                    f"when read. Convert it to {WEIGHTS_NAME}, or pass allow_pickle=True if you trust the source."
                )
            weights = Weights(folder / PICKLE_WEIGHTS_NAME, pickle=True)
        else:
            raise CheckpointNotFoundError(
                f"{_where(source, subfolder)} has no {WEIGHTS_NAME}"
                + ("" if allow_pickle else f" ({PICKLE_WEIGHTS_NAME} pickles are read only with allow_pickle=True)")
            )
    return Found(config if need_config else None, weights)


def _where(source: str | PathLike[str], subfolder: str | None) -> str:
    return repr(f"{source}/{subfolder}" if subfolder else str(source))


def _download(
    repo_id: str,
    *,
    subfolder: str | None,
    revision: str | None,
    token: str | bool | None,
    cache_dir: str | PathLike[str] | None,
    local_files_only: bool,
    allow_pickle: bool,
) -> Path:
    """Fetch the adapter files of one commit of a Hub repo into the cache; return their folder."""
    import huggingface_hub as hf
    from huggingface_hub import errors as hf_errors

    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    patterns = [prefix + CONFIG_NAME, prefix + WEIGHTS_NAME]
    if allow_pickle:
        patterns.append(prefix + PICKLE_WEIGHTS_NAME)
    where = f"Hub repo {repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    try:
        # snapshot_download resolves the revision to one commit, then fetches every file at that commit.
        root = hf.snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=patterns,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
        )
    except hf_errors.HFValidationError:
        raise CheckpointNotFoundError(
            f"{repo_id!r} is neither an existing local folder nor a valid Hub repo id ('owner/name')"
        ) from None
    except hf_errors.RevisionNotFoundError:
        raise CheckpointNotFoundError(f"{where}: revision not found; check the branch, tag or commit") from None
    except hf_errors.GatedRepoError:
        raise HubAccessError(f"{where} is gated: accept its terms on the Hub and pass a token") from None
    except hf_errors.RepositoryNotFoundError:
        raise CheckpointNotFoundError(
            f"{where} was not found, or is private and the token does not grant access"
        ) from None
    except hf_errors.LocalEntryNotFoundError:
        raise CheckpointNotFoundError(
            f"{where} is not in the local cache and the Hub is not reachable (offline or local_files_only=True); "
            "download it once while online or pass a local folder"
        ) from None
    except hf_errors.HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            raise HubAccessError(f"{where}: access denied (HTTP {status}); check the token") from None
        raise CheckpointError(f"{where}: the Hub answered HTTP {status}; try again later") from None
    except Exception as exc:  # the HTTP client's own errors (a connection cut mid-download, ...)
        raise CheckpointError(f"{where}: download failed ({type(exc).__name__}); try again") from None
    folder = Path(root) / prefix if prefix else Path(root)
    if not folder.is_dir():
        raise CheckpointNotFoundError(f"{where} has no folder {subfolder!r}")
    return folder


class OversizedNumber(str):
    """A JSON number too long to be a Python int (over ``sys.get_int_max_str_digits()`` digits), kept as text."""

    def __repr__(self) -> str:
        return f"<a number with {len(self)} digits: {str.__str__(self)[:12]}...>"


def _parse_int(text: str) -> int | OversizedNumber:
    try:
        return int(text)
    except ValueError:  # too many digits: keep it; the config's checks name the key and refuse it
        return OversizedNumber(text)


def read_config(path: Path | None) -> dict[str, Any]:
    """Read ``adapter_config.json``."""
    assert path is not None
    try:
        data = json.loads(path.read_text(encoding="utf-8"), parse_int=_parse_int)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"cannot read {str(path)!r}: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{str(path)!r} does not hold a JSON object")
    return data


_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)
# safetensors dtype names -> torch dtypes (those this torch has).
_DTYPES = {
    name: getattr(torch, attr)
    for name, attr in {
        "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
        "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
        "U16": "uint16", "U32": "uint32", "U64": "uint64", "C64": "complex64",
        "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    }.items()
    if hasattr(torch, attr)
}  # fmt: skip


def read_weights(weights: Weights | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read the tensors of a weights file and its metadata (``METHOD_KEY`` names the method that wrote it).

    The tensors own their memory: nothing done to the file afterwards (overwritten,
    truncated, deleted) reaches them. safetensors checks the file; the bytes are then read
    straight into each tensor's own memory (no memory map left behind, and no second copy:
    peak memory is the tensors themselves).
    """
    assert weights is not None
    if weights.pickle:
        try:
            return torch.load(weights.path, map_location="cpu", weights_only=True), {}
        except Exception as exc:
            raise CheckpointError(f"cannot read {str(weights.path)!r}: {exc}") from None
    try:
        with open(weights.path, "rb") as raw, safe_open(weights.path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = _read_owned(raw, f)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, OverflowError, struct.error) as exc:
        raise CheckpointError(
            f"{str(weights.path)!r} is not a readable safetensors file ({exc}); it may be truncated or corrupt"
        ) from None
    return tensors, dict(metadata)


def _read_owned(raw: Any, checked: Any) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file open as ``raw``, each read into memory of its own.

    ``checked`` is the same file opened by safetensors, which has validated its header; the
    header is read again here from ``raw`` (the file may have changed in between) and every
    tensor's size is checked against its byte range before reading.
    """
    (size,) = struct.unpack("<Q", raw.read(8))
    file_size = os.fstat(raw.fileno()).st_size
    if 8 + size > file_size:
        raise ValueError("the header ends past the end of the file")
    header = json.loads(raw.read(size))
    start = 8 + size
    tensors = {}
    for key in checked.keys():  # noqa: SIM118 (safe_open has no __iter__)
        info = header[key]
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None or sys.byteorder != "little":
            tensors[key] = checked.get_tensor(key).clone()  # a dtype torch names differently: copy off the map
            continue
        shape = [int(n) for n in info["shape"]]
        begin, end = (int(n) for n in info["data_offsets"])
        nbytes = math.prod(shape) * dtype.itemsize
        if min(shape, default=0) < 0 or nbytes != end - begin or start + end > file_size:
            raise ValueError(f"tensor {key!r}: its shape and dtype do not match its byte range in the file")
        tensor = torch.empty(shape, dtype=dtype)
        if nbytes:
            raw.seek(start + begin)
            if raw.readinto((ctypes.c_char * nbytes).from_address(tensor.data_ptr())) != nbytes:
                raise ValueError(f"tensor {key!r} ends past the end of the file")
        tensors[key] = tensor
    return tensors


def nonfinite(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The keys of floating-point tensors holding NaN or an infinity.

    A sum answers for most tensors (finite sum, finite values); only a tensor whose sum is
    not finite (a NaN or an infinity, or an overflow) is checked element by element. CPU
    tensors are summed by numpy where it can: in buffered pieces, on this thread, without
    starting torch's thread pool (whose memory would show in the load's peak).
    """
    found = []
    for key, tensor in tensors.items():
        if not (tensor.is_floating_point() or tensor.is_complex()) or tensor.is_meta or tensor.numel() == 0:
            continue
        if not tensor.is_complex() and _finite_sum(tensor):
            continue
        if not bool(torch.isfinite(tensor).all()):
            found.append(key)
    return found


def _finite_sum(tensor: torch.Tensor) -> bool:
    try:
        if numpy is not None and tensor.device.type == "cpu" and tensor.dtype in _NUMPY_FLOATS:
            values = tensor.reshape(-1).numpy()
            # float32 accumulation (half-precision values would overflow their own type's sum)
            return bool(numpy.isfinite(numpy.add.reduce(values, dtype=numpy.float32 if values.itemsize < 4 else None)))
        return bool(torch.isfinite(tensor.sum(dtype=torch.float64)))
    except (RuntimeError, TypeError):  # a dtype without a float64 sum (float8 on some devices)
        return False


def strip_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop peft's ``base_model.model.`` key prefix where present."""
    return {key.removeprefix(PEFT_PREFIX): value for key, value in state_dict.items()}


def holds_adapter(directory: Path) -> bool:
    """Whether ``directory`` already holds adapter files."""
    return any((directory / name).exists() for name in (CONFIG_NAME, WEIGHTS_NAME, PICKLE_WEIGHTS_NAME))


@contextlib.contextmanager
def saving(directory: Path) -> Iterator[None]:
    """Turn an ``OSError`` (or safetensors' own I/O error) inside the block into a :class:`SaveError` naming ``directory``."""
    try:
        yield
    except (OSError, SafetensorError) as exc:
        if isinstance(exc, AdapterkitError):
            raise
        code = exc.errno if isinstance(exc, OSError) else _errno_in(str(exc))
        reason = os.strerror(code) if code else f"the weights file could not be written ({exc})"
        fix = _SAVE_FIXES.get(errno.errorcode.get(code or -1, ""), "check the path and its permissions, or save elsewhere")
        error = SaveError(f"cannot save the adapter to {str(directory)!r}: {reason}; {fix}")
        error.errno, error.strerror, error.filename = code, reason, str(directory)
        raise error from exc


_SAVE_FIXES = {
    "ENOSPC": "free some disk space or save elsewhere",
    "EDQUOT": "free some disk space (quota exceeded) or save elsewhere",
    "EFBIG": "the file is larger than allowed here (a file-size limit); save elsewhere or raise the limit",
    "EACCES": "the folder is not writable for this user; fix its permissions or save elsewhere",
    "EPERM": "the folder is not writable for this user; fix its permissions or save elsewhere",
    "EROFS": "the file system is read-only; save elsewhere",
    "ENAMETOOLONG": "use a shorter folder name",
}


def _errno_in(message: str) -> int | None:
    """The errno in an error of safetensors' Rust side ("... (os error 28)"), if any."""
    found = re.search(r"os error (\d+)", message)
    return int(found[1]) if found else None


def _unshared(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors, each with storage of its own: as peft's ``save_pretrained``, a tensor whose
    storage an earlier one already uses (one tensor under two keys, views of one tensor) is cloned."""
    out, seen = {}, set()
    for key, value in tensors.items():
        tensor = value.detach().contiguous()
        if tensor.numel() and not tensor.is_meta:
            storage = (tensor.device, tensor.untyped_storage().data_ptr())
            if storage in seen:
                tensor = tensor.clone()
            else:
                seen.add(storage)
        out[key] = tensor
    return out


def _fresh_folder(parent: Path, prefix: str) -> Path:
    """A new, empty, hidden folder in ``parent``; its mode follows the umask (0755 under the usual 022)."""
    while True:
        path = parent / f"{prefix}{uuid.uuid4().hex[:12]}"
        try:
            path.mkdir(0o777)  # the kernel applies the umask
        except FileExistsError:
            continue
        return path


def write_adapter(directory: Path, *, config: dict[str, Any], tensors: Mapping[str, torch.Tensor], method: Any) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``directory``, crash-safely.

    Both files are written in a temporary folder first. A new folder is then
    renamed into place in one step (the temporary folder sits next to it). An
    existing folder (whose overwriting the caller has allowed) gets the
    temporary folder inside it, so only the folder itself must be writable, and
    is updated in an order that never shows a mix: the old config goes first,
    then the new weights and the new config arrive, so a crash midway leaves a
    folder with no config, which does not load, never one that loads as the
    wrong adapter. Folders and files get the modes the umask gives.

    Failures to write (disk full, read-only, no permission) raise :class:`SaveError`
    naming ``directory``; the temporary folder is removed.
    """
    metadata = {"format": "pt", METHOD_KEY: method.name}
    if method.distribution:
        metadata[DISTRIBUTION_KEY] = method.distribution
    with saving(directory):
        exists = directory.is_dir()
        if not exists:
            directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = _fresh_folder(directory if exists else directory.parent, f".{directory.name}.adapterkit-")
        try:
            save_file(_unshared(tensors), tmp / WEIGHTS_NAME, metadata=metadata)
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
            # safetensors creates its file 0600 whatever the umask; give it the mode the umask gave the config.
            os.chmod(tmp / WEIGHTS_NAME, stat.S_IMODE((tmp / CONFIG_NAME).stat().st_mode))
            for path in (tmp / WEIGHTS_NAME, tmp / CONFIG_NAME):
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
            if not exists:
                os.rename(tmp, directory)
                return
            (directory / CONFIG_NAME).unlink(missing_ok=True)
            (directory / PICKLE_WEIGHTS_NAME).unlink(missing_ok=True)
            os.replace(tmp / WEIGHTS_NAME, directory / WEIGHTS_NAME)
            os.replace(tmp / CONFIG_NAME, directory / CONFIG_NAME)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
