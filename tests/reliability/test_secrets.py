"""Nothing let in, nothing let out: tokens never leak, pickles are refused, plugins can be restricted.

Tokens: adapters are loaded from private and gated repos of a real HTTP server on
127.0.0.1 (tests/lora/hub_server.py) with right and wrong tokens, while every
logger records at DEBUG (huggingface_hub's request log and its ``HF_DEBUG`` curl
log included) and stdout/stderr are captured at the file-descriptor level. The
token must not appear in any log record, warning, output, error (``str``,
``repr``, formatted traceback, chained exceptions), repr of anything adapterkit
returns, saved file or environment variable; on the wire it travels only in the
``Authorization`` header.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from shared_test_helpers import make_llama
from hub_server import FakeHub
from safetensors.torch import load_file

import adapterkit
from adapterkit import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigSyntaxError,
    HubAccessError,
    MethodRegistry,
    UnknownMethodError,
    UnsafeCheckpointError,
    make_plugin_manager,
)

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PICKLE = "adapter_model.bin"
TOKEN = "hf_SecretsTestTokenGrantsAccess7f3a9c01"
OTHER_TOKEN = "hf_SecretsTestTokenOfSomeoneElse5e2d7b"
UNKNOWN_TOKEN = "hf_SecretsTestTokenNeverIssued91c4e8a2"
TOKENS = (TOKEN, OTHER_TOKEN, UNKNOWN_TOKEN)
PRIVATE, GATED = "owner/private-adapter", "owner/gated-adapter"
SPEC = "lora[r=4, target_modules=['q_proj', 'v_proj'], init_lora_weights=False]"
INSTALLED = set(adapterkit.available_methods())


# -- capturing everything ----------------------------------------------------------------------
class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.texts.append(f"{record.name} {record.getMessage()} {record.args!r} {record.exc_text or ''}")
        if record.exc_info:
            self.texts.append("".join(traceback.format_exception(*record.exc_info)))


@pytest.fixture
def logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Collect]:
    """Every logger at DEBUG, each one's records collected (also of loggers that do not propagate)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_DEBUG", True)  # huggingface_hub also logs each request as a curl command
    handler = _Collect()
    loggers = [logging.getLogger()] + [
        logging.getLogger(name)
        for name, obj in list(logging.Logger.manager.loggerDict.items())
        if isinstance(obj, logging.Logger)
    ]
    saved = [(lg, lg.level, lg.disabled) for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.DEBUG)
        lg.disabled = False
        lg.addHandler(handler)
    try:
        yield handler
    finally:
        for lg, level, disabled in saved:
            lg.removeHandler(handler)
            lg.setLevel(level)
            lg.disabled = disabled


def chain(error: BaseException) -> Iterator[BaseException]:
    """The error and every exception chained to it (causes and contexts, even suppressed ones)."""
    seen: set[int] = set()
    todo = [error]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [current.__cause__, current.__context__]


def error_texts(error: BaseException) -> list[str]:
    texts = []
    for item in chain(error):
        texts += [str(item), repr(item), "".join(traceback.format_exception(item)), str(getattr(item, "args", ""))]
    return texts


def assert_no_token(texts: list[str], where: str) -> None:
    for text in texts:
        for token in TOKENS:
            assert token not in text, f"a token leaks into {where}: ...{text[max(0, text.find(token) - 80) :][:200]}..."
            assert token[3:] not in text, f"a token (without its prefix) leaks into {where}"


def assert_token_only_in_headers(hub: FakeHub) -> None:
    for request in hub.requests:
        assert_no_token([request.path, json.dumps(request.query)], "a request URL")


def files_under(*folders: Path) -> Iterator[Path]:
    for folder in folders:
        if folder.exists():
            yield from (p for p in folder.rglob("*") if p.is_file())


# -- the Hub setup -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = make_llama()
    torch.manual_seed(1)
    adapterkit.attach(model).add(SPEC)
    folder = tmp_path_factory.mktemp("saved") / "adapter"
    adapterkit.attach(model).save(folder)
    return folder


@pytest.fixture
def repos(hub: FakeHub, saved: Path) -> FakeHub:
    hub.create_repo(PRIVATE, private=True, token=TOKEN)
    hub.upload_folder(PRIVATE, saved)
    hub.create_repo(GATED, gated=True, token=TOKEN)
    hub.upload_folder(GATED, saved)
    hub.add_token(OTHER_TOKEN)
    return hub


FAILURES = {
    # id: (repo, keyword arguments of load, the error)
    "unknown-token": (PRIVATE, {"token": UNKNOWN_TOKEN}, HubAccessError),
    "token-without-access": (PRIVATE, {"token": OTHER_TOKEN}, CheckpointNotFoundError),
    "gated-with-wrong-token": (GATED, {"token": OTHER_TOKEN}, HubAccessError),
    "unknown-revision": (PRIVATE, {"token": TOKEN, "revision": "nope"}, CheckpointNotFoundError),
    "missing-subfolder": (PRIVATE, {"token": TOKEN, "subfolder": "nope"}, CheckpointNotFoundError),
    "offline-without-cache": (PRIVATE, {"token": TOKEN, "local_files_only": True}, CheckpointNotFoundError),
    "cut-download": (PRIVATE, {"token": TOKEN}, CheckpointError),
    "unknown-repo": ("owner/missing", {"token": TOKEN}, CheckpointNotFoundError),
}


@pytest.mark.parametrize("failure", list(FAILURES), ids=list(FAILURES))
def test_a_failed_hub_load_never_shows_the_token(
    repos: FakeHub, logs: _Collect, tmp_path: Path, capfd: pytest.CaptureFixture[str], failure: str
) -> None:
    repo, kwargs, expected = FAILURES[failure]
    if failure == "cut-download":
        size = len(repos.file(PRIVATE, "main", WEIGHTS))
        repos.cut_downloads(PRIVATE, WEIGHTS, after_bytes=size // 2)
    model = make_llama()
    adapters = adapterkit.attach(model)

    with warnings.catch_warnings(record=True) as caught, pytest.raises(CheckpointError) as info:
        warnings.simplefilter("always")
        adapters.load(repo, "hub", cache_dir=tmp_path / "cache", **kwargs)

    assert type(info.value) is expected
    assert repo in str(info.value), "the error still names the repo"
    assert_no_token(error_texts(info.value), "the error")
    assert_no_token(logs.texts, "the logs")
    assert_no_token([str(w.message) for w in caught], "a warning")
    out, err = capfd.readouterr()
    assert_no_token([out, err], "stdout/stderr")
    assert_no_token([repr(adapters), str(model)], "a repr")
    assert_no_token([p.read_bytes().decode("latin-1") for p in files_under(tmp_path)], "a file")
    assert_token_only_in_headers(repos)
    assert adapters.names == []


def test_a_successful_private_load_never_shows_the_token(
    repos: FakeHub, logs: _Collect, tmp_path: Path, capfd: pytest.CaptureFixture[str], saved: Path
) -> None:
    model = make_llama()
    adapters = adapterkit.attach(model)
    cache = tmp_path / "cache"

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        name = adapters.load(PRIVATE, "private", token=TOKEN, cache_dir=cache)
        adapters.load(GATED, "gated", token=TOKEN, cache_dir=cache)
        adapters.save(tmp_path / "saved-again")

    assert {r.authorization for r in repos.requests} == {f"Bearer {TOKEN}"}, "the token did go to the Hub"
    # The logs were captured, huggingface_hub's request log included (its HF_DEBUG curl lines show "<TOKEN>").
    assert any("authenticated: True" in text for text in logs.texts), "huggingface_hub's debug log was captured"
    returned = [
        name,
        repr(adapters),
        str(model),
        repr(adapters.config("private")),
        repr(adapterkit.format_config(adapters.config("private"))),
        repr(adapters.method("private")),
        repr(adapterkit.available_methods()),
        repr(sorted(adapters.state_dict("private"))),
        repr(adapters.names),
        repr(adapterkit.config_to_dict(adapters.config("private"))),
        repr(vars(adapters)),
    ]
    assert_no_token(returned, "a value or repr adapterkit returns")
    assert_no_token(logs.texts, "the logs")
    assert_no_token([str(w.message) for w in caught], "a warning")
    assert_no_token(list(capfd.readouterr()), "stdout/stderr")
    assert_no_token([p.read_bytes().decode("latin-1") for p in files_under(tmp_path)], "the cache or the saved files")
    assert_no_token(list(os.environ.values()), "the environment")
    assert_token_only_in_headers(repos)
    # The loaded adapter is the saved one.
    assert load_file(tmp_path / "saved-again" / "private" / WEIGHTS).keys() == load_file(saved / WEIGHTS).keys()


def test_the_transformers_style_mixin_never_shows_the_token(repos: FakeHub, logs: _Collect, tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    class Model(adapterkit.AdapterMixin, LlamaForCausalLM):
        pass

    from shared_test_helpers import TINY_LLAMA

    model = Model(LlamaConfig(**TINY_LLAMA))
    with pytest.raises(HubAccessError) as info:
        model.load_adapter(PRIVATE, adapter_name="x", token=UNKNOWN_TOKEN, adapter_kwargs={"cache_dir": tmp_path})
    assert_no_token(error_texts(info.value), "the error")
    model.load_adapter(PRIVATE, adapter_name="x", token=TOKEN, adapter_kwargs={"cache_dir": tmp_path})
    assert_no_token([repr(model.adapterkit), str(model.active_adapters())], "a repr")
    assert_no_token(logs.texts, "the logs")


# -- pickles ---------------------------------------------------------------------------------------
class RunsCode:
    """A pickle payload that creates ``marker`` when unpickled: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def evil_folder(folder: Path, saved: Path, marker: Path, *, with_safetensors: bool = False) -> Path:
    folder.mkdir()
    (folder / CONFIG).write_bytes((saved / CONFIG).read_bytes())
    tensors = load_file(saved / WEIGHTS)
    torch.save({**tensors, "payload": RunsCode(marker)}, folder / PICKLE)
    if with_safetensors:
        (folder / WEIGHTS).write_bytes((saved / WEIGHTS).read_bytes())
    return folder


def test_a_pickle_checkpoint_is_refused_unless_allowed(saved: Path, tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    folder = evil_folder(tmp_path / "evil", saved, marker)
    adapters = adapterkit.attach(make_llama())

    with pytest.raises(UnsafeCheckpointError, match=r"allow_pickle=True"):
        adapters.load(folder)
    assert not marker.exists()

    # Allowed, it is read with torch.load(weights_only=True): a payload naming a function is refused.
    with pytest.raises(CheckpointError, match=r"adapter_model\.bin") as info:
        adapters.load(folder, allow_pickle=True)
    assert type(info.value) is CheckpointError
    assert not marker.exists(), "unpickling ran code"
    assert adapters.names == []


def test_safetensors_wins_over_a_pickle_next_to_it(saved: Path, tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    folder = evil_folder(tmp_path / "both", saved, marker, with_safetensors=True)
    adapters = adapterkit.attach(make_llama())

    adapters.load(folder, allow_pickle=True)

    assert not marker.exists()
    assert adapters.names == ["default"]


def test_a_pickle_on_the_hub_is_not_even_downloaded_unless_allowed(hub: FakeHub, saved: Path, tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    hub.create_repo("owner/pickled")
    hub.upload_folder("owner/pickled", evil_folder(tmp_path / "evil", saved, marker))
    adapters = adapterkit.attach(make_llama())

    with pytest.raises(CheckpointNotFoundError, match=r"allow_pickle=True"):
        adapters.load("owner/pickled", cache_dir=tmp_path / "cache")
    assert PICKLE not in {r.filename for r in hub.requests if r.kind == "file"}

    with pytest.raises(CheckpointError):
        adapters.load("owner/pickled", cache_dir=tmp_path / "cache", allow_pickle=True)
    assert not marker.exists(), "unpickling ran code"


def test_config_strings_never_run_code(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    adapters = adapterkit.attach(make_llama())
    attempts = [
        f"lora[r=__import__('pathlib').Path({str(marker)!r}).touch()]",
        f"lora[target_modules=[open({str(marker)!r}, 'w')]]",
        f"lora[r=(lambda: open({str(marker)!r}, 'w'))()]",
        f"lora[r=[x for x in [open({str(marker)!r}, 'w')]]]",
        f"lora[r=8]] + [open({str(marker)!r}, 'w')",
        f"lora[**{{'r': open({str(marker)!r}, 'w')}}]",
    ]
    for spec in attempts:
        with pytest.raises(ConfigSyntaxError):
            adapters.add(spec)
        assert not marker.exists(), spec
    assert adapters.names == []


# -- plugins ---------------------------------------------------------------------------------------
def registry_with_env(monkeypatch: pytest.MonkeyPatch, **env: str | None) -> MethodRegistry:
    for name, value in env.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    return MethodRegistry(make_plugin_manager())


def test_plugins_allowlist_and_blocklist(monkeypatch: pytest.MonkeyPatch) -> None:
    allow, block = "ADAPTERKIT_PLUGINS", "ADAPTERKIT_BLOCK_PLUGINS"
    assert set(registry_with_env(monkeypatch, **{allow: None, block: None}).methods) == INSTALLED
    assert set(registry_with_env(monkeypatch, **{allow: "lora", block: None}).methods) == {"lora"}
    assert set(registry_with_env(monkeypatch, **{allow: "", block: None}).methods) == set()
    assert set(registry_with_env(monkeypatch, **{allow: None, block: "lora"}).methods) == INSTALLED - {"lora"}
    assert set(registry_with_env(monkeypatch, **{allow: " lora , ia3 ", block: "ia3"}).methods) == {"lora"}
    blocked = registry_with_env(monkeypatch, **{allow: None, block: "lora"})
    assert blocked.plugin_manager.is_blocked("lora")


def test_a_method_of_a_restricted_plugin_is_an_unknown_method(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTERKIT_PLUGINS", "lora")
    model = make_llama()
    adapters = adapterkit.attach(model, MethodRegistry(make_plugin_manager()))
    before = str(model)

    with pytest.raises(UnknownMethodError, match=r"'ia3'; installed methods: lora\. Install it with") as info:
        adapters.add("ia3[target_modules=['q_proj'], feedforward_modules=[]]")
    assert isinstance(info.value, KeyError)
    assert str(model) == before and adapters.names == []
    adapters.add(SPEC)  # the allowed method works


FAKE_PLUGINS = {
    # A plugin that records that its code ran.
    "spy_plugin.py": "import os, pathlib\npathlib.Path(os.environ['SPY_MARKER']).touch()\nplugin = object()\n",
    # A plugin that cannot be imported.
    "broken_plugin.py": "raise ImportError('broken_plugin needs a library that is not installed')\n",
}
DIST_INFO = {
    "spy_plugin-1.0.dist-info": "[adapterkit]\nspy = spy_plugin:plugin\n",
    "broken_plugin-1.0.dist-info": "[adapterkit]\nbroken = broken_plugin:plugin\n",
}
PROBE = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    marker = Path(os.environ["SPY_MARKER"])
    import adapterkit
    from adapterkit import MethodRegistry, PluginError, make_plugin_manager
    results = {"import": {"ran": marker.exists()}}
    scenarios = [  # blocked or not allowed first: once imported, a module stays imported
        ("block-both", {"ADAPTERKIT_BLOCK_PLUGINS": "spy,broken"}),
        ("allow-lora", {"ADAPTERKIT_PLUGINS": "lora"}),
        ("allow-none", {"ADAPTERKIT_PLUGINS": ""}),
        ("block-broken", {"ADAPTERKIT_BLOCK_PLUGINS": "broken"}),
        ("nothing-set", {}),
    ]
    for name, env in scenarios:
        for var in ("ADAPTERKIT_PLUGINS", "ADAPTERKIT_BLOCK_PLUGINS"):
            os.environ.pop(var, None)
        os.environ.update(env)
        try:
            registry = MethodRegistry(make_plugin_manager())
            loaded = sorted(n for n, p in registry.plugin_manager.list_name_plugin() if p is not None)
            results[name] = {"methods": sorted(registry.methods), "ran": marker.exists(), "plugins": loaded}
        except PluginError as error:
            results[name] = {"error": str(error), "ran": marker.exists()}
    print(json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def plugin_probe(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run PROBE in a fresh interpreter that has two extra (fake) plugin distributions installed."""
    root = tmp_path_factory.mktemp("plugins")
    site = root / "site"
    site.mkdir()
    for name, source in FAKE_PLUGINS.items():
        (site / name).write_text(source)
    for folder, entry_points in DIST_INFO.items():
        (site / folder).mkdir()
        dist = folder.split("-")[0].replace("_", "-")
        (site / folder / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        (site / folder / "entry_points.txt").write_text(entry_points)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTERKIT_")}
    env.update(
        PYTHONPATH=os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        SPY_MARKER=str(root / "spy-ran"),
        OMP_NUM_THREADS="1",
    )
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_importing_adapterkit_runs_no_plugin(plugin_probe: dict) -> None:
    assert plugin_probe["import"]["ran"] is False


@pytest.mark.parametrize(
    ("scenario", "methods", "plugins"),
    [
        ("block-both", INSTALLED, None),  # None: whatever else is installed
        ("allow-lora", {"lora"}, {"lora"}),
        ("allow-none", set(), set()),
    ],
)
def test_a_blocked_or_not_allowed_plugin_is_never_imported(
    plugin_probe: dict, scenario: str, methods: set[str], plugins: set[str] | None
) -> None:
    result = plugin_probe[scenario]
    assert result["ran"] is False, "the plugin's code ran"
    assert set(result["methods"]) == methods
    assert not {"spy", "broken"} & set(result["plugins"])
    if plugins is not None:
        assert set(result["plugins"]) == plugins


def test_an_allowed_plugin_is_imported_and_a_broken_one_is_a_plugin_error(plugin_probe: dict) -> None:
    assert plugin_probe["block-broken"]["ran"] is True, "the fake plugin is found at all"
    assert "spy" in plugin_probe["block-broken"]["plugins"]
    error = plugin_probe["nothing-set"]["error"]
    assert "'broken'" in error and "broken_plugin needs a library" in error, "names the plugin and the cause"
    assert "ADAPTERKIT_BLOCK_PLUGINS=broken" in error, "names the fix"
