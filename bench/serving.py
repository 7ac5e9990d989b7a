"""Serving many adapters on one base model (issue 13): each measure side by side with its anchors, in one run.

    python bench/serving.py                      # every part (about 15 min on 2 busy cores)
    python bench/serving.py --part decode        # one part (or several: --part decode traffic)
    python bench/serving.py --quick              # smoke run: small model, few rounds (about 2 min)
    python bench/serving.py --report FILE.json   # the Markdown tables of a saved run (docs/benchmarks.md)

Parts (see docs/benchmarks.md, "Serving"):

* ``decode``: a decode step (batch 32 x 1 token) with 4, 8 and 32 distinct LoRA adapters through
  adapterkit's ``per_sample`` (on a model prepared with ``prepare_compiled``, which enables the
  batched path) vs the same batch through one active adapter vs peft's ``adapter_names=``; and a
  prefill (seq 128) the same way.
* ``compile``: ``torch.compile``: compilations while cycling 100 times through 32 adapters after the
  first compile (adapterkit unprepared and prepared, ``per_sample`` and ``swap`` under compile, peft's
  ``hotswap_adapter``); time per switch vs the eager ``set_active``; swap from a folder vs reading
  the file and copying its tensors.
* ``budget``: 1,000 registered adapters, a budget of 32, a Zipf(1.1) stream of per-sample batches.
* ``traffic``: 200 loads and deletes of inactive adapters in one thread while another runs forwards.

The serving features land in steps: a part (or case) whose API the code lacks says "not available"
(and why) instead of failing; a case that fails is recorded with its error, the rest still run.
Times are medians over interleaved rounds; ratios are medians of per-round paired ratios
(``bench/timing.py``). Writes ``bench/results/serving-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import logging
import random
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as bench_run

PARTS = ("decode", "compile", "budget", "traffic")
ADAPTERS = 32  # distinct adapters of the decode and compile parts (the batch of 32 distinct rows)


class NotAvailable(Exception):
    """The code under test lacks a serving API this case needs (reported, not a failure)."""


def api(obj: Any, name: str) -> Callable[..., Any]:
    """``obj.name``, or :class:`NotAvailable` naming what is missing."""
    found = getattr(obj, name, None)
    if found is None:
        raise NotAvailable(f"{type(obj).__name__}.{name} is missing")
    return found


@contextlib.contextmanager
def feature(what: str) -> Iterator[None]:
    """Turn a refusal of a missing feature (UnsupportedOperationError, a missing attribute) into NotAvailable."""
    from adapterkit import UnsupportedOperationError

    try:
        yield
    except NotAvailable:
        raise
    except (UnsupportedOperationError, NotImplementedError, AttributeError) as exc:
        raise NotAvailable(f"{what}: {type(exc).__name__}: {first_line(exc)}") from exc


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:240] if text else ""


# -- results -------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Part:
    """One part's results: table rows, targets, correctness checks, notes (what code path ran)."""

    name: str
    title: str = ""
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    targets: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    checks: dict[str, Any] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def row(
        self, case: str, seconds: float | None, ratios: dict[str, float | None] | None = None, **extra: Any
    ) -> None:
        self.rows.append({"case": case, "seconds": seconds, "ratios": ratios or {}, **extra})

    def timed_rows(self, timings: Any, cases: Sequence[tuple[Any, ...]], anchors: dict[str, str]) -> None:
        """A row per (case key, label[, own anchors]) with its median time and paired ratios to each anchor.

        ``anchors``: ratio label -> anchor case key, for every case that does not bring its own.
        """
        for key, label, *own in cases:
            if key not in timings.samples:
                continue
            anchors_ = own[0] if own else anchors
            ratios = {a: timings.ratio(key, ak) for a, ak in anchors_.items() if ak != key and ak in timings.samples}
            iqr = {a: timings.spread(key, ak) for a, ak in anchors_.items() if ak != key and ak in timings.samples}
            self.row(
                label, timings.median(key), ratios, iqr=iqr, error=timings.errors.get(key), samples=timings.samples[key]
            )

    def target(
        self, label: str, value: float | None, limit: float, *, detail: str = "", unit: str = "x", iqr=None
    ) -> None:
        met = None if value is None else value <= limit
        # A miss the spread of the paired ratios cannot tell from a pass (as report.mark_noise does for forwards).
        noise = bool(not met and value is not None and iqr and iqr[0] <= limit)
        self.targets.append(
            {
                "label": label,
                "value": value,
                "limit": limit,
                "met": met,
                "within_noise": noise,
                "unit": unit,
                "detail": detail,
            }
        )

    def missing(self, label: str, reason: str) -> None:
        self.targets.append({"label": label, "value": None, "limit": None, "met": None, "unit": "", "detail": reason})


def fmt_value(value: float | None, unit: str) -> str:
    from report import fmt_ratio, fmt_seconds

    if value is None:
        return "-"
    if unit == "x":
        return fmt_ratio(value)
    if unit == "s":
        return fmt_seconds(value)
    if unit == "abs":
        return f"{value:.1e}"
    if unit == "MiB":
        return f"{value:.1f} MiB"
    return f"{value:g}{(' ' + unit) if unit else ''}"


def target_status(t: dict[str, Any]) -> str:
    if t.get("anchor"):
        return "anchor (no target)"
    if t["value"] is None:
        return "not available" if t.get("limit") is None else "no value"
    if t["met"]:
        return "met"
    return "within noise" if t.get("within_noise") else "MISSED"


def part_tables(part: dict[str, Any], markdown: bool) -> str:
    from report import fmt_ratio, fmt_seconds

    def table(header: list[str], body: list[list[str]]) -> list[str]:
        if markdown:
            return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
                "| " + " | ".join(r) + " |" for r in body
            ]
        widths = [max(len(str(r[i])) for r in [header, *body]) for i in range(len(header))]
        widths = [min(w, 70) for w in widths]
        lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
        return lines + ["  ".join(str(v)[:w].ljust(w) for v, w in zip(r, widths)) for r in body]

    out = [("### " if markdown else "== ") + (part.get("title") or part["name"])]
    for note in part["notes"]:
        out.append(("- " if markdown else "   ") + note)
    if part["rows"]:
        out.append("")
        body = []
        for r in part["rows"]:
            time_ = (
                "error"
                if r.get("error")
                else fmt_seconds(r["seconds"])
                if r["seconds"] is not None
                else r.get("value", "-")
            )
            ratios = "; ".join(f"{fmt_ratio(v)} {k}" for k, v in r["ratios"].items() if v is not None)
            body.append([r["case"], str(time_), ratios])
        out += table(["case", "time", "ratio"], body)
    if part["targets"]:
        out.append("")
        body = [
            [
                t["label"],
                fmt_value(t["value"], t.get("unit", "x")),
                "" if t.get("limit") is None or t.get("anchor") else f"<= {fmt_value(t['limit'], t.get('unit', 'x'))}",
                target_status(t),
                t.get("detail", ""),
            ]
            for t in part["targets"]
        ]
        out += table(["target", "measured", "limit", "status", "detail"], body)
    errors = [f"{r['case']}: {r['error']}" for r in part["rows"] if r.get("error")]
    if errors:
        out += ["", "errors (recorded, not fatal):", *("  " + e for e in errors)]
    return "\n".join(out)


# -- the workload ---------------------------------------------------------------------------------------------
class Workload:
    """Base models (one per size, built once) and saved adapter folders, shared by the parts of one run."""

    def __init__(self) -> None:
        from workload import make_workdir

        self.root = make_workdir()
        self.bases: dict[str, Any] = {}
        self.saved: dict[tuple[str, str], list[Path]] = {}

    def base(self, size_name: str) -> Any:
        from workload import SIZES, build_base, param_count

        if size_name not in self.bases:
            start = time.perf_counter()
            self.bases[size_name] = build_base(SIZES[size_name])
            bench_run.log(
                f"{size_name}: {SIZES[size_name].describe()} ({param_count(self.bases[size_name]) / 1e6:.0f}M "
                f"parameters), built in {time.perf_counter() - start:.1f} s"
            )
            gc.collect()
            gc.freeze()  # the base model's objects belong to no system: keep them out of later collections
        return self.bases[size_name]

    def lora(self, size_name: str, count: int) -> list[Path]:
        """``count`` distinct LoRA adapters (the workload's: r=16, alpha 32 on the 7 projections), saved by peft."""
        from workload import write_adapters

        key = (size_name, "lora")
        if len(self.saved.get(key, [])) < count:
            start = time.perf_counter()
            self.saved[key] = write_adapters(self.base(size_name), "lora", count, root=self.root / size_name)
            bench_run.log(f"{size_name}: wrote {count} LoRA adapters in {time.perf_counter() - start:.1f} s")
        return self.saved[key][:count]

    def narrow(self, size_name: str) -> Path:
        """One LoRA adapter on q_proj and v_proj only (r=8): the traffic part's live adapter."""
        from peft import LoraConfig

        key = (size_name, "narrow")
        if key not in self.saved:
            config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
            self.saved[key] = [save_random(self.base(size_name), config, self.root / size_name / "narrow", seed=3)]
        return self.saved[key][0]

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def save_random(base: Any, config: Any, folder: Path, seed: int) -> Path:
    """Save one adapter of ``config`` with random non-zero weights (peft's save_pretrained)."""
    import torch
    from peft import get_peft_model
    from workload import clone

    model = get_peft_model(clone(base), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in (p for p in model.parameters() if p.requires_grad):
            param.copy_(0.02 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(str(folder))
    return folder


def forward(model: Any, ids: Any, **kwargs: Any) -> Any:
    """One inference forward; the logits of the last position only (what a server computes)."""
    import torch

    with torch.no_grad():
        return model(input_ids=ids, use_cache=False, logits_to_keep=1, **kwargs).logits


def max_diff(a: Any, b: Any) -> float:
    return float((a - b).abs().max())


def adapterkit_model(base: Any, folders: Sequence[Path], names: Sequence[str]) -> Any:
    """An adapterkit driver (own clone of ``base``) with ``folders`` loaded as ``names``, the first one active."""
    from systems import AdapterkitDriver

    driver = AdapterkitDriver(base)
    for folder, name in zip(folders, names):
        driver.adapters.load(str(folder), name, activate=False)
    driver.adapters.set_active(names[0])
    return driver


def peft_model(base: Any, folders: Sequence[Path], names: Sequence[str]) -> Any:
    from systems import PeftDriver

    driver = PeftDriver(base)
    for folder, name in zip(folders, names):
        driver.load(folder, name)
    driver.set_active(names[0], trainable=False)
    return driver


def prepare(driver: Any, part: Part, max_adapters: int) -> bool:
    """``prepare_compiled`` on the driver's model; False (and a note) where the code has no such path yet."""
    try:
        with feature("prepare_compiled"):
            api(driver.adapters, "prepare_compiled")(max_rank=16, max_adapters=max_adapters)
    except NotAvailable as exc:
        part.notes.append(f"prepared model not available ({exc}); the per-sample cases run on the unprepared model")
        return False
    return True


# -- 1. decode and prefill ---------------------------------------------------------------------------------------
def part_decode(work: Workload, args: argparse.Namespace) -> Part:
    from timing import Case, interleaved
    from workload import SIZES, input_ids

    size = SIZES[args.size]
    part = Part(
        "decode", f"decode step and prefill, many adapters per batch ({size.name} model, LoRA r=16 on 7 projections)"
    )
    base = work.base(size.name)
    folders = work.lora(size.name, ADAPTERS)
    names = [f"s{i}" for i in range(ADAPTERS)]
    plain = adapterkit_model(base, folders, names)  # peft's layers, unprepared: the one-adapter anchor
    peft = peft_model(base, folders, names)
    prepared = adapterkit_model(base, folders, names)
    batched = prepare(prepared, part, ADAPTERS)
    if not batched:
        prepared = plain
    part.notes.append(
        "per_sample on a model prepared with prepare_compiled(max_rank=16, max_adapters=32) (the batched path)"
        if batched
        else "per_sample on the unprepared model (peft's layers; adapterkit's grouped per-adapter path)"
    )
    part.checks["batched path"] = batched

    def mixed(driver: Any, rows: list[str], ids: Any) -> Callable[[], Any]:
        def op() -> Any:
            with driver.adapters.per_sample(rows):
                return forward(driver.model, ids)

        return op

    def peft_mixed(rows: list[str], ids: Any) -> Callable[[], Any]:
        return lambda: forward(peft.peft_model, ids, adapter_names=rows)

    # Decode: batch 32 x 1 token, rows interleaved over k adapters (row i -> adapter i % k).
    ids = input_ids(size, 32, 1, seed=11)
    cases = [Case("base", lambda: forward(base, ids)), Case("one", lambda: forward(plain.model, ids))]
    labels = [("base", "base model, no adapter"), ("one", "one adapter for all 32 rows (peft layers, one active)")]
    if batched:
        cases.append(Case("one_prepared", lambda: forward(prepared.model, ids)))
        labels.append(("one_prepared", "one adapter for all 32 rows, prepared model"))
    for k in (4, 8, ADAPTERS):
        rows = [names[i % k] for i in range(32)]
        cases.append(Case(f"ak{k}", mixed(prepared, rows, ids)))
        labels.append(
            (f"ak{k}", f"{k} distinct, adapterkit per_sample", {"vs one adapter": "one", "vs peft": f"peft{k}"})
        )
        cases.append(Case(f"peft{k}", peft_mixed(rows, ids)))
        labels.append((f"peft{k}", f"{k} distinct, peft adapter_names="))
    rows32 = [names[i % ADAPTERS] for i in range(32)]
    if batched:
        cases.append(Case("ak32_plain", mixed(plain, rows32, ids)))
        labels.append(("ak32_plain", "32 distinct, adapterkit per_sample, unprepared model"))
    expected = forward(peft.peft_model, ids, adapter_names=rows32)
    part.checks["decode: max |adapterkit per_sample - peft adapter_names| (32 distinct)"] = max_diff(
        mixed(prepared, rows32, ids)(), expected
    )
    bench_run.log(f"decode: {len(cases)} cases x {args.rounds} rounds")
    timings = interleaved(cases, args.rounds)
    part.timed_rows(timings, labels, {"vs one adapter": "one"})
    part.target(
        "decode, 32 distinct: per_sample <= 1.3x one adapter for all rows",
        timings.ratio(f"ak{ADAPTERS}", "one"),
        1.3,
        iqr=timings.spread(f"ak{ADAPTERS}", "one"),
    )
    part.target(
        "decode, 32 distinct: per_sample <= 0.25x peft adapter_names=",
        timings.ratio(f"ak{ADAPTERS}", f"peft{ADAPTERS}"),
        0.25,
        iqr=timings.spread(f"ak{ADAPTERS}", f"peft{ADAPTERS}"),
        detail=f"the base model alone takes {fmt_value(timings.ratio('base', f'peft{ADAPTERS}'), 'x')} peft's time "
        "(no per-sample path can go below it)",
    )

    # Prefill: batch B x 128 tokens, a distinct adapter per row (B = --prefill-batch; 32 x 128 costs ~30 s a forward here).
    batch = args.prefill_batch
    ids = input_ids(size, batch, 128, seed=12)
    rows = [names[i % ADAPTERS] for i in range(batch)]
    cases = [
        Case("one", lambda: forward(plain.model, ids)),
        Case("ak", mixed(prepared, rows, ids)),
        Case("peft", peft_mixed(rows, ids)),
    ]
    part.checks[f"prefill: max |adapterkit per_sample - peft adapter_names| ({batch} distinct)"] = max_diff(
        mixed(prepared, rows, ids)(), forward(peft.peft_model, ids, adapter_names=rows)
    )
    prefill_rounds = max(1, args.rounds - 2)
    bench_run.log(f"prefill: {len(cases)} cases x {prefill_rounds} rounds")
    timings = interleaved(cases, prefill_rounds)
    part.timed_rows(
        timings,
        [
            ("one", f"prefill {batch}x128, one adapter for all rows"),
            ("ak", f"prefill {batch}x128, {batch} distinct, adapterkit per_sample"),
            ("peft", f"prefill {batch}x128, {batch} distinct, peft adapter_names="),
        ],
        {"vs one adapter": "one", "vs peft": "peft"},
    )
    part.target(
        f"prefill (seq 128), {batch} distinct: per_sample <= 1.1x one adapter",
        timings.ratio("ak", "one"),
        1.1,
        iqr=timings.spread("ak", "one"),
    )
    for label, diff in part.checks.items():
        if label.startswith(("decode: max", "prefill: max")):
            part.target(
                label.split(":")[0] + ": per_sample equals peft's adapter_names= (max abs diff)", diff, 1e-5, unit="abs"
            )
    part.notes.append(
        f"decode: batch 32 x 1 token, row i -> adapter i % k; prefill: batch {batch} x 128 tokens; forwards compute the "
        "last position's logits (logits_to_keep=1); every per_sample case opens its block per step"
    )
    return part


# -- 2. compile ------------------------------------------------------------------------------------------------------
class CountingBackend:
    """A torch.compile backend that counts its calls (one per graph compiled) and runs the graph eagerly."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, gm: Any, example_inputs: Any) -> Any:
        self.calls += 1
        return gm.forward


def cycle_compiled(
    model: Any, switch: Callable[[int], Any], ids: Any, refs: dict[Any, Any], cycles: int, warm: int = 0
) -> dict[str, Any]:
    """Compile ``model`` with a counting backend, run once, then ``cycles`` times: ``switch(i)`` and a forward.

    ``switch`` returns the key of ``refs`` that holds the eager output for the forward that follows.
    ``warm``: also count the compilations after the first ``warm`` steps (one step of each kind, say).
    """
    import torch

    torch._dynamo.reset()
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    name = switch(-1)  # the starting state (an adapter, a per_sample block) before the first compile
    worst = max_diff(forward(compiled, ids), refs[name])
    first = backend.calls
    start = time.perf_counter()
    warmed = None
    for i in range(cycles):
        if i == warm:
            warmed = backend.calls
        name = switch(i)
        worst = max(worst, max_diff(forward(compiled, ids), refs[name]))
    elapsed = time.perf_counter() - start
    limit = torch._dynamo.config.recompile_limit
    return {
        "first_compile_graphs": first,
        "compiles_after_first": backend.calls - first,
        "compiles_after_warmup": None if not warm or warmed is None else backend.calls - warmed,
        "warmup_steps": warm,
        "max_abs_diff_vs_eager": worst,
        "seconds": elapsed,
        "recompile_limit": limit,
    }


def part_compile(work: Workload, args: argparse.Namespace) -> Part:
    import torch
    from measures import _calibrated
    from safetensors.torch import load_file
    from timing import Case, interleaved
    from workload import SIZES, input_ids

    size = SIZES[args.compile_size]
    part = Part(
        "compile", f"torch.compile: switching and swapping ({size.name} model, LoRA r=16 on 7 projections, 32 adapters)"
    )
    base = work.base(size.name)
    folders = work.lora(size.name, ADAPTERS)
    names = [f"s{i}" for i in range(ADAPTERS)]
    ids = input_ids(size, 1, 8, seed=13)
    cycles = args.cycles
    eager = adapterkit_model(base, folders, names)
    refs = {}
    for name in names:
        eager.adapters.set_active(name)
        refs[name] = forward(eager.model, ids)
    eager.adapters.set_active(names[0])

    def set_active_cycle(adapters: Any) -> Callable[[int], str]:
        def switch(i: int) -> str:
            name = names[(i + 1) % ADAPTERS]
            adapters.set_active(name)
            return name

        return switch

    def report_cycle(label: str, result: dict[str, Any] | None, reason: str = "", anchor: bool = False) -> None:
        if result is None:
            part.missing(f"{label}: compilations after the first", reason)
            return
        # torch's limit counts every compile of a frame, the first included
        hit_limit = result["compiles_after_first"] >= result["recompile_limit"] - 1
        detail = (
            f"first compile: {result['first_compile_graphs']} graph(s); outputs vs eager max abs diff "
            f"{result['max_abs_diff_vs_eager']:.1e}"
            + (
                f"; after the first {result['warmup_steps']} steps (one of each kind): {result['compiles_after_warmup']}"
                if result.get("compiles_after_warmup") is not None
                else ""
            )
            + (
                f"; torch's recompile limit ({result['recompile_limit']}) reached: the rest ran uncompiled"
                if hit_limit
                else ""
            )
        )
        part.checks[label] = result
        part.target(f"{label}: compilations after the first", result["compiles_after_first"], 0, unit="", detail=detail)
        if anchor:  # the problem the prepared path solves: shown, not a target
            part.targets[-1].update(anchor=True, met=None)

    bench_run.log(f"compile: cycling {cycles} times through {ADAPTERS} adapters (counting backend)")
    # As a new user would: compile the model as it is and switch.
    model = eager.model
    report_cycle(
        f"adapterkit unprepared, {cycles} set_active",
        cycle_compiled(model, set_active_cycle(eager.adapters), ids, refs, cycles),
        anchor=True,
    )
    eager.adapters.set_active(names[0])

    prepared = adapterkit_model(base, folders, names)
    ready = prepare(prepared, part, ADAPTERS)
    why = "" if ready else "prepare_compiled is not available in this code"
    if ready:
        report_cycle(
            f"adapterkit prepared, {cycles} set_active",
            cycle_compiled(prepared.model, set_active_cycle(prepared.adapters), ids, refs, cycles),
        )
    else:
        report_cycle(f"adapterkit prepared, {cycles} set_active", None, why)

    # per_sample under compile: batches of 4 rows drawn from the 32 adapters; eager per_sample outputs as reference.
    rng = random.Random(5)
    ids4 = input_ids(size, 4, 8, seed=14)
    batches = [[names[rng.randrange(ADAPTERS)] for _ in range(4)] for _ in range(max(4, cycles // 5 + 1))]
    if ready:
        mixed_refs = {}
        for rows in batches:
            with eager.adapters.per_sample(rows):
                mixed_refs[tuple(rows)] = forward(eager.model, ids4)
        blocks: list[Any] = []

        def per_sample_switch(i: int) -> tuple[str, ...]:
            if blocks:
                blocks.pop().__exit__(None, None, None)
            rows = batches[(i + 1) % len(batches)]
            block = prepared.adapters.per_sample(rows)
            block.__enter__()
            blocks.append(block)
            return tuple(rows)

        try:
            prepared.adapters.set_active(names[0])
            result = cycle_compiled(prepared.model, per_sample_switch, ids4, mixed_refs, len(batches) - 1)
            report_cycle(f"adapterkit prepared, {len(batches) - 1} per_sample batches", result)
        except Exception as exc:  # noqa: BLE001 (reported)
            part.missing("adapterkit prepared, per_sample under compile", f"{type(exc).__name__}: {first_line(exc)}")
        finally:
            while blocks:
                blocks.pop().__exit__(None, None, None)
    else:
        part.missing("adapterkit prepared, per_sample batches: compilations after the first", why)

    # What a server does: set_active of one adapter, a weighted pair and per_sample batches, in turn.
    if ready:
        step_refs: dict[int, Any] = {}
        open_blocks: list[Any] = []

        def mixed_switch(i: int) -> int:
            while open_blocks:
                open_blocks.pop().__exit__(None, None, None)
            kind, pick = (i + 1) % 3, names[(i + 1) % ADAPTERS]
            for adapters in (eager.adapters, prepared.adapters):  # the eager model gives the reference
                if kind == 0:
                    adapters.set_active(pick)
                elif kind == 1:
                    adapters.set_active([pick, names[(i + 7) % ADAPTERS]], weights=[1.0, 0.5])
                else:
                    block = adapters.per_sample(batches[(i + 1) % len(batches)])
                    block.__enter__()
                    open_blocks.append(block)
                if adapters is eager.adapters:
                    step_refs[i] = forward(eager.model, ids4)
                    while open_blocks:
                        open_blocks.pop().__exit__(None, None, None)
            return i

        try:
            result = cycle_compiled(prepared.model, mixed_switch, ids4, step_refs, cycles, warm=3)
            report_cycle(
                f"adapterkit prepared, {cycles} steps of set_active, weighted pairs, per_sample in turn", result
            )
        except Exception as exc:  # noqa: BLE001 (reported)
            part.missing("adapterkit prepared, mixed steps under compile", f"{type(exc).__name__}: {first_line(exc)}")
        finally:
            while open_blocks:
                open_blocks.pop().__exit__(None, None, None)
            eager.adapters.set_active(names[0])
            prepared.adapters.set_active(names[0])

    # swap under compile: the active adapter's weights replaced from each folder in turn.
    swapper = prepared if ready else eager
    swapper.adapters.set_active(names[0])
    in_place = swapper.adapters.registry.implements(swapper.adapters.method(names[0]), "adapterkit_swap")
    swap_kind = (
        "in place (the plugin's adapterkit_swap)" if in_place else "delete + load (no adapterkit_swap in this code)"
    )
    part.notes.append(f"adapterkit swap: {swap_kind}, on the {'prepared' if ready else 'unprepared'} model")

    def swap_cycle(i: int) -> str:
        index = (i + 1) % ADAPTERS
        if i >= 0:
            swapper.adapters.swap(str(folders[index]), names[0])
        return names[index if i >= 0 else 0]

    try:
        with feature("swap"):
            result = cycle_compiled(swapper.model, swap_cycle, ids, refs, cycles)
        report_cycle(f"adapterkit {'prepared' if ready else 'unprepared'}, {cycles} swaps", result)
    except NotAvailable as exc:
        report_cycle(f"adapterkit, {cycles} swaps", None, str(exc))
    swapper.adapters.swap(str(folders[0]), names[0])

    # peft's hot-swap: prepare_model_for_compiled_hotswap, then hotswap_adapter from each folder.
    from peft import PeftModel
    from peft.utils.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
    from workload import clone

    hot = PeftModel.from_pretrained(clone(base), str(folders[0]), adapter_name="default")
    hot.eval()
    prepare_model_for_compiled_hotswap(hot, target_rank=16)

    def hotswap_cycle(i: int) -> str:
        index = (i + 1) % ADAPTERS
        if i >= 0:
            hotswap_adapter(hot, str(folders[index]), adapter_name="default")
        return names[index if i >= 0 else 0]

    report_cycle(f"peft hotswap_adapter, {cycles} swaps", cycle_compiled(hot, hotswap_cycle, ids, refs, cycles))
    hotswap_adapter(hot, str(folders[0]), adapter_name="default")
    torch._dynamo.reset()

    # Times: set_active (eager, unprepared) vs set_active on the prepared model; swap vs file read + copy.
    state = {"eager": 0, "prepared": 0, "swap": 0, "hot": 0, "floor": 0}

    def cycle_set_active(key: str, adapters: Any) -> Callable[[], None]:
        def op() -> None:
            state[key] = (state[key] + 1) % ADAPTERS
            adapters.set_active(names[state[key]])

        return op

    files = [folder / "adapter_model.safetensors" for folder in folders]
    destination = {k: torch.empty_like(v) for k, v in load_file(str(files[0])).items()}

    def floor() -> None:
        state["floor"] = (state["floor"] + 1) % ADAPTERS
        for key, tensor in load_file(str(files[state["floor"]])).items():
            destination[key].copy_(tensor)

    def swap_op() -> None:
        state["swap"] = (state["swap"] + 1) % ADAPTERS
        swapper.adapters.swap(str(folders[state["swap"]]), names[0])

    def hot_op() -> None:
        state["hot"] = (state["hot"] + 1) % ADAPTERS
        hotswap_adapter(hot, str(folders[state["hot"]]), adapter_name="default")

    cases = [_calibrated(Case("eager", cycle_set_active("eager", eager.adapters)))]
    if ready:
        cases.append(_calibrated(Case("prepared", cycle_set_active("prepared", prepared.adapters))))
    cases += [Case("floor", floor), Case("swap", swap_op), Case("hot", hot_op)]
    rounds = max(3, args.rounds)
    bench_run.log(f"compile: switch and swap times, {len(cases)} cases x {rounds} rounds")
    timings = interleaved(cases, rounds)
    part.timed_rows(
        timings,
        [
            ("eager", "set_active, eager model (unprepared)", {}),
            ("prepared", "set_active, prepared model", {"vs eager set_active": "eager"}),
            ("floor", "read the adapter file + copy its tensors (floor)", {}),
            (
                "swap",
                f"adapterkit swap from a folder ({'in place' if in_place else 'delete + load'})",
                {"vs floor": "floor", "vs peft hotswap": "hot"},
            ),
            ("hot", "peft hotswap_adapter from a folder", {"vs floor": "floor"}),
        ],
        {},
    )
    if ready:
        part.target(
            "time per switch on the prepared model <= 1.5x eager set_active",
            timings.ratio("prepared", "eager"),
            1.5,
            iqr=timings.spread("prepared", "eager"),
        )
    else:
        part.missing("time per switch on the prepared model <= 1.5x eager set_active", why)
    part.target(
        "swap from a folder <= 1.2x reading the file and copying its tensors",
        timings.ratio("swap", "floor"),
        1.2,
        iqr=timings.spread("swap", "floor"),
        detail=f"adapterkit swap {swap_kind}; peft hotswap_adapter {fmt_value(timings.ratio('hot', 'floor'), 'x')} the floor",
    )

    # Compiled forwards with the timing backend: right after a switch vs with no switch (a hidden recompile or
    # guard failure would show here).
    if ready and args.backend != "none":
        try:
            compiled_forward_rows(part, prepared, names, ids, args, rounds)
        except Exception as exc:  # noqa: BLE001 (reported)
            part.notes.append(
                f"compiled forward timing ({args.backend}) failed: {type(exc).__name__}: {first_line(exc)}"
            )
    part.notes.append(
        f"compilations counted with a counting backend (eager execution), {cycles} switches after the first compiled "
        f"forward; forward 1x8 tokens; outputs compared with the eager model after every switch"
    )
    return part


def compiled_forward_rows(
    part: Part, driver: Any, names: list[str], ids: Any, args: argparse.Namespace, rounds: int
) -> None:
    import torch
    from timing import Case, interleaved

    torch._dynamo.reset()
    compiled = torch.compile(driver.model, backend=args.backend)
    start = time.perf_counter()
    forward(compiled, ids)
    part.notes.append(f"first compiled forward ({args.backend} backend): {time.perf_counter() - start:.1f} s")
    state = {"i": 0}

    def switched() -> None:
        state["i"] = (state["i"] + 1) % ADAPTERS
        driver.adapters.set_active(names[state["i"]])
        forward(compiled, ids)

    switched()  # the first switch outside the timing
    cases = [
        Case("eager_fwd", lambda: forward(driver.model, ids)),
        Case("compiled", lambda: forward(compiled, ids)),
        Case("switched", switched),
    ]
    timings = interleaved(cases, rounds)
    part.timed_rows(
        timings,
        [
            ("eager_fwd", "forward 1x8, prepared model, eager"),
            ("compiled", f"forward 1x8, compiled ({args.backend}), no switch"),
            ("switched", f"set_active + forward 1x8, compiled ({args.backend})"),
        ],
        {"vs compiled, no switch": "compiled", "vs eager": "eager_fwd"},
    )
    torch._dynamo.reset()


# -- 3. budget ------------------------------------------------------------------------------------------------------
def write_tiny(base: Any, count: int, root: Path) -> list[Path]:
    """``count`` small LoRA adapters (r=8 on q_proj and v_proj) with distinct random weights.

    One is saved by peft (config and key names); the others reuse its config and get their own tensors.
    """
    import torch
    from peft import LoraConfig
    from safetensors.torch import load_file, save_file

    first = save_random(
        base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]), root / "tiny_0", seed=7
    )
    template = load_file(str(first / "adapter_model.safetensors"))
    generator = torch.Generator().manual_seed(8)
    folders = [first]
    for index in range(1, count):
        folder = root / f"tiny_{index}"
        folder.mkdir(parents=True)
        shutil.copy(first / "adapter_config.json", folder / "adapter_config.json")
        tensors = {k: 0.02 * torch.randn(v.shape, generator=generator) for k, v in template.items()}
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        folders.append(folder)
    return folders


def adapter_bytes(model: Any) -> int:
    """Bytes of every LoRA tensor held by the model (what the resident adapters occupy)."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)


def zipf_stream(count: int, batches: int, rows: int, s: float, seed: int) -> list[list[int]]:
    """Batches of adapter indices: rank r drawn with probability ~ 1/r^s, ranks shuffled over the adapters."""
    rng = random.Random(seed)
    order = list(range(count))
    rng.shuffle(order)
    weights = [1.0 / (rank + 1) ** s for rank in range(count)]
    return [[order[r] for r in rng.choices(range(count), weights=weights, k=rows)] for _ in range(batches)]


def part_budget(work: Workload, args: argparse.Namespace) -> Part:
    import torch
    from safetensors.torch import load_file
    from systems import AdapterkitDriver
    from timing import Case, interleaved, once
    from workload import SIZES, input_ids

    size = SIZES["small"]
    count, budget = args.registered, 32
    part = Part(
        "budget",
        f"memory budget: {count} registered adapters, budget {budget}, Zipf(1.1) per-sample stream "
        f"({size.name} model, LoRA r=8 on q_proj and v_proj)",
    )
    base = work.base(size.name)
    served = AdapterkitDriver(base)
    try:
        register, limit = api(served.adapters, "register"), api(served.adapters, "limit")
        stats = api(served.adapters, "stats")
        type(served.adapters).resident  # noqa: B018 (the property must exist)
    except (NotAvailable, AttributeError) as exc:
        reason = f"the budget API is not available in this code ({exc})"
        part.notes.append(reason)
        for label in ("registering", "resident memory", "a miss", "hits"):
            part.missing(label, reason)
        return part
    start = time.perf_counter()
    folders = write_tiny(base, count, work.root / "tiny")
    bench_run.log(f"budget: wrote {count} adapters in {time.perf_counter() - start:.1f} s")
    names = [f"t{i}" for i in range(count)]
    one = adapter_bytes_of(folders[0])
    part.notes.append(
        f"small adapters keep {count} folders on disk sane: {one / 2**10:.0f} KiB each, "
        f"{count * one / 2**20:.0f} MiB in all; each batch: 8 rows x 1 token"
    )

    seconds = once(lambda: [register(str(folder), name) for folder, name in zip(folders, names)])
    part.row(f"register {count} adapters (config and header only)", seconds)
    part.target(f"registering {count} adapters, in all", seconds, 2.0, unit="s")
    with feature("limit"):
        limit(max_adapters=budget)

    # The stream: per-sample batches of 8 rows; memory held by adapters after each batch.
    stream = zipf_stream(count, args.stream, 8, 1.1, seed=9)
    ids = input_ids(size, 8, 1, seed=15)
    plain = AdapterkitDriver(base)  # the reference: the same adapters loaded without a budget
    peak, peak_resident, times, wrong, checked = 0, 0, [], 0, 0
    start = time.perf_counter()
    for index, batch in enumerate(stream):
        rows = [names[i] for i in batch]
        began = time.perf_counter()
        with served.adapters.per_sample(rows):
            out = forward(served.model, ids)
        times.append(time.perf_counter() - began)
        peak = max(peak, adapter_bytes(served.model))
        peak_resident = max(peak_resident, len(served.adapters.resident))
        if index % 10 == 0:  # outputs against the same adapters loaded without a budget
            for name in dict.fromkeys(rows):
                if name not in plain.adapters:
                    plain.adapters.load(str(folders[int(name[1:])]), name, activate=False)
            with plain.adapters.per_sample(rows):
                wrong += not torch.equal(out, forward(plain.model, ids))
            checked += 1
    bench_run.log(f"budget: stream of {len(stream)} batches in {time.perf_counter() - start:.1f} s")
    counters = as_dict(stats())
    part.checks.update(
        {"stats after the stream": counters, "stream outputs checked": checked, "stream outputs wrong": wrong}
    )
    part.row(f"stream: {len(stream)} batches of 8 rows, median batch", statistics.median(times))
    part.target(
        f"resident adapter memory <= budget + one adapter ({budget + 1} x {one / 2**10:.0f} KiB)",
        peak / 2**20,
        (budget + 1) * one / 2**20,
        unit="MiB",
        detail=f"at most {peak_resident} adapters resident; stats {counters}",
    )
    part.target(
        "stream outputs that differ from the unbudgeted model's", wrong, 0, unit="", detail=f"{checked} batches checked"
    )

    # A miss (per_sample naming one adapter not resident: load it, evict the least recently used) vs a plain load.
    requested = {i for batch in stream for i in batch}
    cold = [name for i, name in enumerate(names) if i not in requested and name not in served.adapters.resident]
    loads = {"i": 0}

    def miss() -> None:
        with served.adapters.per_sample([cold.pop()]):
            pass

    def plain_load() -> None:
        loads["i"] += 1
        plain.adapters.load(str(folders[loads["i"] % count]), "probe", activate=False)

    def load_delete() -> None:
        plain_load()
        plain.adapters.delete("probe")

    cases = [
        Case("miss", miss),
        Case("load", plain_load, teardown=lambda: plain.adapters.delete("probe")),
        Case("hit", lambda: _enter_exit(served.adapters, [list(served.adapters.resident)[-1]])),
        Case("load_delete", load_delete),
    ]
    rounds = min(len(cold) - 2, 3 * args.rounds)
    timings = interleaved(cases, rounds)
    part.timed_rows(
        timings,
        [
            ("miss", "a miss: per_sample naming one adapter not resident (load + evict)"),
            ("load", "a plain load (no budget) of the same size of adapter"),
            ("hit", "a hit: per_sample naming one resident adapter (no forward)"),
            ("load_delete", "a plain load and a delete (what a miss does when the budget is full)"),
        ],
        {"vs plain load": "load"},
    )
    part.target(
        "a miss <= 1.2x a plain load",
        timings.ratio("miss", "load"),
        1.2,
        iqr=timings.spread("miss", "load"),
        detail=f"a plain load and a delete: {fmt_value(timings.ratio('load_delete', 'load'), 'x')} a plain load",
    )

    # Hits: a batch whose adapters are all resident vs the same batch on the model without a budget.
    hot_rows = [name for name in served.adapters.resident][:8]
    hot_rows = (hot_rows * 8)[:8]
    for name in dict.fromkeys(hot_rows):
        if name not in plain.adapters:
            plain.adapters.load(str(folders[int(name[1:])]), name, activate=False)

    def batch(driver: Any) -> Callable[[], Any]:
        def op() -> Any:
            with driver.adapters.per_sample(hot_rows):
                return forward(driver.model, ids)

        return op

    cases = [Case("hits", batch(served)), Case("resident", batch(plain))]
    timings = interleaved(cases, 3 * args.rounds)
    part.timed_rows(
        timings,
        [("hits", "batch of 8 rows, every adapter a hit"), ("resident", "the same batch, no budget, adapters loaded")],
        {"vs no budget": "resident"},
    )
    part.target(
        "hits cost what a resident adapter costs (<= 1.05x)",
        timings.ratio("hits", "resident"),
        1.05,
        iqr=timings.spread("hits", "resident"),
    )

    # An evicted adapter reloads bit-identical.
    evicted = next((names[i] for batch in stream for i in batch if names[i] not in served.adapters.resident), None)
    if evicted is not None:
        with served.adapters.per_sample([evicted]):
            pass
        saved = load_file(str(folders[int(evicted[1:])] / "adapter_model.safetensors"))
        got = served.adapters.state_dict(evicted)
        same = saved.keys() == got.keys() and all(torch.equal(saved[k], got[k]) for k in saved)
        part.checks["evicted adapter reloads bit-identical"] = same
        part.target(
            f"evicted adapter {evicted!r} reloads bit-identical (tensors differing)", 0 if same else 1, 0, unit=""
        )
    return part


def as_dict(value: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if hasattr(type(value), "__attrs_attrs__"):
        return {a.name: getattr(value, a.name) for a in type(value).__attrs_attrs__}
    return dict(value) if hasattr(value, "keys") else dict(vars(value))


def _enter_exit(adapters: Any, rows: list[str]) -> None:
    with adapters.per_sample(rows):
        pass


def adapter_bytes_of(folder: Path) -> int:
    from safetensors.torch import load_file

    return sum(t.numel() * t.element_size() for t in load_file(str(folder / "adapter_model.safetensors")).values())


# -- 4. live traffic --------------------------------------------------------------------------------------------------
def part_traffic(work: Workload, args: argparse.Namespace) -> Part:
    import torch
    from systems import AdapterkitDriver
    from workload import SIZES, input_ids

    size = SIZES[args.size]
    operations, phases = args.loads, 4
    part = Part(
        "traffic",
        f"loads beside live traffic: {operations} loads + deletes of inactive adapters in one thread, forwards in "
        f"another ({size.name} model)",
    )
    base = work.base(size.name)
    live = work.narrow(size.name)  # the active adapter: LoRA on q_proj, v_proj
    folders = work.lora(size.name, 4)  # the loaded ones: the 7 projections, so every load wraps layers anew
    driver = AdapterkitDriver(base)
    driver.adapters.load(str(live), "live")
    ids = input_ids(size, 1, 16, seed=16)
    part.notes.append(
        "active adapter: LoRA r=8 on q_proj and v_proj; loaded and deleted: LoRA r=16 on the 7 projections "
        "(load(..., activate=False)), so each load wraps layers the active adapter does not hold; forward 1x16 tokens"
    )

    def plain() -> Any:
        return forward(driver.model, ids)

    def routed() -> Any:
        with driver.adapters.per_sample(["live", "__base__"]):
            return forward(driver.model, ids2)

    ids2 = input_ids(size, 2, 16, seed=16)
    # The anchor for the machine's share: the same loads into a second model (same base weights), so the forwards
    # compete for the CPU and the GIL as much, with nothing of theirs touched.
    other = AdapterkitDriver(base)
    part.notes.append(
        "each phase: forwards alone (quiet), forwards while the other thread loads into this model (busy), and "
        "while it loads into a second model (the CPU/GIL floor: on 2 shared cores a loader thread takes CPU time "
        "from the forwards whatever it loads into); ratios are medians of per-phase ratios"
    )
    for label, run_forward in (("plain forwards", plain), ("per_sample forwards (rows: live, __base__)", routed)):
        expected = run_forward()
        quiet, busy, ratios, floors, elsewhere = [], [], [], [], []
        wrong, differing, refused, worst, noise = 0, 0, [], 0.0, 0.0
        for phase in range(phases):
            times = [once_timed(run_forward)[0] for _ in range(args.quiet_forwards)]
            quiet += times
            jobs = [(str(folders[i % len(folders)]), f"x{phase}_{i}") for i in range(operations // phases)]
            during = []
            for target_model in (driver, other):
                done = threading.Event()
                thread = threading.Thread(
                    target=load_and_delete, args=(target_model.adapters, jobs, refused, done), name="loader"
                )
                thread.start()
                seconds_list = []
                while not done.is_set():
                    seconds, out = once_timed(run_forward)
                    seconds_list.append(seconds)
                    diff = max_diff(out, expected)
                    worst = max(worst, diff)
                    differing += not torch.equal(out, expected)
                    if diff > 1e-5:
                        wrong += 1
                    else:
                        noise = max(noise, diff)
                thread.join()
                if target_model is driver:
                    during = seconds_list
                else:
                    elsewhere += seconds_list
                    if seconds_list and during:
                        floors.append(statistics.median(seconds_list) / statistics.median(times))
                        ratios.append(statistics.median(during) / statistics.median(times))
            busy += during
        ratio = statistics.median(ratios) if ratios else None
        floor = statistics.median(floors) if floors else None
        part.row(f"{label}: quiet (median)", statistics.median(quiet) if quiet else None)
        part.row(
            f"{label}: during loads into this model", statistics.median(busy) if busy else None, {"vs quiet": ratio}
        )
        part.row(
            f"{label}: during loads into a second model (floor)",
            statistics.median(elsewhere) if elsewhere else None,
            {"vs quiet": floor},
        )
        part.checks[label] = {
            "forwards during loads": len(busy),
            "wrong (max abs diff > 1e-5)": wrong,
            "not bitwise equal (this model or the second's loads)": differing,
            "max abs diff": worst,
            "max abs diff of the right ones": noise,
            "refused loads/deletes": len(refused),
            "first refusal": refused[0] if refused else None,
        }
        part.target(
            f"{label}: wrong outputs during loads",
            wrong,
            0,
            unit="",
            detail=f"{len(busy)} forwards during loads into this model; max abs diff {worst:.1e} (the right ones: "
            f"{noise:.1e}, float rounding)"
            + (f"; {len(refused)} loads/deletes refused: {refused[0]}" if refused else ""),
        )
        part.target(
            f"{label}: forward latency during loads <= 1.3x without",
            ratio,
            1.3,
            detail=f"during loads into a second model (the machine's share): {fmt_value(floor, 'x')}",
        )
    for name in list(driver.adapters.names):
        if name != "live":
            driver.adapters.delete(name)
    return part


def load_and_delete(adapters: Any, jobs: list[tuple[str, str]], refused: list[str], done: threading.Event) -> None:
    """The loader thread: load each (folder, name) without activating it, then delete it; refusals are recorded."""
    try:
        for folder, name in jobs:
            try:
                adapters.load(folder, name, activate=False)
                adapters.delete(name)
            except Exception as exc:  # noqa: BLE001 (a refused load is reported)
                refused.append(f"{type(exc).__name__}: {first_line(exc)}")
    finally:
        done.set()


def once_timed(op: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = op()
    return time.perf_counter() - start, out


def code_under_test() -> str:
    """Where adapterkit is imported from, with its branch and commit (a scratch merge runs this script too)."""
    import subprocess

    import adapterkit

    source = Path(adapterkit.__file__).resolve().parents[2]
    git = ["git", "-C", str(source)]
    try:
        commit = subprocess.run(
            [*git, "log", "-1", "--format=%h %s"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
        branch = subprocess.run(
            [*git, "branch", "--show-current"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return str(source)
    return (
        f"{source} (branch {branch.strip()}, {commit.strip()[:90]}{', uncommitted changes' if dirty.strip() else ''})"
    )


# -- entry point ------------------------------------------------------------------------------------------------------
RUNNERS = {"decode": part_decode, "compile": part_compile, "budget": part_budget, "traffic": part_traffic}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", nargs="+", choices=PARTS, default=list(PARTS), help="which parts (default: all)")
    parser.add_argument("--quick", action="store_true", help="smoke run: small model, few rounds and operations")
    parser.add_argument("--size", choices=("small", "medium", "large"), help="model of decode and traffic (medium)")
    parser.add_argument("--compile-size", choices=("small", "medium", "large"), help="model of compile (small)")
    parser.add_argument("--rounds", type=int, help="timed rounds (after one warm-up round; default 7)")
    parser.add_argument("--prefill-batch", type=int, help="rows of the prefill batch, one adapter each (default 8)")
    parser.add_argument("--cycles", type=int, help="switches after the first compile (default 100)")
    parser.add_argument(
        "--backend", help="torch.compile backend of the compiled-forward timing (default inductor; 'none' skips it)"
    )
    parser.add_argument("--registered", type=int, help="adapters registered in the budget part (default 1000)")
    parser.add_argument("--stream", type=int, help="per-sample batches in the budget part's stream (default 200)")
    parser.add_argument("--loads", type=int, help="loads + deletes in the traffic part (default 200)")
    parser.add_argument("--quiet-forwards", type=int, help="forwards per quiet phase of the traffic part (default 8)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as bench/run.py)")
    parser.add_argument("--out", type=Path, help="JSON output (default bench/results/serving-<timestamp>.json)")
    parser.add_argument("--report", type=Path, help="print the Markdown tables of a saved run and exit")
    args = parser.parse_args(argv)
    if args.report:
        data = json.loads(args.report.read_text(encoding="utf-8"))
        for part in data["parts"].values():
            print(part_tables(part, markdown=True) + "\n")
        return 0
    quick = args.quick
    args.size = args.size or ("small" if quick else "medium")
    # The compile part runs ~450 forwards, most of them uncompiled or with a recompile: the small model keeps
    # it to minutes on 2 cores (--compile-size medium for the reference model: about 9 minutes).
    args.compile_size = args.compile_size or "small"
    args.rounds = args.rounds or (2 if quick else 7)
    args.prefill_batch = args.prefill_batch or (4 if quick else 8)
    args.cycles = args.cycles or (20 if quick else 100)
    args.backend = args.backend or ("none" if quick else "inductor")
    args.registered = args.registered or (100 if quick else 1000)
    args.stream = args.stream or (30 if quick else 200)
    args.loads = args.loads or (20 if quick else 200)
    args.quiet_forwards = args.quiet_forwards or (4 if quick else 8)

    versions = bench_run.check_environment()
    bench_run.quiet_transformers()
    import torch

    # The recompilations of the unprepared model are counted; torch's warning about its limit only adds noise.
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)

    if args.threads:
        torch.set_num_threads(args.threads)
    info = bench_run.machine_info()
    info["code"] = code_under_test()
    bench_run.log(f"versions: {versions}")
    bench_run.log(f"machine: {info['cpu']}, {info['usable_cores']} usable cores, torch threads {info['torch_threads']}")
    started = time.perf_counter()
    work = Workload()
    results: dict[str, Any] = {}
    try:
        for name in args.part:
            start = time.perf_counter()
            try:
                part = RUNNERS[name](work, args)
            except NotAvailable as exc:
                part = Part(name, notes=[f"not available: {exc}"])
            except Exception as exc:  # noqa: BLE001 (reported; the other parts still run)
                bench_run.log(f"{name} failed: {type(exc).__name__}: {exc}")
                part = Part(name, notes=[f"FAILED: {type(exc).__name__}: {first_line(exc)}"])
            part.seconds = time.perf_counter() - start
            bench_run.log(f"{name}: {part.seconds:.0f} s")
            results[name] = dataclasses.asdict(part)
            print("\n" + part_tables(results[name], markdown=False), flush=True)
            gc.collect()
    finally:
        work.close()
    info["load_average_end"] = bench_run.os.getloadavg()
    total = time.perf_counter() - started
    data = {
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(["serving.py", *(sys.argv[1:] if argv is None else argv)]),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "versions": versions,
        "machine": info,
        "total_seconds": total,
        "parts": results,
    }
    stamp = f"{datetime.datetime.now():%Y%m%d-%H%M%S}{'-quick' if quick else ''}"
    out = args.out or HERE / "results" / f"serving-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
    print(
        f"\nmachine: {info['cpu']}; {info['usable_cores']} cores; torch threads {info['torch_threads']}; load average "
        f"{info['load_average_start']} -> {info['load_average_end']}"
    )
    print(f"code under test: {info['code']}")
    print(f"wrote {out} ({total:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
