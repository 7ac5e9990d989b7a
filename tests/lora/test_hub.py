"""``Adapters.load(repo_id, ...)``: adapters from the Hugging Face Hub, over real HTTP.

huggingface_hub talks to :class:`hub_server.FakeHub`, a small Hub on 127.0.0.1, and to a
fresh cache folder per test; nothing reaches the internet. Each adapter is checked by
comparing the loaded model's outputs with those of the model that saved the adapter.
"""

from __future__ import annotations

import shutil
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import adapterkit
from hub_server import FakeHub, Request, serving_as_the_hub

REPO = "user/adapter"
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PICKLE = "adapter_model.bin"
TOKEN = "hf_TestTokenThatGrantsAccess0123456789"
OTHER_USERS_TOKEN = "hf_TestTokenOfSomeoneElse0123456789"
UNKNOWN_TOKEN = "hf_TestTokenTheHubNeverIssued012345"

LLAMA = LlamaConfig(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, vocab_size=64
)
LORA = 'lora[r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False]'
OTHER_LORA = 'lora[r=8, target_modules=["k_proj", "o_proj"], init_lora_weights=False]'
INPUT = torch.tensor([[1, 5, 9, 13, 2, 7, 40, 63]])


# -- models and adapters -------------------------------------------------------
def base_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LLAMA).eval()


def outputs(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT).logits


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    diff = (actual - expected).abs().max().item()
    assert diff <= 1e-6, f"outputs differ from the saving model's by {diff}"


@dataclass(frozen=True)
class Saved:
    folder: Path
    outputs: torch.Tensor  # what the model that saved the adapter computes on INPUT


def save_adapter(folder: Path, *, seed: int, config: str = LORA) -> Saved:
    model = base_model()
    adapters = adapterkit.attach(model)
    torch.manual_seed(seed)  # init_lora_weights=False: random, nonzero weights
    adapters.add(config)
    adapters.save(folder)
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG, WEIGHTS]
    return Saved(folder, outputs(model))


@pytest.fixture(scope="module")
def v1(tmp_path_factory: pytest.TempPathFactory) -> Saved:
    return save_adapter(tmp_path_factory.mktemp("v1"), seed=1)


@pytest.fixture(scope="module")
def v2(tmp_path_factory: pytest.TempPathFactory, v1: Saved) -> Saved:
    saved = save_adapter(tmp_path_factory.mktemp("v2"), seed=2)
    assert (saved.outputs - v1.outputs).abs().max() > 1e-3, "v1 and v2 must be told apart by their outputs"
    return saved


@pytest.fixture(scope="module")
def other_shapes(tmp_path_factory: pytest.TempPathFactory) -> Saved:
    """An adapter whose weights do not fit v1's config (other rank, other modules)."""
    return save_adapter(tmp_path_factory.mktemp("other"), seed=3, config=OTHER_LORA)


@pytest.fixture(scope="module")
def v1_pickle(tmp_path_factory: pytest.TempPathFactory, v1: Saved) -> Saved:
    """v1 as an old-style checkpoint: adapter_config.json + adapter_model.bin (pickle) only."""
    folder = tmp_path_factory.mktemp("v1-pickle")
    shutil.copy(v1.folder / CONFIG, folder / CONFIG)
    torch.save(load_file(v1.folder / WEIGHTS), folder / PICKLE)
    return Saved(folder, v1.outputs)


def load(repo_id: str, **kwargs: object) -> tuple[LlamaForCausalLM, adapterkit.Adapters]:
    """A fresh base model with ``repo_id`` loaded into it."""
    model = base_model()
    adapters = adapterkit.attach(model)
    adapters.load(repo_id, **kwargs)
    return model, adapters


# -- the Hub -------------------------------------------------------------------
@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A running FakeHub that huggingface_hub uses as the Hub, without token or offline mode."""
    with serving_as_the_hub(monkeypatch, tmp_path) as server:
        yield server


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "hub-cache"


def file_requests(hub: FakeHub, method: str | None = "GET") -> list[Request]:
    """Requests for files (``/resolve/``); GETs only by default."""
    return [r for r in hub.requests if r.kind == "file" and (method is None or r.method == method)]


def state(model: torch.nn.Module, adapters: adapterkit.Adapters) -> tuple:
    """What "the model is unchanged" compares: structure, parameter names, adapters, parameters."""
    params = {name: (p.detach().clone(), p.requires_grad) for name, p in model.named_parameters()}
    return str(model), list(params), adapters.names, adapters.active, params


def assert_no_secret(error: BaseException, *secrets: str | None) -> None:
    shown = [str(error), repr(error), "".join(traceback.format_exception(error))]
    for secret in filter(None, secrets):
        assert not any(secret in text for text in shown), f"the token leaks into {type(error).__name__}"


# -- loading -------------------------------------------------------------------
def test_load_by_repo_id_downloads_the_adapter_over_http(hub: FakeHub, cache_dir: Path, v1: Saved) -> None:
    hub.create_repo(REPO)
    hub.upload_files(REPO, {"README.md": b"# an adapter\n", "model.safetensors": b"\0" * 4096})
    sha = hub.upload_folder(REPO, v1.folder)

    model, adapters = load(REPO, cache_dir=cache_dir)

    assert_same(outputs(model), v1.outputs)
    assert adapters.names == ["default"]
    gets = {r.filename: r for r in file_requests(hub)}
    assert set(gets) == {CONFIG, WEIGHTS}, "only the adapter's own files are downloaded"
    size = (v1.folder / WEIGHTS).stat().st_size
    assert (gets[WEIGHTS].status, gets[WEIGHTS].body_bytes, gets[WEIGHTS].revision) == (200, size, sha)
    assert (cache_dir / "models--user--adapter" / "snapshots" / sha / WEIGHTS).is_file()
    assert not Path(constants.HF_HUB_CACHE).exists(), "cache_dir= is where the files go"


def test_load_without_cache_dir_uses_the_hub_cache(hub: FakeHub, v1: Saved) -> None:
    hub.create_repo(REPO)
    sha = hub.upload_folder(REPO, v1.folder)

    model, _ = load(REPO)

    assert_same(outputs(model), v1.outputs)
    assert (Path(constants.HF_HUB_CACHE) / "models--user--adapter" / "snapshots" / sha / WEIGHTS).is_file()


def test_revision_picks_a_branch_or_a_commit(hub: FakeHub, cache_dir: Path, tmp_path: Path, v1: Saved, v2: Saved) -> None:
    hub.create_repo(REPO)
    sha1 = hub.upload_folder(REPO, v1.folder)
    sha2 = hub.upload_folder(REPO, v2.folder, branch="v2")

    model, _ = load(REPO, revision="v2", cache_dir=cache_dir)
    assert_same(outputs(model), v2.outputs)
    # Config and weights (HEAD and GET) were all fetched at the one commit "v2" resolved to.
    assert {(r.filename, r.revision) for r in file_requests(hub, None)} == {(CONFIG, sha2), (WEIGHTS, sha2)}

    hub.clear_requests()
    model, _ = load(REPO, revision=sha1, cache_dir=tmp_path / "another-cache")
    assert_same(outputs(model), v1.outputs)
    assert {(r.filename, r.revision) for r in file_requests(hub, None)} == {(CONFIG, sha1), (WEIGHTS, sha1)}

    model, _ = load(REPO, cache_dir=cache_dir)  # no revision: the default branch
    assert_same(outputs(model), v1.outputs)


def test_config_and_weights_come_from_one_commit_while_the_branch_moves(
    hub: FakeHub, cache_dir: Path, v1: Saved, other_shapes: Saved
) -> None:
    hub.create_repo(REPO)
    sha1 = hub.upload_folder(REPO, v1.folder)
    moved: list[str] = []

    def push_after_first_file(request: Request) -> None:
        # Before the first file's body goes out, "main" moves to a commit with another adapter.
        if request.kind == "file" and request.method == "GET" and not moved:
            moved.append(hub.upload_folder(REPO, other_shapes.folder))

    hub.on_request = push_after_first_file
    model, _ = load(REPO, cache_dir=cache_dir)

    assert moved, "the branch did move during the load"
    assert_same(outputs(model), v1.outputs)
    assert {r.revision for r in file_requests(hub, None)} == {sha1}
    # And the branch really moved: a new load gets the new adapter.
    model, _ = load(REPO, cache_dir=cache_dir)
    assert_same(outputs(model), other_shapes.outputs)


def test_subfolder(hub: FakeHub, cache_dir: Path, tmp_path: Path, v1: Saved, v2: Saved) -> None:
    hub.tree_page_size = 2  # the file listing comes in several pages, as for a big repo
    hub.create_repo(REPO)
    hub.upload_folder(REPO, v1.folder)
    hub.upload_folder(REPO, v2.folder, path_in_repo="adapters/second")

    model, _ = load(REPO, subfolder="adapters/second", cache_dir=cache_dir)
    assert_same(outputs(model), v2.outputs)
    assert {r.filename for r in file_requests(hub)} == {f"adapters/second/{CONFIG}", f"adapters/second/{WEIGHTS}"}
    assert len([r for r in hub.requests if r.kind == "tree"]) > 1

    hub.clear_requests()
    model, _ = load(REPO, cache_dir=tmp_path / "another-cache")  # the adapter at the root
    assert_same(outputs(model), v1.outputs)
    assert {r.filename for r in file_requests(hub)} == {CONFIG, WEIGHTS}

    with pytest.raises(adapterkit.CheckpointError) as info:
        load(REPO, subfolder="adapters/missing", cache_dir=cache_dir)
    assert type(info.value) is adapterkit.CheckpointNotFoundError
    assert "adapters/missing" in str(info.value)


# -- access --------------------------------------------------------------------
def test_private_repo_with_the_right_token(hub: FakeHub, cache_dir: Path, v1: Saved) -> None:
    hub.create_repo(REPO, private=True, token=TOKEN)
    hub.upload_folder(REPO, v1.folder)

    model, _ = load(REPO, token=TOKEN, cache_dir=cache_dir)

    assert_same(outputs(model), v1.outputs)
    assert {r.filename for r in file_requests(hub)} == {CONFIG, WEIGHTS}
    assert {r.authorization for r in hub.requests} == {f"Bearer {TOKEN}"}, "every request carries the token"


@pytest.mark.parametrize(
    ("token", "error"),
    [
        # The Hub answers 401 RepoNotFound: it does not tell "private" from "missing".
        (None, adapterkit.CheckpointNotFoundError),
        # 401 "Invalid credentials in Authorization header".
        (UNKNOWN_TOKEN, adapterkit.HubAccessError),
        # A valid token without access: 404 RepoNotFound.
        (OTHER_USERS_TOKEN, adapterkit.CheckpointNotFoundError),
    ],
    ids=["no-token", "unknown-token", "token-without-access"],
)
def test_private_repo_refused(
    hub: FakeHub, cache_dir: Path, v1: Saved, token: str | None, error: type[Exception]
) -> None:
    hub.create_repo(REPO, private=True, token=TOKEN)
    hub.upload_folder(REPO, v1.folder)
    hub.add_token(OTHER_USERS_TOKEN)
    model = base_model()
    adapters = adapterkit.attach(model)

    with pytest.raises(adapterkit.CheckpointError) as info:
        adapters.load(REPO, token=token, cache_dir=cache_dir)

    assert type(info.value) is error
    assert REPO in str(info.value)
    assert_no_secret(info.value, token, TOKEN)
    assert {r.authorization for r in hub.requests} == {f"Bearer {token}" if token else None}
    assert file_requests(hub, None) == []
    assert adapters.names == []
    assert_same(outputs(model), outputs(base_model()))


def test_gated_repo(hub: FakeHub, cache_dir: Path, v1: Saved) -> None:
    hub.create_repo(REPO, gated=True, token=TOKEN)
    hub.upload_folder(REPO, v1.folder)

    with pytest.raises(adapterkit.CheckpointError) as info:
        load(REPO, cache_dir=cache_dir)
    assert type(info.value) is adapterkit.HubAccessError
    assert "gated" in str(info.value)
    assert file_requests(hub) == [], "no file content went out"

    model, _ = load(REPO, token=TOKEN, cache_dir=cache_dir)
    assert_same(outputs(model), v1.outputs)


@pytest.mark.parametrize(
    ("repo_id", "revision"),
    [("user/missing", None), (REPO, "no-such-branch"), (REPO, "0123456789abcdef0123456789abcdef01234567")],
    ids=["unknown-repo", "unknown-branch", "unknown-commit"],
)
def test_not_found(hub: FakeHub, cache_dir: Path, v1: Saved, repo_id: str, revision: str | None) -> None:
    hub.create_repo(REPO)
    hub.upload_folder(REPO, v1.folder)
    hub.add_token(TOKEN)  # a valid token, to check that it stays out of the message

    with pytest.raises(adapterkit.CheckpointError) as info:
        load(repo_id, revision=revision, cache_dir=cache_dir, token=TOKEN)

    assert type(info.value) is adapterkit.CheckpointNotFoundError
    assert repo_id in str(info.value)
    if revision:
        assert revision in str(info.value)
    assert_no_secret(info.value, TOKEN)
    assert file_requests(hub, None) == []


# -- broken downloads ----------------------------------------------------------
def test_download_cut_midway_is_a_checkpoint_error(hub: FakeHub, cache_dir: Path, v1: Saved) -> None:
    hub.create_repo(REPO, private=True, token=TOKEN)
    hub.upload_folder(REPO, v1.folder)
    size = len(hub.file(REPO, "main", WEIGHTS))
    hub.cut_downloads(REPO, WEIGHTS, after_bytes=size // 2)

    with pytest.raises(adapterkit.CheckpointError) as info:
        load(REPO, token=TOKEN, cache_dir=cache_dir)

    assert REPO in str(info.value)
    assert_no_secret(info.value, TOKEN)
    weights = [r for r in file_requests(hub) if r.filename == WEIGHTS]
    assert weights and all(r.body_bytes < size for r in weights), "every download of the weights was cut"


def test_download_cut_midway_leaves_the_model_and_the_cache_usable(
    hub: FakeHub, cache_dir: Path, v1: Saved, v2: Saved
) -> None:
    hub.create_repo(REPO)
    hub.upload_folder(REPO, v1.folder)
    size = len(hub.file(REPO, "main", WEIGHTS))
    hub.cut_downloads(REPO, WEIGHTS, after_bytes=size // 2)
    model = base_model()
    adapters = adapterkit.attach(model)
    adapters.load(v2.folder)  # an adapter already in place
    before = state(model, adapters)

    # The error type is test_download_cut_midway_is_a_checkpoint_error's business.
    with pytest.raises(Exception):  # noqa: B017, PT011
        adapters.load(REPO, "second", cache_dir=cache_dir)

    after = state(model, adapters)
    assert after[:-1] == before[:-1], "module structure, parameter names, adapters"
    for name, (value, requires_grad) in before[-1].items():
        assert torch.equal(after[-1][name][0], value) and after[-1][name][1] == requires_grad, name
    assert_same(outputs(model), v2.outputs)

    # Once the Hub serves the file whole again, the same cache gives the right adapter (no half file kept).
    hub.cut_downloads(REPO, WEIGHTS, after_bytes=None)
    adapters.load(REPO, "second", cache_dir=cache_dir)  # now the only active adapter
    assert_same(outputs(model), v1.outputs)


def test_one_dropped_connection_is_retried(hub: FakeHub, cache_dir: Path, v1: Saved) -> None:
    hub.create_repo(REPO)
    hub.upload_folder(REPO, v1.folder)
    size = len(hub.file(REPO, "main", WEIGHTS))
    hub.cut_downloads(REPO, WEIGHTS, after_bytes=size // 2, times=1)

    model, _ = load(REPO, cache_dir=cache_dir)

    assert_same(outputs(model), v1.outputs)
    assert [r.body_bytes < size for r in file_requests(hub) if r.filename == WEIGHTS] == [True, False]


# -- offline -------------------------------------------------------------------
@pytest.fixture
def cached(hub: FakeHub, cache_dir: Path, v1: Saved) -> FakeHub:
    """REPO with v1 on "main", loaded once online into cache_dir; the request log cleared."""
    hub.create_repo(REPO)
    hub.upload_folder(REPO, v1.folder)
    load(REPO, cache_dir=cache_dir)
    assert {r.filename for r in file_requests(hub)} == {CONFIG, WEIGHTS}
    hub.clear_requests()
    return hub


def test_local_files_only_reads_the_cache(cached: FakeHub, cache_dir: Path, v1: Saved) -> None:
    model, _ = load(REPO, cache_dir=cache_dir, local_files_only=True)

    assert_same(outputs(model), v1.outputs)
    assert cached.requests == []


def test_hf_hub_offline_reads_the_cache(
    cached: FakeHub, cache_dir: Path, v1: Saved, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets at import

    model, _ = load(REPO, cache_dir=cache_dir)

    assert_same(outputs(model), v1.outputs)
    assert cached.requests == []


def test_the_cache_serves_while_the_hub_is_down(cached: FakeHub, cache_dir: Path, v1: Saved) -> None:
    cached.stop()

    for local_files_only in (False, True):
        model, _ = load(REPO, cache_dir=cache_dir, local_files_only=local_files_only)
        assert_same(outputs(model), v1.outputs)

    with pytest.raises(adapterkit.CheckpointError) as info:
        load("user/never-downloaded", cache_dir=cache_dir)
    assert type(info.value) is adapterkit.CheckpointNotFoundError
    assert "user/never-downloaded" in str(info.value)


@pytest.mark.parametrize("offline", ["local_files_only", "HF_HUB_OFFLINE"])
def test_offline_without_the_files_in_cache(
    hub: FakeHub, cache_dir: Path, tmp_path: Path, v1: Saved, v2: Saved, monkeypatch: pytest.MonkeyPatch, offline: str
) -> None:
    hub.create_repo(REPO)
    hub.upload_folder(REPO, v2.folder, path_in_repo="adapters/second")
    hub.upload_folder(REPO, v1.folder)
    hub.upload_folder(REPO, v2.folder, branch="v2")
    load(REPO, cache_dir=cache_dir)  # online: the root adapter of "main"
    hub.clear_requests()
    options: dict[str, object] = {"local_files_only": True} if offline == "local_files_only" else {}
    if offline == "HF_HUB_OFFLINE":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    missing = [
        {"cache_dir": tmp_path / "empty-cache"},  # nothing downloaded at all
        {"cache_dir": cache_dir, "revision": "v2"},  # a branch never downloaded
        {"cache_dir": cache_dir, "subfolder": "adapters/second"},  # files of the cached commit never downloaded
    ]
    for where in missing:
        with pytest.raises(adapterkit.CheckpointError) as info:
            load(REPO, **where, **options)
        assert type(info.value) is adapterkit.CheckpointNotFoundError, where
        assert REPO in str(info.value)
    assert hub.requests == []


# -- pickles -------------------------------------------------------------------
def test_pickle_only_repo_needs_allow_pickle(hub: FakeHub, cache_dir: Path, v1_pickle: Saved) -> None:
    hub.create_repo(REPO)
    hub.upload_folder(REPO, v1_pickle.folder)

    with pytest.raises(adapterkit.CheckpointError) as info:
        load(REPO, cache_dir=cache_dir)
    # The pickle is not even downloaded, so the Hub path reports a missing safetensors file (a local
    # folder holding the same files raises UnsafeCheckpointError).
    assert type(info.value) is adapterkit.CheckpointNotFoundError
    assert "allow_pickle" in str(info.value)
    assert PICKLE not in {r.filename for r in file_requests(hub, None)}, "the pickle stays on the server"

    model, _ = load(REPO, cache_dir=cache_dir, allow_pickle=True)
    assert_same(outputs(model), v1_pickle.outputs)
    assert PICKLE in {r.filename for r in file_requests(hub)}
