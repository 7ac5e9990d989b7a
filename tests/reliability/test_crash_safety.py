"""Saves are crash-safe: a save killed midway never leaves a folder that loads as a wrong adapter.

A driver subprocess (a fresh interpreter, started once for the module) builds
models holding the adapter versions and, for each attempt, puts the *old*
adapter's folder in place (or no folder) and forks a child that saves a *new*
adapter there with ``overwrite=True``. The child is killed

* deterministically: a trace function ends it with ``os._exit`` (no cleanup, no
  ``finally``: what ``SIGKILL`` does) just before the k-th line of
  ``Adapters.save`` / ``files.write_adapter`` runs, for every k until the save
  completes, so between every two steps of the save;
* at random moments: ``SIGKILL`` after a random delay within the time a save
  takes, so also in the middle of writing a file.

Every folder left behind must then hold complete files of a single version,
and load as the old adapter, as the new one, or fail with a
``CheckpointError``; never as a mix. Versions are told apart by their tensors,
their config and the outputs of a model that loads them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import SafetensorError, safe_open

import adapterkit
from adapterkit import CheckpointError, CheckpointExistsError

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PICKLE = "adapter_model.bin"

# Shared by this module and the driver: the base model and the adapter versions.
SHARED = textwrap.dedent(
    """
    import torch
    import adapterkit

    WIDTH, DEPTH = 1024, 4
    SPECS = {
        # Same layers and shapes: a mix of old and new files would load without complaint.
        "old": "lora[r=128, lora_alpha=16, target_modules=['0', '1', '2', '3'], init_lora_weights=False]",
        "new": "lora[r=128, lora_alpha=32, target_modules=['0', '1', '2', '3'], init_lora_weights=False]",
        # Other shapes and layers: a mix would fail on shapes.
        "new-shape": "lora[r=192, target_modules=['1', '3'], init_lora_weights=False]",
    }
    SEEDS = {"old": 1, "new": 2, "new-shape": 3}

    def base_model():
        torch.manual_seed(0)
        return torch.nn.Sequential(*(torch.nn.Linear(WIDTH, WIDTH) for _ in range(DEPTH))).eval()

    def with_adapter(version):
        model = base_model()
        torch.manual_seed(SEEDS[version])
        adapterkit.attach(model).add(SPECS[version])
        return model
    """
)
_shared: dict[str, Any] = {}
exec(SHARED, _shared)  # noqa: S102 - our own code, shared with the driver below
base_model, with_adapter, SPECS = _shared["base_model"], _shared["with_adapter"], _shared["SPECS"]
INPUT = torch.randn(3, _shared["WIDTH"], generator=torch.Generator().manual_seed(5))

DRIVER = SHARED + textwrap.dedent(
    """
    import json, os, random, shutil, signal, sys, time
    from pathlib import Path
    from adapterkit import files, model as model_module

    torch.set_num_threads(1)
    KILLED = 86
    scenarios = json.loads(sys.argv[1])
    handles = {}

    def adapters_of(version):
        if version not in handles:
            handles[version] = adapterkit.attach(with_adapter(version))
        return handles[version]

    def prepare(work, old, i):
        target = work / f"attempt-{i}" / "adapter"
        if old is None:
            target.parent.mkdir(parents=True)
        else:
            shutil.copytree(old, target)
        return target

    def kill_before_line(k):
        codes = {files.write_adapter.__code__, model_module.Adapters.save.__code__}
        seen = 0
        def local(frame, event, arg):
            nonlocal seen
            if event == "line":
                seen += 1
                if seen == k:
                    os._exit(KILLED)
            return local
        def tracer(frame, event, arg):
            return local if frame.f_code in codes else None
        sys.settrace(tracer)

    def fork_save(adapters, target, k=None, ready=None):
        pid = os.fork()
        if pid:
            return pid
        try:
            if ready is not None:
                os.write(ready, b"x")  # about to save: the parent's clock starts now
            if k is not None:
                kill_before_line(k)
            adapters.save(target, overwrite=True)
        except BaseException as exc:
            sys.stderr.write(f"save failed: {exc!r}\\n")
            os._exit(1)
        os._exit(0)

    def wait(pid):
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    out = {}
    for sc in scenarios:
        work, old = Path(sc["work"]), (Path(sc["old"]) if sc["old"] else None)
        adapters = adapters_of(sc["version"])
        results = []
        if sc["mode"] == "steps":
            for k in range(1, sc["attempts"] + 1):
                target = prepare(work, old, k)
                code = wait(fork_save(adapters, target, k=k))
                results.append({"folder": str(target), "killed": code == KILLED, "code": code, "at": k})
                if code != KILLED:
                    break
        else:
            durations = []
            for i in range(3):
                target = work / f"timing-{i}" / "adapter"
                start = time.perf_counter()
                adapters.save(target, overwrite=True)
                durations.append(time.perf_counter() - start)
                shutil.rmtree(target.parent)
            span = sorted(durations)[1] * 1.2
            rng = random.Random(sc["seed"])
            for i in range(sc["attempts"]):
                target = prepare(work, old, i)
                # Half the kills anywhere in the save, half near its end, where the files are renamed into place.
                delay = rng.uniform(0, span) if i % 2 else rng.uniform(0.6 * span, 1.1 * span)
                read, write = os.pipe()
                pid = fork_save(adapters, target, ready=write)
                os.read(read, 1)
                time.sleep(delay)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                code = wait(pid)
                os.close(read); os.close(write)
                results.append({"folder": str(target), "killed": code == -signal.SIGKILL, "code": code, "at": delay})
            results.append({"span": span})
        out[sc["id"]] = results
    print(json.dumps(out))
    """
)


def outputs(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT)


def read_weights(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]] | None:
    """A safetensors file's metadata and tensors; None if it is not a complete, readable file."""
    try:
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError):
        return None


class Version:
    """One adapter version: its saved files, its tensors and the outputs of a model running it."""

    def __init__(self, name: str, folder: Path) -> None:
        model = with_adapter(name)
        adapterkit.attach(model).save(folder)
        self.name = name
        self.folder = folder
        self.config = (folder / CONFIG).read_bytes()  # JSON with sorted keys: the same bytes in every process
        self.weights = read_weights(folder / WEIGHTS)
        self.state = {k: v.clone() for k, v in adapterkit.attach(model).state_dict().items()}
        self.outputs = outputs(model)

    def same_file(self, name: str, path: Path) -> bool:
        """Whether ``path`` holds this version's file ``name`` (weights by content: the safetensors
        header's metadata order differs between processes)."""
        if name == CONFIG:
            return path.read_bytes() == self.config
        found = read_weights(path)
        if found is None:
            return False
        metadata, tensors = found
        return (
            metadata == self.weights[0]
            and tensors.keys() == self.weights[1].keys()
            and all(torch.equal(tensors[k], self.weights[1][k]) for k in tensors)
        )

    def copy_to(self, folder: Path) -> Path:
        folder.mkdir(parents=True)
        for name in (CONFIG, WEIGHTS):
            (folder / name).write_bytes((self.folder / name).read_bytes())
        return folder


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Version]:
    root = tmp_path_factory.mktemp("versions")
    found = {name: Version(name, root / name) for name in SPECS}
    assert (found["old"].outputs - found["new"].outputs).abs().max() > 1e-3, "old and new must differ"
    # Big enough that a save takes a while, so that random kills land inside it.
    assert (root / "new" / WEIGHTS).stat().st_size > 4_000_000
    return found


SCENARIOS = {
    # id: (mode, new version, old folder present, attempts, seed)
    "steps-over-old": ("steps", "new", True, 300, 0),
    "steps-over-old-other-shape": ("steps", "new-shape", True, 300, 0),
    "steps-into-new-folder": ("steps", "new", False, 300, 0),
    "random-1": ("random", "new", True, 10, 1),
    "random-2": ("random", "new", True, 10, 2),
}


@pytest.fixture(scope="module")
def killed_saves(versions: dict[str, Version], tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    """Run every scenario in one driver subprocess; return each scenario's attempts."""
    root = tmp_path_factory.mktemp("killed")
    scenarios = []
    for id_, (mode, version, with_old, attempts, seed) in SCENARIOS.items():
        old = str(versions["old"].copy_to(root / "sources" / id_)) if with_old else None
        work = root / id_
        work.mkdir()
        scenarios.append(
            {
                "id": id_,
                "mode": mode,
                "version": version,
                "old": old,
                "work": str(work),
                "attempts": attempts,
                "seed": seed,
            }
        )
    driver = root / "driver.py"
    driver.write_text(DRIVER)
    done = subprocess.run(
        [sys.executable, str(driver), json.dumps(scenarios)],
        capture_output=True,
        text=True,
        timeout=420,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def outcome(folder: Path, versions: dict[str, Version], candidates: tuple[str, ...]) -> str:
    """What a folder holds: one of ``candidates`` or "unloadable"; fails on a torn file, a mix, a wrong adapter."""
    for entry in folder.parent.iterdir():
        # Besides the folder, only the save's hidden temporary folder may be left behind by a kill (into a new folder).
        leftover = entry.is_dir() and re.fullmatch(rf"\.{re.escape(folder.name)}\.adapterkit-\w+", entry.name)
        assert entry == folder or leftover, entry
    if folder.exists():
        # Saving over an existing folder writes its temporary folder inside it (only the folder need be writable).
        temporary = re.compile(rf"\.{re.escape(folder.name)}\.adapterkit-\w+")
        present = sorted(p.name for p in folder.iterdir() if not (p.is_dir() and temporary.fullmatch(p.name)))
        assert set(present) <= {CONFIG, WEIGHTS}, f"unexpected files {present}"
        # File by file: the complete file of one version (nothing torn), and all files of the same version.
        sources = []
        for name in present:
            matches = {v for v in candidates if versions[v].same_file(name, folder / name)}
            assert matches, f"{folder / name} is no version's {name}: a torn or foreign file"
            sources.append(matches)
        assert not sources or set.intersection(*sources), f"{folder} mixes files of {sources}"
    model = base_model()
    adapters = adapterkit.attach(model)
    try:
        adapters.load(folder)
    except CheckpointError:
        assert adapters.names == [] and torch.equal(outputs(model), outputs(base_model()))
        return "unloadable"
    state = adapters.state_dict()
    for name in candidates:
        expected = versions[name].state
        if state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected):
            assert torch.equal(outputs(model), versions[name].outputs), "the right tensors with the wrong config"
            return name
    raise AssertionError(f"{folder} loads as an adapter that is neither {' nor '.join(candidates)}")


@pytest.mark.parametrize("scenario", ["steps-over-old", "steps-over-old-other-shape"])
def test_save_over_an_adapter_killed_between_any_two_steps(
    killed_saves: dict[str, list[dict]], versions: dict[str, Version], scenario: str
) -> None:
    new = SCENARIOS[scenario][1]
    attempts = killed_saves[scenario]

    assert attempts[-1]["code"] == 0, "left alone, the save completes"
    assert all(a["killed"] for a in attempts[:-1]), attempts
    assert len(attempts) > 10, "the save has more than a few steps to interrupt"
    seen = [outcome(Path(a["folder"]), versions, ("old", new)) for a in attempts]

    assert seen[0] == "old", "killed before it started, the old adapter is intact"
    assert seen[-1] == new
    # A save moves through old ... (unloadable) ... new, and never back.
    rank = {"old": 0, "unloadable": 1, new: 2}
    assert [rank[s] for s in seen] == sorted(rank[s] for s in seen), seen


def test_save_into_a_new_folder_killed_between_any_two_steps(
    killed_saves: dict[str, list[dict]], versions: dict[str, Version]
) -> None:
    attempts = killed_saves["steps-into-new-folder"]

    assert attempts[-1]["code"] == 0 and len(attempts) > 10
    seen = []
    for attempt in attempts:
        folder = Path(attempt["folder"])
        state = outcome(folder, versions, ("new",))
        if state == "unloadable":
            assert not folder.exists(), "a new folder appears only complete (renamed into place in one step)"
        seen.append(state)
    assert seen[0] == "unloadable" and seen[-1] == "new"
    assert seen == sorted(seen, key=["unloadable", "new"].index)


@pytest.mark.parametrize("scenario", ["random-1", "random-2"])
def test_save_killed_at_random_moments(
    killed_saves: dict[str, list[dict]], versions: dict[str, Version], scenario: str
) -> None:
    *attempts, timing = killed_saves[scenario]

    assert timing["span"] > 0
    seen = [outcome(Path(a["folder"]), versions, ("old", "new")) for a in attempts]
    assert set(seen) <= {"old", "new", "unloadable"}
    assert any(a["killed"] for a in attempts), "at least one save was killed midway"


# -- overwriting is opt-in ------------------------------------------------------------------------
def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_existing_adapter_is_not_overwritten_unless_asked(versions: dict[str, Version], tmp_path: Path) -> None:
    target = versions["old"].copy_to(tmp_path / "adapter")
    before = folder_bytes(target)
    adapters = adapterkit.attach(with_adapter("new"))

    with pytest.raises(CheckpointExistsError, match=r"overwrite=True") as info:
        adapters.save(target)
    assert str(target) in str(info.value)
    assert folder_bytes(target) == before
    assert [p.name for p in tmp_path.iterdir()] == [target.name], "no temporary folder left behind"

    adapters.save(target, overwrite=True)
    assert outcome(target, versions, ("old", "new")) == "new"


def test_a_refused_save_of_several_adapters_writes_none(tmp_path: Path) -> None:
    adapters = adapterkit.attach(with_adapter("new"))
    adapters.add(SPECS["new-shape"], "second")
    target = tmp_path / "out"
    adapters.save(target, "second")
    before = folder_bytes(target)

    with pytest.raises(CheckpointExistsError, match=r"second"):
        adapters.save(target)  # "default" goes to out/ itself (free), "second" to out/second (taken)
    assert folder_bytes(target) == before, "nothing written, not even the adapter whose folder was free"


def test_overwrite_replaces_an_old_pickle_checkpoint(versions: dict[str, Version], tmp_path: Path) -> None:
    target = tmp_path / "adapter"
    target.mkdir()
    (target / CONFIG).write_bytes(versions["old"].config)
    torch.save(versions["old"].state, target / PICKLE)

    with pytest.raises(CheckpointExistsError):
        adapterkit.attach(with_adapter("new")).save(target)  # a pickle checkpoint is an adapter too
    adapterkit.attach(with_adapter("new")).save(target, overwrite=True)

    assert sorted(p.name for p in target.iterdir()) == [CONFIG, WEIGHTS], "the stale pickle is gone"
    assert outcome(target, versions, ("old", "new")) == "new"


def test_a_save_that_fails_while_writing_keeps_the_old_adapter(
    versions: dict[str, Version], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk: the weights cannot be written. The old adapter stays, the temporary folder goes."""
    from adapterkit import files

    target = versions["old"].copy_to(tmp_path / "adapter")
    real_save_file = files.save_file

    def disk_full(tensors: dict, path: Any, metadata: dict | None = None) -> None:
        real_save_file(tensors, path, metadata=metadata)
        Path(path).write_bytes(Path(path).read_bytes()[:1000])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        adapterkit.attach(with_adapter("new")).save(target, overwrite=True)

    assert outcome(target, versions, ("old", "new")) == "old"
    assert [p.name for p in tmp_path.iterdir()] == [target.name], "the temporary folder was removed"
