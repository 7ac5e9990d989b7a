"""peft-format adapter files: finding them (local folder or Hub), reading, writing.

A saved adapter is a folder with ``adapter_config.json`` and
``adapter_model.safetensors`` whose keys carry peft's ``base_model.model.``
prefix. adapterkit also records the method that wrote the file in the
safetensors metadata (``adapterkit_method``), which peft ignores: a plugin whose
config subclasses another method's (a LoRA variant saving ``peft_type: LORA``)
gets its own checkpoints back.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import attrs
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import CheckpointError, CheckpointNotFoundError, HubAccessError, UnsafeCheckpointError

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "PICKLE_WEIGHTS_NAME", "PEFT_PREFIX", "resolve", "read_config", "read_weights", "write_adapter"]

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


def read_config(path: Path | None) -> dict[str, Any]:
    """Read ``adapter_config.json``."""
    assert path is not None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {str(path)!r}: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{str(path)!r} does not hold a JSON object")
    return data


def read_weights(weights: Weights | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read the tensors of a weights file and its metadata (``METHOD_KEY`` names the method that wrote it)."""
    assert weights is not None
    if weights.pickle:
        try:
            return torch.load(weights.path, map_location="cpu", weights_only=True), {}
        except Exception as exc:
            raise CheckpointError(f"cannot read {str(weights.path)!r}: {exc}") from None
    try:
        with safe_open(weights.path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{str(weights.path)!r} is not a readable safetensors file ({exc}); it may be truncated or corrupt"
        ) from None
    return tensors, dict(metadata)


def strip_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop peft's ``base_model.model.`` key prefix where present."""
    return {key.removeprefix(PEFT_PREFIX): value for key, value in state_dict.items()}


def holds_adapter(directory: Path) -> bool:
    """Whether ``directory`` already holds adapter files."""
    return any((directory / name).exists() for name in (CONFIG_NAME, WEIGHTS_NAME, PICKLE_WEIGHTS_NAME))


def write_adapter(directory: Path, *, config: dict[str, Any], tensors: Mapping[str, torch.Tensor], method: Any) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``directory``, crash-safely.

    Both files are written in a temporary folder first. A new folder is then
    renamed into place in one step. An existing folder (whose overwriting the
    caller has allowed) is updated in an order that never shows a mix: the old
    config goes first, then the new weights and the new config arrive, so a
    crash midway leaves a folder with no config, which does not load, never one
    that loads as the wrong adapter.
    """
    metadata = {"format": "pt", METHOD_KEY: method.name}
    if method.distribution:
        metadata[DISTRIBUTION_KEY] = method.distribution
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.adapterkit-", dir=directory.parent))
    try:
        contiguous = {key: value.detach().contiguous() for key, value in tensors.items()}
        save_file(contiguous, tmp / WEIGHTS_NAME, metadata=metadata)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
        for path in (tmp / WEIGHTS_NAME, tmp / CONFIG_NAME):
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        if not directory.exists():
            os.rename(tmp, directory)
            return
        (directory / CONFIG_NAME).unlink(missing_ok=True)
        (directory / PICKLE_WEIGHTS_NAME).unlink(missing_ok=True)
        os.replace(tmp / WEIGHTS_NAME, directory / WEIGHTS_NAME)
        os.replace(tmp / CONFIG_NAME, directory / CONFIG_NAME)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
