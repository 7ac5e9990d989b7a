"""Files: a loaded adapter owns its memory, NaN/Inf weights are refused, every save failure is a typed OSError.

* After ``load`` returns, the weights file can be overwritten (``cp`` of another
  version), truncated or deleted: the model computes exactly what it did, and
  does not crash (a tensor still mapped to the file would change, or die of
  ``SIGBUS``). Run in a subprocess, so that a regression kills only that.
* Weights holding NaN or an infinity are refused with a ``CheckpointError``
  naming the tensor and ``allow_nonfinite=True``; with it they load.
* Saves that cannot write (a read-only folder, a parent without permission, a
  file-size limit standing in for a full disk, via ``RLIMIT_FSIZE``) raise
  ``SaveError``, an ``AdapterkitError`` and an ``OSError`` with the errno, whose
  message names the folder asked for and never a temporary one; the old adapter
  stays and no temporary folder is left. A writable folder under a read-only
  parent can be saved into. Folders and files get the modes the umask gives
  (0755/0644 under 022, as peft). These run in one subprocess, which sets its
  own umask and limits (and, run as root, first gives up the capabilities that
  let root ignore file permissions).
* Every adapter name the core accepts is a folder name: any text hypothesis
  finds either is refused with ``AdapterNameError`` or saves and loads back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import adapterkit
import pytest
import torch
from adapterkit import AdapterkitError, CheckpointError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from shared_test_helpers import make_mlp, mlp_input, run

WEIGHTS = "adapter_model.safetensors"
SPEC = "lora[r=4, target_modules=['embed', 'head'], init_lora_weights=False]"


# Root ignores file permissions (CAP_DAC_OVERRIDE); a subprocess run as root gives up those capabilities
# first, so that a read-only folder is read-only for it too. (Dropping to another user would lose access
# to an interpreter installed under root's home.)
_AS_UNPRIVILEGED = """
import ctypes, os
if os.geteuid() == 0:
    class _Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
    class _Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]
    _libc, _header, _data = ctypes.CDLL(None, use_errno=True), _Header(0x20080522, 0), (_Data * 2)()
    if _libc.capget(ctypes.byref(_header), _data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    _keep = ~((1 << 1) | (1 << 2) | (1 << 3)) & 0xFFFFFFFF  # drop CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
    for _field in ("effective", "permitted", "inheritable"):
        setattr(_data[0], _field, getattr(_data[0], _field) & _keep)
    if _libc.capset(ctypes.byref(_header), _data) != 0:
        raise OSError(ctypes.get_errno(), "capset")
"""


def run_script(code: str, *, unprivileged: bool = False) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line last, returned here."""
    prelude = _AS_UNPRIVILEGED if unprivileged else ""
    done = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- loaded adapters own their memory ---------------------------------------------------------
OWNED = """
    import json, os, shutil, sys, tempfile
    from pathlib import Path
    import torch, adapterkit

    def base():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64)).eval()

    root = Path(tempfile.mkdtemp())
    spec = "lora[r=8, target_modules=['0', '2'], init_lora_weights=False]"
    for seed, name in ((1, "v1"), (2, "v2")):
        model = base()
        torch.manual_seed(seed)
        adapterkit.attach(model).add(spec)
        adapterkit.attach(model).save(root / name)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(3))
    model = base()
    adapterkit.attach(model).load(root / "v1")
    with torch.no_grad():
        before = model(x)
        weights = root / "v1" / "adapter_model.safetensors"
        results = {}
        shutil.copyfile(root / "v2" / "adapter_model.safetensors", weights)  # what cp does: same file, new bytes
        results["cp of another version"] = torch.equal(model(x), before)
        with open(weights, "r+b") as f:
            f.truncate(64)
        results["truncated"] = torch.equal(model(x), before)
        weights.unlink()
        results["deleted"] = torch.equal(model(x), before)
    print(json.dumps(results))
"""


def test_a_loaded_adapter_is_immune_to_its_file_changing() -> None:
    results = run_script(OWNED)
    assert results == {"cp of another version": True, "truncated": True, "deleted": True}


def test_loaded_tensors_are_not_mapped_from_the_file(tmp_path: Path) -> None:
    """In this process too: the file's bytes change under the loaded parameters, which do not."""
    model = make_mlp()
    torch.manual_seed(1)
    adapterkit.attach(model).add(SPEC)
    adapterkit.attach(model).save(tmp_path)
    loaded = make_mlp()
    adapterkit.attach(loaded).load(tmp_path)
    state = {k: v.clone() for k, v in adapterkit.attach(loaded).state_dict().items()}
    data = (tmp_path / WEIGHTS).read_bytes()
    start = 8 + int.from_bytes(data[:8], "little")  # the tensors' bytes follow the header
    with open(tmp_path / WEIGHTS, "r+b") as f:  # overwritten in place: a memory map would see it
        f.seek(start)
        f.write(b"\x00" * (len(data) - start))
    now = adapterkit.attach(loaded).state_dict()
    assert all(torch.equal(now[k], state[k]) for k in state)


# -- NaN and infinities -----------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_weights_load_only_when_allowed(tmp_path: Path, bad: float) -> None:
    source = make_mlp()
    torch.manual_seed(1)
    adapterkit.attach(source).add(SPEC)
    adapterkit.attach(source).save(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS)
    key = "base_model.model.head.lora_B.weight"
    tensors[key][1, 2] = bad
    save_file(tensors, tmp_path / WEIGHTS)

    model, x = make_mlp(), mlp_input()
    adapters = adapterkit.attach(model)
    expected = run(model, x)
    with pytest.raises(
        CheckpointError, match=rf"1 weight tensor\(s\) hold NaN or infinite values \({key}\).*allow_nonfinite=True"
    ):
        adapters.load(tmp_path)
    assert adapters.names == [] and torch.equal(run(model, x), expected)
    with pytest.raises(CheckpointError, match="allow_nonfinite=True"):  # a state dict is checked the same way
        adapters.load(tmp_path, state_dict=tensors)

    adapters.load(tmp_path, allow_nonfinite=True)
    assert not torch.isfinite(run(model, x)).all()  # loaded as asked: the outputs show it


# -- saves that cannot write ------------------------------------------------------------------------------
SAVES = """
    import errno, json, os, resource, signal, stat, tempfile
    from pathlib import Path
    import torch, adapterkit
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
    adapters = adapterkit.attach(model)
    adapters.add("lora[r=16, target_modules=['0', '1'], init_lora_weights=False]", "new")
    adapters.add("lora[r=16, lora_alpha=4, target_modules=['0', '1'], init_lora_weights=False]", "old")
    root = Path(tempfile.mkdtemp())
    results = {}

    def holds(folder, name):
        found = load_file(folder / "adapter_model.safetensors")
        mine = adapters.state_dict(name)
        return found.keys() == mine.keys() and all(torch.equal(found[k], mine[k]) for k in mine)

    def old_in(parent):
        \"\"\"parent/new holds the files of adapter "old" (saving "new" there replaces them).\"\"\"
        parent.mkdir()
        adapters.save(parent / "staging", "old")
        os.rename(parent / "staging" / "old", parent / "new")
        os.rmdir(parent / "staging")

    def attempt(label, parent, act):
        try:
            act()
            outcome = {"error": None}
        except Exception as exc:
            outcome = {
                "error": type(exc).__name__,
                "adapterkit": isinstance(exc, adapterkit.AdapterkitError),
                "oserror": isinstance(exc, OSError),
                "errno": errno.errorcode.get(getattr(exc, "errno", None)),
                "message": str(exc),
                "cause": type(exc.__cause__).__name__,
            }
        outcome["folder"] = str(parent / "new")
        outcome["left"] = sorted(str(p.relative_to(parent)) for p in parent.rglob("*"))
        if (parent / "new" / "adapter_model.safetensors").exists():
            outcome["holds"] = [name for name in ("old", "new") if holds(parent / "new", name)]
        results[label] = outcome

    # A read-only folder holding an adapter.
    parent = root / "read-only-folder"
    old_in(parent)
    os.chmod(parent / "new", 0o555)
    attempt("read-only folder", parent, lambda: adapters.save(parent, "new", overwrite=True))

    # A new folder in a parent without write permission.
    parent = root / "read-only-parent"
    parent.mkdir()
    os.chmod(parent, 0o555)
    attempt("new folder in a read-only parent", parent, lambda: adapters.save(parent, "new"))

    # Writable folders under a read-only parent: an empty one, and one holding an adapter.
    parent = root / "empty-under-read-only"
    (parent / "new").mkdir(parents=True)
    os.chmod(parent, 0o555)
    attempt("writable empty folder under a read-only parent", parent, lambda: adapters.save(parent, "new"))
    parent = root / "adapter-under-read-only"
    old_in(parent)
    os.chmod(parent, 0o555)
    attempt("writable folder under a read-only parent", parent, lambda: adapters.save(parent, "new", overwrite=True))

    # Modes follow the umask.
    for mask in (0o022, 0o077):
        os.umask(mask)
        folder = root / f"umask-{mask:03o}" / "new"
        adapters.save(folder.parent, "new")
        results[f"modes under umask {mask:03o}"] = [
            oct(stat.S_IMODE((folder / name).stat().st_mode))
            for name in (".", "adapter_config.json", "adapter_model.safetensors")
        ]
    os.umask(0o022)

    # A full disk, as a file-size limit (the adapter's weights are 64 KiB): over an old adapter, and into a new folder.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing the process
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    parent = root / "full-over-old"
    old_in(parent)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, hard))
    attempt("disk full over an old adapter", parent, lambda: adapters.save(parent, "new", overwrite=True))
    parent = root / "full-new"
    parent.mkdir()
    attempt("disk full into a new folder", parent, lambda: adapters.save(parent, "new"))
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def saves() -> dict:
    """Every save scenario, run once in one unprivileged subprocess."""
    return run_script(SAVES, unprivileged=True)


@pytest.mark.parametrize(
    ("scenario", "code", "left", "holds"),
    [
        ("read-only folder", "EACCES", ["new", "new/adapter_config.json", "new/adapter_model.safetensors"], ["old"]),
        ("new folder in a read-only parent", "EACCES", [], None),
        (
            "disk full over an old adapter",
            "EFBIG",
            ["new", "new/adapter_config.json", "new/adapter_model.safetensors"],
            ["old"],
        ),
        ("disk full into a new folder", "EFBIG", [], None),
    ],
)
def test_a_failed_save_is_a_save_error_naming_the_folder(
    saves: dict, scenario: str, code: str, left: list[str], holds: list[str] | None
) -> None:
    outcome = saves[scenario]
    assert outcome["error"] == "SaveError" and outcome["adapterkit"] and outcome["oserror"], outcome
    assert outcome["errno"] == code
    assert outcome["cause"] in ("PermissionError", "OSError", "SafetensorError")
    message = outcome["message"]
    assert f"'{outcome['folder']}'" in message, "the message must name the folder asked for"
    assert "adapterkit-" not in message, "the message names a temporary folder"
    assert outcome["left"] == left, "the temporary folder (or a part of the save) was left behind"
    assert outcome.get("holds") == holds, "the old adapter was damaged"


def test_save_errors_are_adapterkit_errors_and_oserrors() -> None:
    assert issubclass(adapterkit.SaveError, AdapterkitError) and issubclass(adapterkit.SaveError, OSError)


@pytest.mark.parametrize(
    "scenario", ["writable empty folder under a read-only parent", "writable folder under a read-only parent"]
)
def test_a_writable_folder_under_a_read_only_parent_can_be_saved_into(saves: dict, scenario: str) -> None:
    outcome = saves[scenario]
    assert outcome["error"] is None, outcome
    assert outcome["left"] == ["new", "new/adapter_config.json", "new/adapter_model.safetensors"]
    assert outcome["holds"] == ["new"]


def test_saved_folders_and_files_follow_the_umask(saves: dict) -> None:
    assert saves["modes under umask 022"] == ["0o755", "0o644", "0o644"]  # what peft's save_pretrained gives
    assert saves["modes under umask 077"] == ["0o700", "0o600", "0o600"]


# -- adapter names are folder names -------------------------------------------------------------------------
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(name=st.text(min_size=1, max_size=70) | st.sampled_from(["é" * 64, "x" * 128, "-rf", "con", "a\udcff", "ø💡"]))
def test_every_name_the_core_accepts_saves_and_loads_as_a_folder(
    tmp_path_factory: pytest.TempPathFactory, name: str
) -> None:
    """check_name refuses what cannot be a folder name; whatever it accepts round-trips through save and load."""
    try:
        adapterkit.model.check_name(name)
    except adapterkit.AdapterNameError:
        return
    root = tmp_path_factory.mktemp("names")
    model, x = make_mlp(), mlp_input()
    torch.manual_seed(1)
    adapters = adapterkit.attach(model)
    adapters.add(SPEC, name)
    adapters.save(root, name)
    folder = root if name == "default" else root / name
    assert (folder / WEIGHTS).is_file() and [p.name for p in root.iterdir() if p.name.startswith(".")] == []
    other = make_mlp()
    adapterkit.attach(other).load(folder, name)
    assert adapterkit.attach(other).names == [name]
    assert torch.equal(run(other, x), run(model, x))
