"""The measures of the benchmark, each producing result rows (plain dicts, see :func:`make_row`).

1. load a saved adapter from a local folder into a ready model;
2. set_active latency with 2 and with N (100) adapters loaded, inference and training modes;
3. forward with an active adapter vs the base model; merged vs base;
4. per-sample mixed batch (2, 4, 8 distinct adapters) vs ``PeftModel(..., adapter_names=...)``;
5. loading the (N+1)th adapter vs loading the 2nd (and the cost of every load on the way to N);
6. peak memory while loading: delegated to ``bench/peak_memory_load.py`` (see ``run.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from systems import SYSTEMS, AdapterkitDriver, Driver
from timing import Case, Timings, interleaved, once
from torch import nn
from workload import Size, input_ids

# The columns and ratios of the measures that time all three systems against a floor.
SYSTEM_COLUMNS = {**{k: k for k in SYSTEMS}, "floor": "floor"}
ADAPTERKIT_RATIOS = {
    "adapterkit/peft": ("adapterkit", "peft"),
    "adapterkit/transformers": ("adapterkit", "transformers"),
    "adapterkit/floor": ("adapterkit", "floor"),
}

ADAPTER_ATTRS = ("lora_A", "lora_B", "lora_E", "lora_embedding_A", "lora_embedding_B", "ia3_l")
# The case of the many-adapter set_active runs that switches on a second adapterkit model holding 2 adapters.
FEW = "adapterkit_2_loaded"


@dataclasses.dataclass
class Context:
    size: Size
    method: str
    base: nn.Module
    drivers: dict[str, Driver]
    folders: list[Path]
    rounds: int
    n_many: int
    modes: tuple[str, ...] = ("inference", "training")

    @property
    def ak(self) -> Driver:
        return self.drivers["adapterkit"]

    def reset(self) -> None:
        for driver in self.drivers.values():
            driver.reset()


def target(
    label: str, value: float | None, limit: float, *, detail: str = "", lower_is_better: bool = True
) -> dict[str, Any]:
    met = None if value is None else (value <= limit if lower_is_better else value >= limit)
    return {"label": label, "value": value, "limit": limit, "met": met, "detail": detail}


def make_row(
    measure: str,
    ctx: Context,
    variant: str,
    timings: Timings,
    *,
    columns: dict[str, str],
    ratios: dict[str, tuple[str, str]],
    targets: list[dict[str, Any]] = (),
    note: str = "",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``columns``: table column -> case name; ``ratios``: label -> (case, anchor case), paired per round."""
    seconds = {column: timings.median(case) for column, case in columns.items()}
    errors = {column: timings.errors[case] for column, case in columns.items() if case in timings.errors}
    return {
        "measure": measure,
        "size": ctx.size.name,
        "method": ctx.method,
        "variant": variant,
        "seconds": seconds,
        "errors": errors,
        "ratios": {label: timings.ratio(a, b) for label, (a, b) in ratios.items()},
        "ratio_iqr": {label: timings.spread(a, b) for label, (a, b) in ratios.items()},
        # A second estimator, robust to other people's load: the fastest sample of each case.
        "ratios_of_minima": {label: timings.ratio_of_minima(a, b) for label, (a, b) in ratios.items()},
        "targets": list(targets),
        "note": note,
        "samples": timings.samples,
        **(extra or {}),
    }


def _load_file_floor(folder: Path) -> Case:
    weights = folder / "adapter_model.safetensors"
    return Case("floor", lambda: load_file(str(weights)))


# 1. load -----------------------------------------------------------------------------------
def measure_load(ctx: Context) -> list[dict[str, Any]]:
    ctx.reset()
    folder = ctx.folders[0]
    peft = ctx.drivers["peft"]
    cases = [_load_file_floor(folder)]
    for key, driver in ctx.drivers.items():
        cases.append(Case(key, lambda d=driver: d.load(folder, "bench"), teardown=driver.reset))

    def peft_low_mem(on: bool) -> None:
        peft.low_cpu_mem_usage = on
        if not on:
            peft.reset()

    cases.append(
        Case(
            "peft_low_cpu_mem",
            lambda: peft.load(folder, "bench"),
            setup=lambda: peft_low_mem(True),
            teardown=lambda: peft_low_mem(False),
        )
    )
    timings = interleaved(cases, ctx.rounds)
    peft_low_mem(False)
    size_mb = (folder / "adapter_model.safetensors").stat().st_size / 1e6
    return [
        make_row(
            "load",
            ctx,
            "1st adapter from a local folder into the ready model",
            timings,
            columns={**SYSTEM_COLUMNS, "peft low_cpu_mem_usage=True": "peft_low_cpu_mem"},
            ratios={**ADAPTERKIT_RATIOS, "peft low_cpu_mem_usage/peft": ("peft_low_cpu_mem", "peft")},
            targets=[
                target("load <= 0.35x PeftModel.from_pretrained", timings.ratio("adapterkit", "peft"), 0.35),
                target("load <= 0.35x transformers load_adapter", timings.ratio("adapterkit", "transformers"), 0.35),
            ],
            note=f"adapter file {size_mb:.1f} MB; floor = safetensors load_file (read + materialise every tensor); "
            "peft = PeftModel.from_pretrained (default low_cpu_mem_usage=False); transformers = model.load_adapter",
        )
    ]


# 3. forward ----------------------------------------------------------------------------------
def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def measure_forward(ctx: Context, rounds: int | None = None) -> list[dict[str, Any]]:
    """Forward with the adapter active, and merged, against the base model, all in one interleaved run.

    The differences in question are a few percent, so this measure runs more rounds than the others
    (default ``ctx.rounds + 2``).
    """
    ctx.reset()
    folder = ctx.folders[0]
    for driver in ctx.drivers.values():
        driver.load(folder, "fwd")
        if driver.key == "peft":
            driver.set_active("fwd", trainable=False)
    probe = input_ids(ctx.size, 2, 16, seed=5)
    with torch.no_grad():
        reference = ctx.base(input_ids=probe, use_cache=False).logits
    outs = {key: d.forward(probe) for key, d in ctx.drivers.items()}
    check = {
        "adapter changes the output (max |adapterkit - base|)": _max_diff(outs["adapterkit"], reference),
        "max |adapterkit - peft|": _max_diff(outs["adapterkit"], outs["peft"]),
        "max |adapterkit - transformers|": _max_diff(outs["adapterkit"], outs["transformers"]),
    }
    batch, tokens = ctx.size.forward_shape
    ids = input_ids(ctx.size, batch, tokens)

    def base_forward() -> Any:
        with torch.no_grad():
            return ctx.base(input_ids=ids, use_cache=False).logits

    cases = [Case("base", base_forward)]
    for key, driver in ctx.drivers.items():
        cases.append(Case(key, lambda d=driver: d.forward(ids)))
    for key, driver in ctx.drivers.items():
        cases.append(
            Case(f"{key}_merged", lambda d=driver: d.forward(ids), setup=driver.merge, teardown=driver.unmerge)
        )
    timings = interleaved(cases, rounds or ctx.rounds + 2)
    for driver in ctx.drivers.values():  # a failed teardown must not leave anything merged
        with contextlib.suppress(Exception):  # nothing merged (the usual case) raises
            driver.unmerge()
    ctx.reset()

    def overhead(key: str) -> float | None:
        r = timings.ratio(key, "base")
        return None if r is None else r - 1.0

    ak_over, peft_over = overhead("adapterkit"), overhead("peft")
    iqr = timings.spread("adapterkit", "peft")
    noise = None if iqr is None else (iqr[1] - iqr[0]) / 2
    rows = [
        make_row(
            "forward",
            ctx,
            f"active adapter vs base, {batch}x{tokens} tokens",
            timings,
            columns={"adapterkit": "adapterkit", "peft": "peft", "transformers": "transformers", "floor": "base"},
            ratios={
                "adapterkit/base": ("adapterkit", "base"),
                "peft/base": ("peft", "base"),
                "transformers/base": ("transformers", "base"),
                "adapterkit/peft": ("adapterkit", "peft"),
            },
            targets=[
                target(
                    "active forward overhead over base <= peft's",
                    None if ak_over is None or peft_over is None else ak_over - peft_over,
                    0.0,
                    detail=(
                        f"adapterkit +{100 * ak_over:.1f}% vs peft +{100 * peft_over:.1f}% over base; "
                        f"paired adapterkit/peft IQR half-width {100 * noise:.1f}%"
                        if None not in (ak_over, peft_over, noise)
                        else ""
                    ),
                )
            ],
            note="floor = the base model (no adapter layers); adapterkit and peft run the same peft layer code",
            extra={"checks": check, "noise_halfwidth": noise},
        ),
        make_row(
            "forward merged",
            ctx,
            f"merged adapter vs base, {batch}x{tokens} tokens",
            timings,
            columns={
                "adapterkit": "adapterkit_merged",
                "peft": "peft_merged",
                "transformers": "transformers_merged",
                "floor": "base",
            },
            ratios={
                "adapterkit/base": ("adapterkit_merged", "base"),
                "peft/base": ("peft_merged", "base"),
                "adapterkit/peft": ("adapterkit_merged", "peft_merged"),
            },
            targets=[target("merged forward <= 1.02x base", timings.ratio("adapterkit_merged", "base"), 1.02)],
            note="transformers' PeftAdapterMixin has no merge",
        ),
    ]
    return rows


# 4. mixed batch --------------------------------------------------------------------------------
def measure_mixed(ctx: Context, distinct: tuple[int, ...] = (2, 4, 8), rows_per_batch: int = 8) -> list[dict[str, Any]]:
    ctx.reset()
    ak, peft = ctx.drivers["adapterkit"], ctx.drivers["peft"]
    names = [f"m{i}" for i in range(max(distinct))]
    for i, name in enumerate(names):
        folder = ctx.folders[i % len(ctx.folders)]
        ak.load(folder, name)
        peft.load(folder, name)
    ak.set_active(names[0], trainable=False)
    peft.set_active(names[0], trainable=False)
    results = []
    shapes = [(ctx.size.mixed_tokens, "prefill-like"), (1, "decode-like: 1 token per row")]
    for tokens, label in shapes:
        ids = input_ids(ctx.size, rows_per_batch, tokens, seed=7)

        def base_forward(ids: torch.Tensor = ids) -> Any:
            with torch.no_grad():
                return ctx.base(input_ids=ids, use_cache=False).logits

        for k in distinct:
            rows = [names[i % k] for i in range(rows_per_batch)]
            diff = _max_diff(ak.mixed(rows, ids), peft.mixed(rows, ids))
            cases = [
                Case("base", base_forward),
                Case("one_adapter", lambda ids=ids: ak.forward(ids)),
                Case("adapterkit", lambda rows=rows, ids=ids: ak.mixed(rows, ids)),
                Case("peft", lambda rows=rows, ids=ids: peft.mixed(rows, ids)),
            ]
            # Prefill-like batches cost a full forward each: fewer rounds than the cheap decode-like ones.
            timings = interleaved(cases, max(3, ctx.rounds - 2) if tokens > 1 else ctx.rounds)
            limit_label = "mixed batch <= 1.0x peft" + (" (and lower)" if k >= 4 else "")
            results.append(
                make_row(
                    "mixed batch",
                    ctx,
                    f"{k} distinct adapters, {rows_per_batch}x{tokens} tokens ({label})",
                    timings,
                    columns={"adapterkit": "adapterkit", "peft": "peft", "floor": "one_adapter", "base model": "base"},
                    ratios={
                        "adapterkit/peft": ("adapterkit", "peft"),
                        "adapterkit/one adapter": ("adapterkit", "one_adapter"),
                        "peft/one adapter": ("peft", "one_adapter"),
                    },
                    targets=[target(limit_label, timings.ratio("adapterkit", "peft"), 1.0)] if tokens > 1 else [],
                    note="floor = the same batch through one active adapter (same FLOPs); "
                    "transformers' mixin has no per-sample batches",
                    extra={"checks": {"max |adapterkit - peft|": diff}, "distinct": k, "tokens": tokens},
                )
            )
    ctx.reset()
    return results


# 2 + 5. set_active with 2 and N adapters; the 2nd and the (N+1)th load -------------------------
def _calibrated(case: Case, budget: float = 0.03, most: int = 40) -> Case:
    """Repeat a fast op within one sample so a sample lasts about ``budget`` seconds."""
    elapsed = once(case.op)
    case.inner = max(1, min(most, round(budget / max(elapsed, 1e-6))))
    return case


def _adapter_params(layers: list[nn.Module], name: str) -> list[nn.Parameter]:
    params = []
    for layer in layers:
        for attr in ADAPTER_ATTRS:
            container = getattr(layer, attr, None)
            if container is not None and name in container:
                item = container[name]
                params.extend([item] if isinstance(item, nn.Parameter) else item.parameters())
    return params


def _switch_cases(
    ctx: Context,
    pair: tuple[str, str],
    trainable: bool,
    live: dict[str, Driver],
    others: dict[str, tuple[Driver, tuple[str, str]]] | None = None,
) -> list[Case]:
    """Cases that switch the active adapter back and forth between ``pair`` on every call.

    ``others``: further cases, each a driver switching between its own pair of adapters.
    """
    cases = []
    layers = ctx.ak.tuner_layers()
    params = {name: _adapter_params(layers, name) for name in pair}
    state = {"floor": 0}

    def floor() -> None:
        # What any implementation must do: point every layer at the new active list (and, when training,
        # flip requires_grad on the parameters of the adapter leaving and the one arriving).
        state["floor"] ^= 1
        new, old = pair[state["floor"]], pair[1 - state["floor"]]
        active = [new]
        for layer in layers:
            layer.__dict__["_active_adapter"] = active  # a plain attribute; skips nn.Module.__setattr__
        if trainable:
            for p in params[old]:
                p.requires_grad = False
            for p in params[new]:
                p.requires_grad = True

    cases.append(Case("floor", floor))
    switching = {key: (driver, pair) for key, driver in live.items()} | (others or {})
    for key, (driver, names) in switching.items():
        flip = {"i": 0}

        def op(d: Driver = driver, names: tuple[str, str] = names, flip: dict[str, int] = flip) -> None:
            flip["i"] ^= 1
            d.set_active(names[flip["i"]], trainable)

        cases.append(Case(key, op))
    return [_calibrated(case) for case in cases]


def measure_activity(
    ctx: Context, many_modes: tuple[str, ...] = ("inference", "training"), probe: bool = True
) -> list[dict[str, Any]]:
    """set_active with 2 adapters loaded, in every mode of ``ctx.modes``; with ``ctx.n_many`` in ``many_modes``.

    With ``probe`` (and some many mode) also the 2nd and the (N+1)th load, repeated, and the time of every
    load on the way to N (single samples, round-robin over the systems: the growth curve).

    The anchors' switch does the same work whatever their adapters were loaded with (peft's
    ``set_adapter(name, inference_mode=)`` decides trainability at each switch; transformers' ``set_adapter``
    is one call for both), so the anchors load each adapter once, frozen, and serve both modes. adapterkit
    fixes trainability at load (``is_trainable=``), so it reloads a trainable set for training mode. Loading
    100 adapters costs O(N^2) in peft and transformers (each load walks every module, adapters included).

    The N-adapter switch runs also time adapterkit switching on a second model that holds 2 adapters, in the
    same rounds: the growth target is that paired ratio (the ratio to the separate 2-adapter run, drifting
    with the machine's load, is kept in the detail).
    """
    n = ctx.n_many
    ak = ctx.ak
    live = dict(ctx.drivers)  # systems still in the race (one that fails to load is dropped, with its reason)
    failures: dict[str, str] = {}
    runs: dict[tuple[str, int], Timings] = {}
    second = nth = None
    curve: dict[str, list[float]] = {}
    wanted_many = [mode for mode in ctx.modes if mode in many_modes]

    def switch(mode: str, count: int) -> None:
        trainable = mode == "training"
        racing = dict(live)
        if trainable and "adapterkit" in live:
            try:
                ak.reset()
                for index in range(count):
                    ak.load(ctx.folders[index % len(ctx.folders)], f"a{index}", True)
            except Exception as exc:  # noqa: BLE001 (reported, not fatal)
                failures["adapterkit"] = f"trainable load: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                racing.pop("adapterkit")
        pair = ("a0", "a1") if count == 2 else ("a0", f"a{count // 2}")
        others = {}
        if count > 2 and "adapterkit" in racing:
            # The same switch on a second model that holds 2 adapters, in the same rounds: a paired growth ratio.
            few = AdapterkitDriver(ctx.base)
            for index in range(2):
                few.load(ctx.folders[index % len(ctx.folders)], f"a{index}", trainable)
            others[FEW] = (few, ("a0", "a1"))
        runs[(mode, count)] = interleaved(_switch_cases(ctx, pair, trainable, racing, others), ctx.rounds)
        if trainable and count == 2 and "adapterkit" in live:  # back to the frozen set the next loads build on
            ak.reset()
            for index in range(count):
                ak.load(ctx.folders[index % len(ctx.folders)], f"a{index}", False)

    ctx.reset()
    _load_all(live, failures, "a0", ctx.folders[0], False)
    if probe and wanted_many:
        second = _load_probes(ctx, live, 1, False)
    _load_all(live, failures, "a1", ctx.folders[1 % len(ctx.folders)], False)
    for mode in ctx.modes:
        switch(mode, 2)
    if wanted_many:
        curve = {key: [] for key in live}
        for index in range(2, n):
            # Round-robin over systems, one load each: the k-th load of every system at about the same time.
            folder = ctx.folders[index % len(ctx.folders)]
            for key, t in _load_all(live, failures, f"a{index}", folder, False, timed=True).items():
                curve[key].append(t)
        if probe:
            nth = _load_probes(ctx, live, n, False)
        for mode in wanted_many:
            switch(mode, n)
    ctx.reset()

    rows: list[dict[str, Any]] = []
    for (mode, count), timings in runs.items():
        trainable = mode == "training"
        for key, reason in failures.items():
            timings.errors.setdefault(key, f"loading adapters failed: {reason}")
        limit = 0.1 if mode == "inference" else 0.5
        targets = [
            target(
                f"set_active ({mode}) <= {limit}x transformers set_adapter",
                timings.ratio("adapterkit", "transformers"),
                limit,
            )
        ]
        extra: dict[str, Any] = {"adapters_loaded": count, "mode": mode}
        if count == n and (mode, 2) in runs:
            few = runs[(mode, 2)]
            separate = _ratio_of_medians(timings, few, "adapterkit")
            normalised = _normalised_growth(timings, few, "adapterkit")
            details = [f"vs the 2-adapter run: {separate:.2f}x" if separate else ""]
            details.append(f"floor-normalised: {normalised:.2f}x" if normalised else "")
            targets.append(
                target(
                    f"set_active ({mode}) with {n} adapters <= 1.2x with 2",
                    timings.ratio("adapterkit", FEW),
                    1.2,
                    detail="; ".join(d for d in details if d),
                )
            )
            extra["growth_vs_2"] = {k: _ratio_of_medians(timings, few, k) for k in SYSTEMS}
            extra["growth_vs_2_paired"] = timings.ratio("adapterkit", FEW)
        rows.append(
            make_row(
                "set_active",
                ctx,
                f"{mode} mode, {count} adapters loaded",
                timings,
                columns=SYSTEM_COLUMNS,
                ratios=ADAPTERKIT_RATIOS,
                targets=targets,
                note=f"adapterkit: adapters loaded with is_trainable={trainable}; peft: set_adapter(name, "
                f"inference_mode={not trainable}); transformers: set_adapter(name); floor = assign the active list "
                "on every adapter layer"
                + (" and flip requires_grad of the two adapters involved" if trainable else ""),
                extra=extra,
            )
        )
    if second is not None and nth is not None:
        for count, timings in ((2, second), (n + 1, nth)):
            extra = {"adapters_before": count - 1, "mode": "inference"}
            targets = []
            if count == n + 1:
                normalised = _normalised_growth(nth, second, "adapterkit")
                targets.append(
                    target(
                        f"load of the {n + 1}th adapter <= 1.2x the 2nd",
                        _ratio_of_medians(nth, second, "adapterkit"),
                        1.2,
                        detail=f"floor-normalised: {normalised:.2f}x" if normalised else "",
                    )
                )
                extra["growth_vs_2nd"] = {k: _ratio_of_medians(nth, second, k) for k in SYSTEMS}
                extra["load_curve"] = _curve_summary(curve)
            for key, reason in failures.items():
                timings.errors.setdefault(key, f"loading adapters failed: {reason}")
            rows.append(
                make_row(
                    "load nth",
                    ctx,
                    f"load adapter #{count} ({count - 1} loaded)",
                    timings,
                    columns=SYSTEM_COLUMNS,
                    ratios=ADAPTERKIT_RATIOS,
                    targets=targets,
                    note="frozen adapters; peft: PeftModel.load_adapter (does not activate); adapterkit and "
                    "transformers activate the new adapter; floor = safetensors load_file",
                    extra=extra,
                )
            )
    return rows


def _load_all(
    live: dict[str, Driver], failures: dict[str, str], name: str, folder: Path, trainable: bool, timed: bool = False
) -> dict[str, float]:
    """Load ``folder`` as ``name`` into every live system (timing each load if ``timed``)."""
    times = {}
    for key, driver in list(live.items()):
        try:
            if timed:
                times[key] = once(lambda d=driver: d.load(folder, name, trainable))
            else:
                driver.load(folder, name, trainable)
        except Exception as exc:  # noqa: BLE001 (a system that cannot load this is reported, not fatal)
            failures[key] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            del live[key]
    return times


def _load_probes(ctx: Context, live: dict[str, Driver], loaded: int, trainable: bool) -> Timings:
    # With 100 adapters loaded each probe costs about 2 s per system: fewer rounds there.
    """Time loading one more adapter (and deleting it, untimed) with ``loaded`` adapters present."""
    folder = ctx.folders[loaded % len(ctx.folders)]
    cases = [_load_file_floor(folder)]
    for key, driver in live.items():
        cases.append(
            Case(key, lambda d=driver: d.load(folder, "probe", trainable), teardown=lambda d=driver: d.delete("probe"))
        )
    return interleaved(cases, ctx.rounds if loaded < 10 else max(3, ctx.rounds - 2))


def _ratio_of_medians(later: Timings, earlier: Timings, key: str) -> float | None:
    a, b = later.median(key), earlier.median(key)
    return None if a is None or b is None or b == 0 else a / b


def _normalised_growth(later: Timings, earlier: Timings, key: str) -> float | None:
    """Growth with each run's own floor divided out (the floor does not depend on how many adapters are loaded)."""
    a, b = later.ratio(key, "floor"), earlier.ratio(key, "floor")
    return None if a is None or b is None or b == 0 else a / b


def _curve_summary(curve: dict[str, list[float]]) -> dict[str, Any]:
    """Median time of the first and last ten loads on the way to N adapters (single samples)."""
    summary = {}
    for key, times in curve.items():
        if len(times) >= 4:
            head, tail = times[: min(10, len(times) // 2)], times[-min(10, len(times) // 2) :]
            summary[key] = {
                "first_loads_s": statistics.median(head),
                "last_loads_s": statistics.median(tail),
                "growth": statistics.median(tail) / statistics.median(head),
                "all_s": times,
            }
    return summary
