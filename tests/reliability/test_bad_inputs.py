"""The catalogue of bad inputs: every one ends in a typed, documented error and changes nothing.

Each :class:`Case` is one bad input or misused operation. For every case the test

1. builds a model in the state the case needs (by default a tiny Llama with two
   LoRA adapters, ``one`` active, so that a failure must also leave existing
   adapters alone) and takes a :class:`Snapshot` of it;
2. runs the bad operation and requires an error of exactly ``case.error``, a
   class of the documented hierarchy (``adapterkit.errors``, docs/guarantees.md)
   that also derives from its documented builtin;
3. requires the message to name the offending value (``case.names``, a regex)
   and the fix (``case.fix``, a regex), and never to show a Hub token;
4. requires the model to be exactly as before: module tree (``str(model)``,
   module identities, module attributes), parameters and buffers (names,
   values, ``requires_grad``), outputs, training mode, and the adapters'
   ``names``/``active``/``merged``/``enabled`` and configs.

Cases for IA3 and AdaLoRA run where those plugins are installed (the tox "all"
environment installs every plugin).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from shared_test_helpers import llama_input, make_llama, make_mlp, mlp_input, run
from hub_server import FakeHub
from safetensors.torch import load_file, save_file
from torch import nn

import adapterkit
from adapterkit import errors
from adapterkit.errors import (
    AdapterExistsError,
    AdapterkitError,
    AdapterNameError,
    AdapterStateError,
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    ConfigError,
    ConfigSyntaxError,
    ConfigValueError,
    HubAccessError,
    NoAdaptersError,
    PerSampleError,
    PluginError,
    SaveError,
    StateDictMismatchError,
    TargetError,
    UnknownAdapterError,
    UnknownConfigKeyError,
    UnknownMethodError,
    UnsafeCheckpointError,
    UnsupportedOperationError,
)

INSTALLED = set(adapterkit.available_methods())
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PICKLE = "adapter_model.bin"

# The builtin each documented error also is (docs/guarantees.md, "Error reference").
BUILTIN: dict[type[AdapterkitError], type[BaseException]] = {
    PluginError: RuntimeError,
    UnknownMethodError: KeyError,
    ConfigError: ValueError,
    ConfigSyntaxError: ValueError,
    UnknownConfigKeyError: ValueError,
    ConfigValueError: ValueError,
    AdapterNameError: ValueError,
    AdapterExistsError: ValueError,
    UnknownAdapterError: KeyError,
    NoAdaptersError: RuntimeError,
    TargetError: ValueError,
    CheckpointError: ValueError,
    CheckpointNotFoundError: FileNotFoundError,
    CheckpointExistsError: FileExistsError,
    UnsafeCheckpointError: ValueError,
    StateDictMismatchError: ValueError,
    HubAccessError: PermissionError,
    SaveError: OSError,
    AdapterStateError: RuntimeError,
    errors.BudgetError: RuntimeError,
    PerSampleError: ValueError,
    errors.ArgumentValueError: ValueError,
    UnsupportedOperationError: NotImplementedError,
}

# Hub fixtures: repos and tokens on the fake Hub of the Hub cases.
REPO, PRIVATE, GATED = "user/adapter", "user/private", "user/gated"
TOKEN = "hf_ReliabilityTokenThatGrantsAccess0123"
UNKNOWN_TOKEN = "hf_ReliabilityTokenTheHubNeverIssued45"
SECRETS = (TOKEN, UNKNOWN_TOKEN)

# The adapter saved once and corrupted in many ways below; it adapts q_proj and v_proj.
SAVED_SPEC = "lora[r=4, target_modules=['q_proj', 'v_proj'], init_lora_weights=False]"
IA3_SPEC = "ia3[target_modules=['q_proj', 'v_proj'], feedforward_modules=[], init_ia3_weights=False]"
GOOD = "lora[r=2, target_modules=['q_proj'], init_lora_weights=False]"
A_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


# -- the world a case runs in ----------------------------------------------------------
@dataclass
class World:
    model: nn.Module
    x: torch.Tensor
    tmp: Path
    saved: dict[str, Path]
    hub: FakeHub | None = None
    adapters: adapterkit.Adapters | None = None
    notes: dict[str, Any] = field(default_factory=dict)  # what a setup leaves for its case's check

    @property
    def cache(self) -> Path:
        return self.tmp / "hub-cache"

    def attach(self, registry: adapterkit.MethodRegistry | None = None) -> adapterkit.Adapters:
        if self.adapters is None:
            self.adapters = adapterkit.attach(self.model, registry)
        return self.adapters


_PROTOTYPES: dict[str, nn.Module] = {}


def fresh(kind: str) -> nn.Module:
    """A new copy of the seeded base model (deep copies are much cheaper than building a Llama)."""
    if kind not in _PROTOTYPES:
        _PROTOTYPES[kind] = make_llama() if kind == "llama" else make_mlp()
    return copy.deepcopy(_PROTOTYPES[kind])


# -- setups ----------------------------------------------------------------------------------
def bare(w: World) -> None:
    w.attach()


def two(w: World) -> None:
    """Two LoRA adapters, ``one`` (q_proj, k_proj) active, ``two`` (v_proj, o_proj) attached."""
    adapters = w.attach()
    torch.manual_seed(11)
    adapters.add("lora[r=2, target_modules=['q_proj', 'k_proj'], init_lora_weights=False]", "one")
    adapters.add("lora[r=2, target_modules=['v_proj', 'o_proj'], init_lora_weights=False]", "two")
    adapters.set_active("one")


def two_active(w: World) -> None:
    two(w)
    w.adapters.set_active(["one", "two"])


def merged(w: World) -> None:
    two(w)
    w.adapters.merge()


def disabled(w: World) -> None:
    two(w)
    w.adapters.disable()


def training(w: World) -> None:
    two(w)
    w.model.train()


def with_dora(w: World) -> None:
    two(w)
    torch.manual_seed(12)
    w.adapters.add("lora[r=2, target_modules=['q_proj'], use_dora=True, init_lora_weights=False]", "dora")


def with_bias(w: World) -> None:
    """The plain MLP with ``one`` (LoRA on blocks.0.0) and ``biased`` (bias='lora_only' on embed, its bias
    trained a little), ``one`` active."""
    adapters = w.attach()
    torch.manual_seed(16)
    adapters.add("lora[r=2, target_modules=['blocks.0.0'], init_lora_weights=False]", "one")
    adapters.add("lora[r=2, target_modules=['embed'], bias='lora_only', init_lora_weights=False]", "biased")
    with torch.no_grad():
        w.model.embed.base_layer.bias.add_(0.5)
    adapters.set_active("one")


def grouped_conv(w: World) -> None:
    """A LoRA adapter on a linear layer (merged first) and on a grouped convolution (peft cannot merge into it)."""
    w.model = nn.Sequential(nn.Linear(7, 7), nn.Conv1d(4, 8, 3, groups=2), nn.Flatten(), nn.Linear(8 * 5, 3)).eval()
    w.x = torch.randn(3, 4, 7, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(17)
    w.attach().add("lora[target_modules=['0', '1'], init_lora_weights=False]", "one")


def with_ia3(w: World) -> None:
    two(w)
    torch.manual_seed(13)
    w.adapters.add("ia3[target_modules=['k_proj'], feedforward_modules=[], init_ia3_weights=False]", "ia")


def plain_mlp(w: World) -> None:
    torch.manual_seed(14)
    w.attach().add("lora[r=2, target_modules=['embed'], init_lora_weights=False]", "one")


def lora_only(w: World) -> None:
    """The model attached with a registry holding only the LoRA plugin (as if nothing else were installed)."""
    import adapterkit_lora

    pm = adapterkit.make_plugin_manager(load_entry_points=False)
    pm.register(adapterkit_lora.plugin, name="lora")
    w.attach(adapterkit.MethodRegistry(pm))
    torch.manual_seed(15)
    w.adapters.add("lora[r=2, target_modules=['q_proj'], init_lora_weights=False]", "one")


def hub_repos(w: World) -> None:
    """REPO (public), PRIVATE (needs TOKEN) and GATED on the fake Hub, each holding the saved adapter; plus ``two``."""
    assert w.hub is not None
    for repo, kwargs in (
        (REPO, {}),
        (PRIVATE, {"private": True, "token": TOKEN}),
        (GATED, {"gated": True, "token": TOKEN}),
    ):
        w.hub.create_repo(repo, **kwargs)
        w.hub.upload_folder(repo, w.saved["lora"])
    two(w)


# -- corrupted copies of the saved adapter -------------------------------------------------
_KEEP = object()


def variant(
    w: World,
    *,
    base: str = "lora",
    config: Callable[[dict], Any] | None = None,
    tensors: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    metadata: Any = _KEEP,
    raw: Callable[[bytes], bytes] | None = None,
    drop: Sequence[str] = (),
    name: str = "variant",
) -> Path:
    """A copy of a saved adapter folder with its config, tensors, metadata or bytes changed."""
    source, folder = w.saved[base], w.tmp / name
    shutil.copytree(source, folder)
    if config is not None:
        data = json.loads((source / CONFIG).read_text())
        new = config(data)
        (folder / CONFIG).write_text(new if isinstance(new, str) else json.dumps(new))
    if tensors is not None or metadata is not _KEEP:
        from safetensors import safe_open

        with safe_open(source / WEIGHTS, framework="pt") as f:
            old_metadata = f.metadata()
        weights = load_file(source / WEIGHTS)
        save_file(
            tensors(weights) if tensors else weights,
            folder / WEIGHTS,
            metadata=old_metadata if metadata is _KEEP else metadata,
        )
    if raw is not None:
        (folder / WEIGHTS).write_bytes(raw((source / WEIGHTS).read_bytes()))
    for item in drop:
        (folder / item).unlink()
    return folder


def pickled(w: World, payload: Callable[[dict], Any] = lambda t: t) -> Path:
    """The saved adapter as an old-style folder: adapter_config.json + adapter_model.bin only."""
    folder = w.tmp / "pickled"
    folder.mkdir()
    shutil.copy(w.saved["lora"] / CONFIG, folder / CONFIG)
    torch.save(payload(load_file(w.saved["lora"] / WEIGHTS)), folder / PICKLE)
    return folder


class _RunsCode:
    """Unpickling this would create a file; ``torch.load(weights_only=True)`` must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


# -- operations ----------------------------------------------------------------------------------
def budget_of_one(w: World) -> None:
    """Two registered adapters (not loaded) and a budget of one."""
    w.adapters.register(w.saved["lora"], "r1")
    w.adapters.register(w.saved["lora"], "r2")
    w.adapters.limit(max_adapters=1)


def add(spec: Any, name: Any = "new") -> Callable[[World], Any]:
    return lambda w: w.adapters.add(spec, name)


def load(source: Callable[[World], Any], name: Any = "new", **kwargs: Any) -> Callable[[World], Any]:
    return lambda w: w.adapters.load(source(w), name, **kwargs)


def load_saved(name: Any = "new", **kwargs: Any) -> Callable[[World], Any]:
    return load(lambda w: w.saved["lora"], name, **kwargs)


def load_variant(**changes: Any) -> Callable[[World], Any]:
    return load(lambda w: variant(w, **changes))


def hub_load(repo: str, **kwargs: Any) -> Callable[[World], Any]:
    return lambda w: w.adapters.load(repo, "new", cache_dir=w.cache, **kwargs)


def call(method: str, *args: Any, **kwargs: Any) -> Callable[[World], Any]:
    return lambda w: getattr(w.adapters, method)(*args, **kwargs)


def per_sample(rows: Any, batch: int | None = None) -> Callable[[World], Any]:
    def act(w: World) -> None:
        with w.adapters.per_sample(rows), torch.no_grad():
            w.model(w.x if batch is None else w.x[:batch])

    return act


def cut_download(w: World) -> None:
    size = len(w.hub.file(REPO, "main", WEIGHTS))
    w.hub.cut_downloads(REPO, WEIGHTS, after_bytes=size // 2)  # every GET of the weights breaks off
    w.adapters.load(REPO, "new", cache_dir=w.cache)


def hub_down(w: World) -> None:
    w.hub.stop()
    w.adapters.load(REPO, "new", cache_dir=w.cache)


def hub_corrupt_weights(w: World) -> None:
    w.hub.upload_files(REPO, {WEIGHTS: (w.saved["lora"] / WEIGHTS).read_bytes()[:100]})
    w.adapters.load(REPO, "new", cache_dir=w.cache)


def hub_pickle_only(w: World) -> None:
    w.hub.create_repo("user/pickled")
    w.hub.upload_folder("user/pickled", pickled(w))
    w.adapters.load("user/pickled", "new", cache_dir=w.cache)


def save_over_existing(w: World) -> None:
    target = w.tmp / "out"
    w.adapters.save(target, "two")  # an adapter already saved there
    w.notes["files"] = {p: p.read_bytes() for p in sorted(target.rglob("*")) if p.is_file()}
    w.adapters.save(target, ["one", "two"])  # "two" is taken: nothing may be written, "one" included


def folder_unchanged(w: World) -> None:
    now = {p: p.read_bytes() for p in sorted((w.tmp / "out").rglob("*")) if p.is_file()}
    assert now == w.notes["files"], "a refused save changed the save folder"


def save_into_file(w: World) -> None:
    (w.tmp / "a-file").write_text("not a folder")
    w.adapters.save(w.tmp / "a-file")


def nothing_saved(w: World) -> None:
    assert not (w.tmp / "out").exists(), "a refused save wrote files"


def no_marker(w: World) -> None:
    assert not (w.tmp / "code-ran").exists(), "loading ran code from a pickle"


# -- the catalogue -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    id: str
    act: Callable[[World], Any]
    error: type[AdapterkitError]
    names: str  # regex: the message names the offending value
    fix: str  # regex: the message names the fix
    setup: Callable[[World], None] | tuple[Callable[[World], None], ...] = two
    model: str = "llama"
    plugins: tuple[str, ...] = ()
    hub: bool = False
    check: Callable[[World], None] | None = None  # more to check after the failure


def case(id: str, act: Callable[[World], Any], error: type[AdapterkitError], names: str, fix: str, **kw: Any) -> Case:
    return Case(id, act, error, names, fix, **kw)


CONFIG_STRINGS = [
    case("cfg-unbalanced-open", add("lora[r=8"), ConfigSyntaxError, r"'lora\[r=8'", r"check the brackets"),
    case("cfg-unbalanced-close", add("lora[r=8]]"), ConfigSyntaxError, r"'lora\[r=8\]\]'", r"key=value pairs"),
    case("cfg-empty-string", add(""), ConfigSyntaxError, r"config string ''", r"expected method\[key=value"),
    case(
        "cfg-text-after-bracket",
        add("lora[r=8] extra"),
        ConfigSyntaxError,
        r"'lora\[r=8\] extra'",
        r"expected method\[key=value",
    ),
    case("cfg-positional-option", add("lora[8]"), ConfigSyntaxError, r"'lora\[8\]'", r"key=value"),
    case("cfg-repeated-key", add("lora[r=8, r=9]"), ConfigSyntaxError, r"sets 'r' twice", r"keep one"),
    case(
        "cfg-unquoted-string",
        add("lora[target_modules=q_proj]"),
        ConfigSyntaxError,
        r"'target_modules', 'q_proj'",
        r"quote strings",
    ),
    case("cfg-expression-value", add("lora[r=2+3]"), ConfigSyntaxError, r"'r', '2 \+ 3'", r"Python literal"),
    case(
        "cfg-code-value",
        add("lora[r=__import__('os').system('exit 3')]"),
        ConfigSyntaxError,
        r"__import__\('os'\)",
        r"not a\s+Python literal",
    ),
    case("cfg-unhashable-literal", add("lora[r={[1]: 2}]"), ConfigSyntaxError, r"'r'.*\{\[1\]: 2\}", r"literal"),
    case("method-unknown", add("lorra[r=8]"), UnknownMethodError, r"'lorra'", r"Did you mean: lora"),
    case(
        "method-not-installed",
        add("ia3[target_modules=['q_proj']]"),
        UnknownMethodError,
        r"'ia3'; installed methods: lora",
        r"pip install adapterkit-ia3",
        setup=lora_only,
    ),
    case(
        "key-unknown", add("lora[lora_alpah=16]"), UnknownConfigKeyError, r"'lora_alpah'", r"Did you mean: lora_alpha"
    ),
    case("key-unknown-in-dict", add({"method": "lora", "rr": 3}), UnknownConfigKeyError, r"'rr'", r"Did you mean: r\b"),
    case("type-str-for-int", add("lora[r='8']"), ConfigValueError, r"'r'.*'8' \(str\)", r"expects int"),
    case("type-bool-for-int", add("lora[r=True]"), ConfigValueError, r"'r'.*True \(bool\)", r"expects int"),
    case("type-int-for-bool", add("lora[use_dora=1]"), ConfigValueError, r"'use_dora'.*1 \(int\)", r"expects bool"),
    case(
        "type-union-names-the-accepted-types",
        add("lora[target_modules=['q_proj'], init_lora_weights='bogus']"),
        ConfigValueError,
        r"'init_lora_weights'.*'bogus'",
        r"expects .*bool.*gaussian",  # the accepted forms, not the word "Union"
    ),
    case(
        "type-nested-config",
        add("lora[target_modules=['q_proj'], runtime_config=3]"),
        ConfigValueError,
        r"'runtime_config'.*3",
        r"LoraRuntimeConfig",
    ),
    case(
        "type-rank-pattern-value",
        add("lora[target_modules=['q_proj'], rank_pattern={'q_proj': 'x'}]"),
        ConfigValueError,
        r"rank_pattern.*'x'",
        r"int",
    ),
    case(
        "rank-zero", add("lora[r=0, target_modules=['q_proj']]"), ConfigValueError, r"'r'.*got 0", r"positive integer"
    ),
    case(
        "rank-negative",
        add("lora[r=-3, target_modules=['q_proj']]"),
        ConfigValueError,
        r"'r'.*got -3",
        r"positive integer",
    ),
    case(
        "targets-empty-list",
        add("lora[target_modules=[]]"),
        ConfigValueError,
        r"'target_modules' is empty",
        r"e\.g\. target_modules=\['q_proj', 'v_proj'\]",
    ),
    case(
        "bias-unknown-option",
        add("lora[bias='every', target_modules=['q_proj']]"),
        ConfigValueError,
        r"'bias'.*got 'every'",
        r"Literal\['none', 'all', 'lora_only'\]",
    ),
    case(
        "bias-second-adapter",
        add("lora[bias='all', target_modules=['v_proj']]"),
        ConfigValueError,
        r"adapter 'biased' \(lora\) already trains the base biases",
        r"Delete 'biased' first, or use bias='none'",
        setup=with_bias,
        model="mlp",
    ),
    case(
        "trainable-tokens-unsupported",
        add("lora[trainable_token_indices=[1, 2], target_modules=['q_proj']]"),
        ConfigValueError,
        r"'trainable_token_indices'=\[1, 2\]",
        r"modules_to_save=\['embed_tokens'\]",
    ),
    case(
        "modules-to-save-not-a-list",
        add("lora[modules_to_save='lm_head', target_modules=['q_proj']]"),
        ConfigValueError,
        r"'modules_to_save' expects Optional\[list\[str\]\], got 'lm_head'",
        r"expects",
    ),
    case("dict-without-method", add({"r": 8}), ConfigError, r"got keys \['r'\]", r"needs a 'method' key"),
    case("not-a-config", add(42), UnknownMethodError, r"cannot use 42", r"config string such as 'lora\[r=8\]'"),
    case(
        "dropout-out-of-range",
        add("lora[lora_dropout=1.5, target_modules=['q_proj']]"),
        ConfigValueError,
        r"1\.5",
        r"between 0 and 1",
    ),
    case(
        "dropout-negative",
        add("lora[lora_dropout=-0.5, target_modules=['q_proj']]"),
        ConfigValueError,
        r"-0\.5",
        r"between 0 and 1",
    ),
    case(
        "ia3-feedforward-not-a-target",
        add("ia3[target_modules=['q_proj'], feedforward_modules=['down_proj']]"),
        ConfigValueError,
        r"down_proj",
        r"subset of `?target_modules",
        plugins=("ia3",),
    ),
    case(
        "adalora-without-total-step",
        add("adalora[target_modules=['q_proj']]"),
        ConfigValueError,
        r"total_step",
        r"supply a value|set it to",
        plugins=("adalora",),
    ),
    case(
        "adalora-schedule-without-budget",
        add("adalora[total_step=10, tinit=8, tfinal=5, target_modules=['q_proj']]"),
        ConfigValueError,
        r"'tinit': 8, 'tfinal': 5|tinit=8",
        r"[Dd]ecrease .*tfinal|increase .*total_step",
        plugins=("adalora",),
    ),
]

TARGETS = [
    case(
        "targets-match-nothing",
        add("lora[target_modules=['nope']]"),
        TargetError,
        r"\{'nope'\} not found",
        r"check the target modules",
    ),
    case(
        "target-regex-matches-nothing",
        add("lora[target_modules='.*nope.*']"),
        TargetError,
        r"\.\*nope\.\* not found",
        r"check the target modules",
    ),
    case(
        "target-unsupported-layer",
        add("lora[target_modules=['rotary_emb']]"),
        TargetError,
        r"LlamaRotaryEmbedding\(\) is not supported",
        r"only the following modules are supported: `torch\.nn\.Linear`",
    ),
    case(
        "target-unsupported-activation",
        add("lora[target_modules=['act_fn']]"),
        TargetError,
        r"SiLU\w*\(\) is not supported",
        r"only the following modules are supported",
    ),
    case(
        "target-invalid-regex",
        add("lora[target_modules='(']"),
        ConfigValueError,
        r"'target_modules'.*'\('",
        r"regular expression",
    ),
    case(
        "targets-all-excluded",
        add("lora[target_modules=['q_proj'], exclude_modules=['q_proj']]"),
        TargetError,
        r"No modules were targeted",
        r"check your `target_modules` and `exclude_modules`",
    ),
    case(
        "targets-layer-index-out-of-range",
        add("lora[target_modules=['q_proj'], layers_to_transform=[7]]"),
        TargetError,
        r"'layers_to_transform': \[7\]",
        r"check the target modules",
    ),
    case(
        "target-unsupported-on-plain-model",
        add("lora[target_modules=['blocks.0.1']]"),
        TargetError,
        r"ReLU\(\) is not supported",
        r"only the following modules are supported",
        model="mlp",
        setup=plain_mlp,
    ),
    case(
        "checkpoint-for-another-model",
        load_saved(),
        TargetError,
        r"'q_proj', 'v_proj'|'v_proj', 'q_proj'",
        r"check the target modules",
        model="mlp",
        setup=plain_mlp,
    ),
    case(
        "ia3-target-unsupported-layer",
        add("ia3[target_modules=['rotary_emb'], feedforward_modules=[]]"),
        TargetError,
        r"LlamaRotaryEmbedding\(\) is not supported",
        r"only `torch\.nn\.Linear`",
        plugins=("ia3",),
    ),
]

NAMES = [
    case("name-empty", add(GOOD, ""), AdapterNameError, r"adapter name '' is empty", r"use e\.g\. 'default'"),
    case("name-blank", add(GOOD, "   "), AdapterNameError, r"adapter name '   ' is empty", r"use e\.g\. 'default'"),
    case("name-with-dot", add(GOOD, "a.b"), AdapterNameError, r"'a\.b' contains '\.'", r"use e\.g\. 'default'"),
    case("name-with-slash", add(GOOD, "a/b"), AdapterNameError, r"'a/b' contains", r"use e\.g\. 'default'"),
    case("name-with-backslash", add(GOOD, "a\\b"), AdapterNameError, r"'a\\\\b' contains", r"use e\.g\. 'default'"),
    case("name-dotdot", add(GOOD, ".."), AdapterNameError, r"'\.\.' contains", r"use e\.g\. 'default'"),
    case(
        "name-reserved-base",
        add(GOOD, "__base__"),
        AdapterNameError,
        r"'__base__' is reserved",
        r"use e\.g\. 'default'",
    ),
    case(
        "name-surrounding-space",
        add(GOOD, " a"),
        AdapterNameError,
        r"' a' has leading or trailing",
        r"use e\.g\. 'default'",
    ),
    case("name-not-a-string", add(GOOD, 3), AdapterNameError, r"got 3 \(int\)", r"names are strings"),
    case("name-nul-byte", add(GOOD, "a\x00b"), AdapterNameError, r"control character such as NUL", r"folder names"),
    case("name-newline", add(GOOD, "a\nb"), AdapterNameError, r"control character", r"use e\.g\. 'default'"),
    case("name-too-long", add(GOOD, "a" * 300), AdapterNameError, r"longer than 128 bytes", r"folder names"),
    case("name-too-long-utf8", add(GOOD, "é" * 65), AdapterNameError, r"longer than 128 bytes", r"folder names"),
    case("name-moduledict-keys", add(GOOD, "keys"), AdapterNameError, r"'keys' is an attribute", r"ModuleDict"),
    case("name-moduledict-update", add(GOOD, "update"), AdapterNameError, r"'update' is an attribute", r"ModuleDict"),
    case("name-module-training", add(GOOD, "training"), AdapterNameError, r"'training' is an attribute", r"use e\.g\."),
    case("name-parameterdict-copy", add(GOOD, "copy"), AdapterNameError, r"'copy' is an attribute", r"ParameterDict"),
    case("name-keys-on-load", load_saved("keys"), AdapterNameError, r"'keys' is an attribute", r"use e\.g\. 'default'"),
    case("name-dotdot-on-load", load_saved(".."), AdapterNameError, r"'\.\.' contains", r"use e\.g\. 'default'"),
    case(
        "name-duplicate-add",
        add(GOOD, "one"),
        AdapterExistsError,
        r"'one' is already attached \(lora\)",
        r"pick another name or delete\('one'\)",
    ),
    case(
        "name-duplicate-load",
        load_saved("two"),
        AdapterExistsError,
        r"'two' is already attached",
        r"pick another name or delete\('two'\)",
    ),
    case(
        "name-duplicate-across-methods",
        add("ia3[target_modules=['v_proj'], feedforward_modules=[]]", "one"),
        AdapterExistsError,
        r"'one' is already attached \(lora\)",
        r"pick another name",
        plugins=("ia3",),
    ),
]

FILES = [
    case(
        "file-missing-folder",
        load(lambda w: str(w.tmp / "missing")),
        CheckpointNotFoundError,
        r"missing' is neither an existing local folder",
        r"valid Hub repo id \('owner/name'\)",
    ),
    case(
        # Shaped like a Hub repo id, but a path object means a local folder: the Hub is never asked.
        "file-missing-folder-path-object",
        load(lambda w: Path("adapters/mistyped")),
        CheckpointNotFoundError,
        r"adapter folder 'adapters/mistyped' does not exist",
        r"Hub repo id as a string",
    ),
    case(
        "file-missing-subfolder",
        load_saved(subfolder="nope"),
        CheckpointNotFoundError,
        r"nope' does not exist",
        r"subfolder='nope'",
    ),
    case(
        "file-missing-config",
        load_variant(drop=[CONFIG]),
        CheckpointNotFoundError,
        r"variant' has no adapter_config\.json",
        r"is it a peft adapter folder",
    ),
    case(
        "file-missing-weights",
        load_variant(drop=[WEIGHTS]),
        CheckpointNotFoundError,
        r"variant' has no adapter_model\.safetensors",
        r"allow_pickle=True",
    ),
    case(
        "file-truncated-weights",
        load_variant(raw=lambda b: b[: len(b) // 2]),
        CheckpointError,
        r"variant/adapter_model\.safetensors' is not a readable safetensors file",
        r"truncated or corrupt",
    ),
    case(
        "file-empty-weights",
        load_variant(raw=lambda b: b""),
        CheckpointError,
        r"variant/adapter_model\.safetensors' is not a readable",
        r"truncated or corrupt",
    ),
    case(
        "file-corrupt-header",
        load_variant(raw=lambda b: b"\xff" * 8 + b[8:]),
        CheckpointError,
        r"variant/adapter_model\.safetensors' is not a readable",
        r"truncated or corrupt",
    ),
    case(
        "file-config-not-json",
        load_variant(config=lambda c: json.dumps(c)[:-5]),
        CheckpointError,
        r"variant/adapter_config\.json'",
        r"line \d+ column \d+",
    ),
    case(
        "file-config-not-an-object",
        load_variant(config=lambda c: "[1, 2]"),
        CheckpointError,
        r"variant/adapter_config\.json'",
        r"does not hold a JSON object",
    ),
    case(
        "file-config-bad-value",
        load_variant(config=lambda c: {**c, "r": 0}),
        ConfigValueError,
        r"'r'.*got 0",
        r"positive integer",
    ),
    case(
        "file-wrong-shapes",
        load_variant(config=lambda c: {**c, "r": 8}),
        StateDictMismatchError,
        r"wrong shapes: model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight: checkpoint \(4, 32\) vs adapter \(8, 32\)",
        r"saved from this base model and matches its adapter_config\.json",
    ),
    case(
        "file-missing-key",
        load_variant(tensors=lambda t: {k: v for k, v in t.items() if k != A_KEY}),
        StateDictMismatchError,
        r"missing keys: model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight",
        r"saved from this base model",
    ),
    case(
        "file-extra-key",
        load_variant(tensors=lambda t: {**t, A_KEY.replace("q_proj", "k_proj"): torch.zeros(4, 32)}),
        StateDictMismatchError,
        r"unexpected keys: model\.layers\.0\.self_attn\.k_proj\.lora_A\.weight",
        r"saved from this base model",
    ),
    case(
        "file-config-targets-other-layers",
        load_variant(config=lambda c: {**c, "target_modules": ["k_proj", "o_proj"]}),
        StateDictMismatchError,
        r"missing keys: model\.layers\.0\.self_attn\.k_proj.*unexpected keys: model\.layers\.0\.self_attn\.q_proj",
        r"matches its adapter_config\.json",
    ),
    case(
        "file-integer-weights",
        load_variant(tensors=lambda t: {k: v.to(torch.int64) for k, v in t.items()}),
        StateDictMismatchError,
        r"int64",
        r"floating[- ]point",
    ),
    case(
        # A peft-written file (no adapterkit metadata) whose config names another method than its tensors.
        "file-config-method-disagrees-with-weights",
        load(
            lambda w: variant(
                w, config=lambda c: json.loads((w.saved["ia3"] / CONFIG).read_text()), metadata={"format": "pt"}
            )
        ),
        StateDictMismatchError,
        r"ia3 adapter 'new'.*missing keys: .*ia3_l.*unexpected keys: .*lora_A",
        r"matches its adapter_config\.json",
        plugins=("ia3",),
    ),
    case(
        "file-metadata-method-disagrees-with-weights",
        load_variant(metadata={"format": "pt", "adapterkit_method": "ia3"}),
        StateDictMismatchError,
        r"ia3 adapter 'new'.*unexpected keys: .*lora_A",
        r"matches its adapter_config\.json",
        plugins=("ia3",),
    ),
    case(
        "file-metadata-unknown-method",
        load_variant(metadata={"format": "pt", "adapterkit_method": "zzz"}),
        UnknownMethodError,
        r"'zzz'",
        r"installed methods: ",
    ),
    case(
        "file-config-unknown-peft-type",
        load_variant(config=lambda c: {**c, "peft_type": "FOO"}, metadata={"format": "pt"}),
        UnknownMethodError,
        r"'FOO'",
        r"installed methods: ",
    ),
    case(
        "file-pickle-without-opt-in",
        load(pickled),
        UnsafeCheckpointError,
        r"pickled' has only adapter_model\.bin",
        r"Convert it to adapter_model\.safetensors, or pass allow_pickle=True",
    ),
    case(
        "file-pickle-that-runs-code",
        load(lambda w: pickled(w, lambda t: {**t, "x": _RunsCode(w.tmp / "code-ran")}), allow_pickle=True),
        CheckpointError,
        r"pickled/adapter_model\.bin'",
        r"weights_only",
        check=no_marker,
    ),
    case(
        "state-dict-wrong-keys",
        lambda w: w.adapters.load(None, "new", config=GOOD, state_dict={"x.lora_A.weight": torch.zeros(2, 32)}),
        StateDictMismatchError,
        r"unexpected keys: x\.lora_A\.weight",
        r"saved from this base model",
    ),
    case(
        "load-without-source",
        lambda w: w.adapters.load(None, "new"),
        CheckpointError,
        r"needs a source",
        r"config= and state_dict=",
    ),
    case(
        "save-over-existing-folder",
        save_over_existing,
        CheckpointExistsError,
        r"out/two'\] already hold an adapter",
        r"pass overwrite=True",
        check=folder_unchanged,
    ),
    case(
        "save-into-a-file",
        save_into_file,
        CheckpointError,
        r"a-file",
        r"not a (folder|directory)",
    ),
    case(
        "save-folder-name-too-long",
        lambda w: w.adapters.save(w.tmp / ("x" * 300), "one"),
        SaveError,
        r"'[^']*/x{300}/one'",
        r"File name too long; use a shorter folder name",
    ),
    case(
        "save-unknown-adapter",
        lambda w: w.adapters.save(w.tmp / "out", ["one", "nope"]),
        UnknownAdapterError,
        r"'nope'",
        r"attached adapters: one, two",
        check=nothing_saved,
    ),
]

HUB = [
    case(
        "hub-404-unknown-repo",
        hub_load("user/missing"),
        CheckpointNotFoundError,
        r"'user/missing' was not found",
        r"token",
    ),
    case(
        "hub-401-private-without-token",
        hub_load(PRIVATE),
        CheckpointNotFoundError,
        r"'user/private' was not found",
        r"private and the token does not grant access",
    ),
    case(
        "hub-401-unknown-token",
        hub_load(PRIVATE, token=UNKNOWN_TOKEN),
        HubAccessError,
        r"'user/private'.*HTTP 401",
        r"check the token",
    ),
    case(
        "hub-gated-without-token",
        hub_load(GATED),
        HubAccessError,
        r"'user/gated' is gated",
        r"accept its terms on the Hub and pass a token",
    ),
    case(
        "hub-unknown-branch",
        hub_load(REPO, revision="no-such-branch"),
        CheckpointNotFoundError,
        r"'user/adapter' at revision 'no-such-branch'",
        r"check the branch, tag or commit",
    ),
    case(
        "hub-unknown-commit",
        hub_load(REPO, revision="0123456789abcdef0123456789abcdef01234567"),
        CheckpointNotFoundError,
        r"revision '0123456789abcdef0123456789abcdef01234567'",
        r"check the branch, tag or commit",
    ),
    case(
        "hub-missing-subfolder",
        hub_load(REPO, subfolder="adapters/missing"),
        CheckpointNotFoundError,
        r"adapters/missing",
        r"subfolder|no folder",
    ),
    case(
        "hub-fails-mid-download",
        cut_download,
        CheckpointError,
        r"'user/adapter'",
        r"try again",
    ),
    case(
        "hub-offline-without-cache",
        hub_load(REPO, local_files_only=True),
        CheckpointNotFoundError,
        r"'user/adapter' is not in the local cache",
        r"download it once while online or pass a local folder",
    ),
    case(
        "hub-down-without-cache",
        hub_down,
        CheckpointNotFoundError,
        r"'user/adapter'",
        r"download it once while online or pass a local folder",
    ),
    case(
        "hub-corrupt-weights",
        hub_corrupt_weights,
        CheckpointError,
        r"adapter_model\.safetensors' is not a readable safetensors file",
        r"truncated or corrupt",
    ),
    case(
        "hub-pickle-only",
        hub_pickle_only,
        CheckpointNotFoundError,
        r"'user/pickled' has no adapter_model\.safetensors",
        r"allow_pickle=True",
    ),
    case(
        "hub-invalid-repo-id",
        hub_load("not a repo id!"),
        CheckpointNotFoundError,
        r"'not a repo id!' is neither an existing local folder",
        r"valid Hub repo id \('owner/name'\)",
    ),
]
HUB = [Case(**{**c.__dict__, "hub": True, "setup": hub_repos}) for c in HUB]

OPERATIONS = [
    case(
        "set-active-unknown",
        call("set_active", "x"),
        UnknownAdapterError,
        r"no adapter named 'x'",
        r"attached adapters: one, two",
    ),
    case(
        "set-active-partly-unknown",
        call("set_active", ["one", "x"]),
        UnknownAdapterError,
        r"no adapter named 'x'",
        r"attached adapters: one, two",
    ),
    case(
        "set-active-repeated-name",
        call("set_active", ["one", "one"]),
        AdapterNameError,
        r"\['one', 'one'\]",
        r"once",
    ),
    case(
        "set-active-not-a-name",
        call("set_active", 3),
        AdapterNameError,
        r"\b3\b",
        r"adapter name or a list of names",
    ),
    case(
        "set-active-while-merged",
        call("set_active", "two"),
        AdapterStateError,
        r"while \['one'\] are merged",
        r"unmerge\(\) first",
        setup=merged,
    ),
    case(
        "delete-unknown",
        call("delete", "x"),
        UnknownAdapterError,
        r"no adapter named 'x'",
        r"attached adapters: one, two",
    ),
    case(
        "delete-merged",
        call("delete", "one"),
        AdapterStateError,
        r"adapter 'one' is merged",
        r"unmerge\(\) before deleting it",
        setup=merged,
    ),
    case(
        "training-step-negative",
        call("training_step", -1),
        errors.ArgumentValueError,
        r"got -1",
        r"integer >= 0",
    ),
    case(
        "training-step-not-an-int",
        call("training_step", "3"),
        errors.ArgumentValueError,
        r"got '3'",
        r"integer >= 0",
    ),
    case(
        "merge-twice",
        call("merge"),
        AdapterStateError,
        r"\['one'\] are already merged",
        r"unmerge\(\) first",
        setup=merged,
    ),
    case(
        "merge-unknown",
        call("merge", ["x"]),
        UnknownAdapterError,
        r"no adapter named 'x'",
        r"attached adapters: one, two",
    ),
    case(
        "merge-while-disabled",
        call("merge"),
        AdapterStateError,
        r"while adapters are disabled",
        r"enable\(\) first",
        setup=disabled,
    ),
    case(
        "merge-with-nothing-active",
        call("merge"),
        AdapterStateError,
        r"no adapter is active",
        r"name the adapters to merge",
        setup=(two, lambda w: w.adapters.set_active([])),
    ),
    case(
        "unmerge-with-nothing-merged",
        call("unmerge"),
        AdapterStateError,
        r"no adapter is merged",
        r"adapters\.merged|merge\(\)",
    ),
    case(
        "add-while-merged",
        add(GOOD, "three"),
        AdapterStateError,
        r"cannot attach 'three' while \['one'\] are merged",
        r"unmerge\(\) first",
        setup=merged,
    ),
    case(
        "load-while-merged",
        load_saved("three"),
        AdapterStateError,
        r"'three' while \['one'\] are merged",
        r"unmerge\(\) first",
        setup=merged,
    ),
    case(
        "per-sample-unknown-name",
        per_sample(["one", "x", "two"]),
        UnknownAdapterError,
        r"no adapter named 'x'",
        r"attached adapters: one, two",
    ),
    case(
        "per-sample-too-few-names",
        per_sample(["one", "two"]),
        PerSampleError,
        r"2 row names but the batch has 3 rows",
        r"one adapter name \(or '__base__'\) per row",
    ),
    case(
        "per-sample-too-many-names",
        per_sample(["one", "two", "__base__", "one"]),
        PerSampleError,
        r"4 row names but the batch has 3 rows",
        r"one adapter name \(or '__base__'\) per row",
    ),
    case(
        "per-sample-in-training-mode",
        per_sample(["one", "two", "one"]),
        AdapterStateError,
        r"per_sample is for inference",
        r"model\.eval\(\)",
        setup=training,
    ),
    case(
        "per-sample-over-the-budget",
        per_sample(["r1", "r2", "one"]),
        errors.BudgetError,
        r"max_adapters=1.*\['r1', 'r2'\]",
        r"raise the budget with limit\(\)",
        setup=(two, budget_of_one),
    ),
    case(
        "per-sample-a-string",
        per_sample("one"),
        AdapterNameError,
        r"got 'one'",
        r"list of adapter names, one per batch row",
    ),
    case("per-sample-empty", per_sample([]), AdapterNameError, r"got \[\]", r"non-empty list of adapter names"),
    case(
        "per-sample-while-merged",
        per_sample(["one", "two", "one"]),
        AdapterStateError,
        r"while \['one'\] are merged",
        r"unmerge\(\) first",
        setup=merged,
    ),
    case(
        "per-sample-while-disabled",
        per_sample(["one", "two", "one"]),
        AdapterStateError,
        r"while adapters are disabled",
        r"enable\(\) first",
        setup=disabled,
    ),
    case(
        "per-sample-dora",
        per_sample(["dora", "one", "two"]),
        UnsupportedOperationError,
        r"\['dora'\]",
        r"does not support DoRA",
        setup=with_dora,
    ),
    case(
        "per-sample-bias-adapter",
        per_sample(["biased", "one", "__base__", "one", "biased"]),
        UnsupportedOperationError,
        r"adapter 'biased'.*bias='lora_only'",
        r"run its rows as a batch of their own",
        setup=with_bias,
        model="mlp",
    ),
    case(
        "merge-peft-cannot",
        call("merge"),
        UnsupportedOperationError,
        r"into layer '1' \(NotImplementedError: Merging is not supported for _ConvNd layers with groups > 1",
        r"nothing is merged, the model is as it was",
        setup=grouped_conv,
    ),
    case(
        "per-sample-ia3-wrong-length",
        per_sample(["ia", "one"]),
        PerSampleError,
        r"2 row names but the batch has 3 rows",
        r"one adapter name \(or '__base__'\) per row",
        setup=with_ia3,
        plugins=("ia3",),
    ),
    case(
        "state-dict-ambiguous",
        call("state_dict"),
        AdapterStateError,
        r"with 2 active \(\['one', 'two'\]\)",
        r"name an adapter",
        setup=two_active,
    ),
    case(
        "state-dict-unknown",
        call("state_dict", "x"),
        UnknownAdapterError,
        r"no adapter named 'x'",
        r"attached adapters: one, two",
    ),
    case(
        "no-adapters-set-active",
        call("set_active", "one"),
        NoAdaptersError,
        r"cannot set_active",
        r"add\(\) or load\(\) one first",
        setup=bare,
    ),
    case(
        "no-adapters-merge",
        call("merge"),
        NoAdaptersError,
        r"cannot merge",
        r"add\(\) or load\(\) one first",
        setup=bare,
    ),
    case(
        "no-adapters-delete",
        call("delete", "one"),
        NoAdaptersError,
        r"no adapter named 'one'",
        r"add\(\) or load\(\) one first",
        setup=bare,
    ),
    case(
        "placement-without-device-map",
        load_saved(max_memory={"cpu": "1GB"}),
        ConfigValueError,
        r"\['max_memory'\]",
        r"only with device_map=",
    ),
]

# Hostile configs and weights (issue 14): types strict, numbers finite, sizes checked before anything is allocated.
def json_config(edit: Callable[[str], str]) -> Callable[[World], Any]:
    """Load the saved adapter with its adapter_config.json text edited (JSON tokens such as Infinity kept as written)."""

    def text(data: dict) -> str:
        written = json.dumps(data)
        edited = edit(written)
        assert edited != written, "the edit changed nothing"
        return edited

    return load_variant(config=text)


def nonfinite_weight(value: float) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    def change(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tensors[A_KEY][0, 0] = value
        return tensors

    return change


HOSTILE = [
    case(
        "rank-too-large-for-memory",
        add({"method": "lora", "r": 10**9, "target_modules": ["q_proj"]}),
        ConfigValueError,
        r"config key r=1000000000 would allocate .* GiB",
        r"more than the .* available; use a smaller rank",
    ),
    case(
        "rank-pattern-too-large-for-memory",
        add({"method": "lora", "r": 2, "target_modules": ["q_proj"], "rank_pattern": {"q_proj": 10**9}}),
        ConfigValueError,
        r"rank_pattern\['q_proj'\]=1000000000 would allocate",
        r"use a smaller rank",
    ),
    case(
        "rank-astronomical",
        add({"method": "lora", "r": 10**5000, "target_modules": ["q_proj"]}),
        ConfigValueError,
        r"r=<an int of 16610 bits> would allocate about 10\^\d+ TiB",
        r"use a smaller rank",
    ),
    case(
        "rank-5000-digits-in-a-string",
        add("lora[r=" + "7" * 5000 + "]"),
        ConfigSyntaxError,
        r"'lora\[r=7777.*\(5010 characters\): Exceeds the limit",
        r"values as Python literals",
    ),
    case(
        "rank-5000-digits-in-json",
        json_config(lambda t: t.replace('"r": 4', '"r": ' + "7" * 5000)),
        ConfigValueError,
        r"'r' expects int, got <a number with 5000 digits: 777777777777\.\.\.>",
        r"expects int",
    ),
    case(
        "rank-too-large-in-json",  # a load allocates nothing for the config: the file's shapes refuse it
        json_config(lambda t: t.replace('"r": 4', '"r": 1000000000')),
        StateDictMismatchError,
        r"checkpoint \(4, 32\) vs adapter \(1000000000, 32\)",
        r"matches its adapter_config\.json",
    ),
    case(
        "bool-as-string",
        add("lora[use_rslora='no', target_modules=['q_proj']]"),
        ConfigValueError,
        r"'use_rslora' expects bool, got 'no' \(str\)",
        r"expects bool",
    ),
    case(
        "bool-as-string-in-json",
        json_config(lambda t: t.replace('"use_rslora": false', '"use_rslora": "no"')),
        ConfigValueError,
        r"'use_rslora' expects bool, got 'no' \(str\)",
        r"expects bool",
    ),
    case(
        "alpha-infinity-in-json",
        json_config(lambda t: t.replace('"lora_alpha": 8', '"lora_alpha": Infinity')),
        ConfigValueError,
        r"'lora_alpha' expects int, got inf \(float\)",
        r"expects int",
    ),
    case(
        "alpha-overflowing-literal",
        add("lora[lora_alpha=1e999, target_modules=['q_proj']]"),
        ConfigValueError,
        r"'lora_alpha' expects int, got inf",
        r"expects int",
    ),
    case(
        "alpha-pattern-nan-in-json",
        json_config(lambda t: t.replace('"alpha_pattern": {}', '"alpha_pattern": {"q_proj": NaN}')),
        ConfigValueError,
        r"'alpha_pattern' must hold finite numbers, got \{'q_proj': nan\}",
        r"use a finite number",
    ),
    case(
        "dropout-nan",
        add({"method": "lora", "lora_dropout": float("nan"), "target_modules": ["q_proj"]}),
        ConfigValueError,
        r"'lora_dropout' must hold finite numbers, got nan",
        r"use a finite number",
    ),
    case(
        "targets-an-int",
        add("lora[target_modules=5]"),
        ConfigValueError,
        r"'target_modules' expects .*list\[str\].*, got 5 \(int\)",
        r"expects",
    ),
    case(
        "targets-an-int-in-json",
        json_config(lambda t: re.sub(r'"target_modules": \[[^\]]*\]', '"target_modules": 5', t)),
        ConfigValueError,
        r"'target_modules' expects .*, got 5 \(int\)",
        r"expects",
    ),
    case(
        "rank-pattern-a-list-in-json",
        json_config(lambda t: t.replace('"rank_pattern": {}', '"rank_pattern": [1, 2]')),
        ConfigValueError,
        r"'rank_pattern' expects Optional\[dict\], got \[1, 2\] \(list\)",
        r"expects",
    ),
    case(
        "weights-nan",
        load_variant(tensors=nonfinite_weight(float("nan"))),
        CheckpointError,
        r"hold NaN or infinite values \(" + re.escape(A_KEY) + r"\)",
        r"pass allow_nonfinite=True",
    ),
    case(
        "weights-infinity",
        load_variant(tensors=nonfinite_weight(float("-inf"))),
        CheckpointError,
        r"1 weight tensor\(s\) hold NaN or infinite values",
        r"pass allow_nonfinite=True",
    ),
    case(
        "name-lone-surrogate",
        add(GOOD, "a\ud800"),
        AdapterNameError,
        r"'a\\ud800' is not valid UTF-8 text",
        r"folder names",
    ),
]

CATALOGUE = CONFIG_STRINGS + TARGETS + NAMES + FILES + HUB + OPERATIONS + HOSTILE


def _params(case: Case) -> Any:
    missing = [p for p in case.plugins if p not in INSTALLED]
    marks = [pytest.mark.skip(reason=f"needs adapterkit-{', adapterkit-'.join(missing)}")] if missing else []
    return pytest.param(case, id=case.id, marks=marks)


# -- "exactly as it was" -------------------------------------------------------------------
class Snapshot:
    """Everything "the model is exactly as it was" means, adapters' bookkeeping included."""

    def __init__(self, w: World) -> None:
        model, adapters = w.model, w.adapters
        self.structure = str(model)
        self.modules = [(name, id(m), type(m)) for name, m in model.named_modules()]
        self.attributes = [(name, sorted(vars(m))) for name, m in model.named_modules()]
        self.params = [(n, p.detach().clone(), p.requires_grad, p.dtype, p.device) for n, p in model.named_parameters()]
        self.buffers = [(n, b.detach().clone()) for n, b in model.named_buffers()]
        self.training = [(name, m.training) for name, m in model.named_modules()]
        self.adapters = self._bookkeeping(adapters)
        self.output = run(model, w.x)

    @staticmethod
    def _bookkeeping(adapters: adapterkit.Adapters) -> tuple:
        return (
            adapters.names,
            adapters.active,
            adapters.merged,
            adapters.enabled,
            [(n, adapters.method(n).name, repr(adapters.config(n))) for n in adapters.names],
        )

    def assert_same(self, w: World) -> None:
        model = w.model
        assert str(model) == self.structure, "the module tree changed"
        assert [(name, id(m), type(m)) for name, m in model.named_modules()] == self.modules, "modules were replaced"
        assert [(name, sorted(vars(m))) for name, m in model.named_modules()] == self.attributes, (
            "module attributes changed"
        )
        params = list(model.named_parameters())
        assert [n for n, _ in params] == [n for n, *_ in self.params], "parameters were added or removed"
        for (name, value, requires_grad, dtype, device), (_, param) in zip(self.params, params, strict=True):
            assert torch.equal(param.detach(), value), f"{name} changed value"
            assert (param.requires_grad, param.dtype, param.device) == (requires_grad, dtype, device), name
        buffers = list(model.named_buffers())
        assert [n for n, _ in buffers] == [n for n, _ in self.buffers]
        same = all(torch.equal(b, old) for (_, b), (_, old) in zip(buffers, self.buffers, strict=True))
        assert same, "buffers changed"
        assert [(name, m.training) for name, m in model.named_modules()] == self.training, "train/eval mode changed"
        assert self._bookkeeping(w.adapters) == self.adapters, "names, active, merged, enabled or configs changed"
        assert torch.equal(run(model, w.x), self.output), "outputs changed"


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Adapters saved once by adapterkit, corrupted per case by :func:`variant`."""
    root = tmp_path_factory.mktemp("saved")
    folders = {}
    for key, spec, seed in (("lora", SAVED_SPEC, 1), ("ia3", IA3_SPEC, 2)):
        if spec.split("[")[0] not in INSTALLED:
            continue
        model = make_llama()
        torch.manual_seed(seed)
        adapterkit.attach(model).add(spec)
        adapterkit.attach(model).save(root / key)
        folders[key] = root / key
    return folders


@pytest.mark.parametrize("case", [_params(c) for c in CATALOGUE])
def test_bad_input_raises_a_typed_error_and_changes_nothing(
    case: Case, saved: dict[str, Path], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    model = fresh(case.model)
    w = World(model, llama_input() if case.model == "llama" else mlp_input(), tmp_path, saved)
    if case.hub:
        w.hub = request.getfixturevalue("hub")
    for step in case.setup if isinstance(case.setup, tuple) else (case.setup,):
        step(w)
    before = Snapshot(w)

    with warnings.catch_warnings(record=True) as caught, pytest.raises(Exception) as info:  # noqa: PT011
        warnings.simplefilter("always")
        case.act(w)  # the error's type is checked exactly below

    error = info.value
    assert type(error) is case.error, f"expected {case.error.__name__}, got {type(error).__name__}: {error}"
    assert isinstance(error, BUILTIN[case.error]), (
        f"{case.error.__name__} must also be a {BUILTIN[case.error].__name__}"
    )
    assert type(error).__name__ in errors.__all__
    message = str(error)
    assert re.search(case.names, message, re.DOTALL), f"the message does not name the value ({case.names!r}): {message}"
    assert re.search(case.fix, message, re.DOTALL), f"the message does not name the fix ({case.fix!r}): {message}"
    assert not any(secret in message or secret in repr(error) for secret in SECRETS), "a token leaks into the error"
    assert not any(secret in str(warning.message) for warning in caught for secret in SECRETS), (
        "a token leaks into a warning"
    )
    before.assert_same(w)
    if case.check is not None:
        case.check(w)


def test_the_catalogue_is_broad() -> None:
    """At least 40 distinct cases, covering every category the guarantees name."""
    ids = [c.id for c in CATALOGUE]
    assert len(ids) == len(set(ids)), "case ids repeat"
    assert len(ids) >= 40
    runnable = [c for c in CATALOGUE if set(c.plugins) <= INSTALLED]
    assert len(runnable) >= 40, "even with LoRA alone at least 40 cases run"
    for group in (CONFIG_STRINGS, TARGETS, NAMES, FILES, HUB, OPERATIONS):
        assert len(group) >= 5
    # Every class of the hierarchy that an input can trigger appears.
    raised = {c.error for c in CATALOGUE}
    expected = set(BUILTIN) - {PluginError}  # plugin errors come from the environment: see test_secrets.py
    assert expected <= raised, f"no case for {sorted(e.__name__ for e in expected - raised)}"


def test_every_documented_error_is_in_the_hierarchy() -> None:
    """errors.__all__, the BUILTIN table above and docs/guarantees.md list the same classes."""
    classes = {getattr(errors, name) for name in errors.__all__} - {AdapterkitError}
    assert classes == set(BUILTIN)
    for cls, builtin in BUILTIN.items():
        assert issubclass(cls, AdapterkitError) and issubclass(cls, builtin), cls
    doc = (Path(__file__).resolve().parents[2] / "docs" / "guarantees.md").read_text(encoding="utf-8")
    for cls, builtin in BUILTIN.items():
        row = next((line for line in doc.splitlines() if line.startswith(f"| `{cls.__name__}`")), None)
        assert row is not None, f"docs/guarantees.md has no row for {cls.__name__}"
        assert f"`{builtin.__name__}`" in row, f"docs/guarantees.md gives {cls.__name__} another builtin"


def test_key_errors_read_as_sentences() -> None:
    """KeyError subclasses print their sentence, not a quoted repr of it."""
    for cls in (UnknownMethodError, UnknownAdapterError):
        assert str(cls("no adapter named 'x'")) == "no adapter named 'x'"
