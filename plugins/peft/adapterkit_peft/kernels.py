"""Batched adapter math for banked layers (LoRA, IA3): pure tensor functions, torch ops only.

These functions compute what peft's LoRA and IA3 layers compute, for a whole batch
at once, from *banks*: per-layer tensors that hold every loaded adapter of the
layer in a numbered *slot*. They read no module and change nothing; the layer
code (``banks.py`` and the LoRA/IA3 plugins) decides when to call them.

Bank layout (one bank per adapted layer, ``S`` slots, maximum rank ``R``)
-------------------------------------------------------------------------
* LoRA ``A_bank [S, R, in]``: slot ``s`` holds ``lora_A[name].weight`` (``[r_s, in]``)
  in rows ``:r_s``; rows ``r_s:`` are zero.
* LoRA ``B_bank [S, out, R]``: slot ``s`` holds ``lora_B[name].weight`` (``[out, r_s]``)
  in columns ``:r_s``; columns ``r_s:`` are zero. The zero padding makes a padded
  slot compute exactly what the unpadded adapter computes.
* LoRA ``scale [S]``: peft's scaling (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA)
  times the adapter's ``set_active`` weight; ``0`` for an empty slot. Keep it float32
  (it is cast to the compute dtype here).
* IA3 ``vec_bank [S, F]``: slot ``s`` holds ``ia3_l[name]`` flattened (``F`` = in_features
  for a feedforward layer, out_features otherwise; channels for convolutions); an
  empty slot holds ones.

Every slot of a bank must hold finite numbers (empty slots: zeros / ones as above).
A slot numbers the same adapter in every layer's bank; where that adapter does not
target a layer, the slot stays empty in that layer's bank, and its rows compute the
base layer there (as peft's mixed batch skips an adapter a layer does not hold).

Choosing each row's adapter
---------------------------
``slots`` is a ``LongTensor [B]`` on the banks' device: batch row ``b`` uses slot
``slots[b]``; :data:`BASE` (``-1``) means "no adapter" (peft's ``"__base__"``). An
empty slot (scale 0 / ones) computes the base result too. Under torch.compile, pass
new slot tensors or write a persistent one in place (``copy_``): values never
recompile, only a new batch size does (as for any input shape).

Functions and which are compile-safe
------------------------------------
* :func:`lora_delta_rows`, :func:`ia3_rows` with ``slots`` a tensor: **compile-safe**
  (no ``.item()``, no branching on tensor values, shapes depend only on the input
  shapes), BGMV-style: each row's adapter weights are gathered (``index_select``)
  and applied with batched matmuls.
* The same functions with ``slots`` a :class:`RowPlan` (from :func:`plan_rows`, built
  once per ``per_sample`` block, not per layer call): **eager only** (the grouping is
  data-dependent shapes and loops). :func:`choose` picks, by the rows and the input's
  shape: SGMV-style grouping (one matmul pair per distinct adapter on its rows, rows
  sorted by adapter), a "window" (rows padded into their slots, one batched matmul pair
  on a view of the banks' slot range: no weight copies; decode), or the BGMV gather.
* :func:`lora_delta_active`, :func:`ia3_active`, :func:`ia3_active_vector`: the
  active set (``K`` adapters applied to every row), **compile-safe**; ``K`` is a shape,
  so pad the active set to a fixed ``K`` with weight-0 entries to switch among sets
  of different sizes without recompiling.

Arithmetic and dtypes follow peft (inference: dropout is the identity; call
peft's own forward while a dropout is active in training mode):

* LoRA: the input is cast to ``A_bank.dtype`` and the delta is returned in that
  dtype; the caller adds it as peft does (mixed batch: ``result + delta.to(result.dtype)``;
  active set: ``(result + delta).to(result.dtype)``). The
  scale is applied in rank space (``B((A x) * s)``) where peft applies it after
  ``B`` (``B(A x) * s``): equal up to float rounding (<= 1e-6 relative in float32).
* IA3: see :func:`ia3_rows` for the ``cast`` / ``out_dtype`` arguments that
  reproduce peft's Linear and Conv dtype handling.
* LoRA convolutions, embeddings and variants (DoRA, ...) are not covered: peft's
  path stays the fallback for them.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Sequence
from typing import Literal

import torch
from adapterkit.errors import ArgumentValueError

__all__ = [
    "BASE",
    "RowPlan",
    "choose",
    "ia3_active",
    "ia3_active_vector",
    "ia3_rows",
    "lora_delta_active",
    "lora_delta_rows",
    "plan_rows",
]

BASE = -1
"""The slot of a row that uses no adapter (peft's ``"__base__"``)."""

Algorithm = Literal["none", "grouped", "window", "gather", "dense"]

# Eager algorithm choice, measured on CPU (bench/kernels_micro.py --layers; see choose()).
_GROUPED_MAX_DISTINCT = 8
_WINDOW_MAX_WASTE = 2  # padded rows per real row the "window" algorithm may compute


@dataclasses.dataclass(frozen=True, eq=False)
class RowPlan:
    """The grouping of a batch's rows by slot, computed once per ``per_sample`` block (:func:`plan_rows`).

    Attributes:
        slots: ``LongTensor [B]``, each row's slot (:data:`BASE` for none).
        distinct: the distinct non-base slots, in order of first appearance (``K`` of them).
        distinct_t: ``distinct`` as a ``LongTensor [K]``.
        order: ``LongTensor [M]``, the ``M`` non-base rows grouped by slot (stable): group ``k``
            is ``order[groups[k][1]]``.
        groups: ``(slot, positions)`` per distinct slot, ``positions`` a slice of ``order``.
        identity: ``order`` is ``arange(B)`` (no base row, each adapter's rows contiguous and in
            first-appearance order): the grouped path then needs no copies of rows.
        window: ``(lo, hi)``, the smallest slot range holding every distinct slot.
        depth: the most rows any one slot has.
        adapted: ``LongTensor [M]``, the non-base rows in row order.
        cell: ``LongTensor [M]``, for each of ``adapted``, its cell ``(slot - lo) * depth + i``
            (``i``: its rank among its slot's rows) in the window's padded rows.
        onehot: ``float32 [B, K]``: row ``b`` has a 1 at its slot's position in ``distinct``
            (all zeros for a base row).
        gather_index: ``slots`` with base rows pointed at slot 0 (masked by ``row_mask``).
        row_mask: ``float32 [B]``: 0 for base rows, 1 otherwise.
        has_base: whether any row is a base row.
    """

    slots: torch.Tensor
    distinct: tuple[int, ...]
    distinct_t: torch.Tensor
    order: torch.Tensor
    groups: tuple[tuple[int, slice], ...]
    identity: bool
    window: tuple[int, int]
    depth: int
    adapted: torch.Tensor
    cell: torch.Tensor
    onehot: torch.Tensor
    gather_index: torch.Tensor
    row_mask: torch.Tensor
    has_base: bool

    @property
    def rows(self) -> int:
        return len(self.slots)


def plan_rows(
    slots: Sequence[int] | torch.Tensor, capacity: int | None = None, device: torch.device | str | None = None
) -> RowPlan:
    """Build the :class:`RowPlan` of a batch whose row ``b`` uses slot ``slots[b]`` (:data:`BASE`: none).

    Call it once per ``per_sample`` block and pass the plan to every layer's
    :func:`lora_delta_rows` / :func:`ia3_rows`. ``capacity`` (the banks' slot count)
    checks the slot numbers; ``device`` is the banks' device.

    Raises:
        ArgumentValueError: a slot that is not an integer in ``[-1, capacity)``.
    """
    values = slots.tolist() if isinstance(slots, torch.Tensor) else list(slots)
    for index, value in enumerate(values):
        try:
            values[index] = number = operator.index(value)  # ints, numpy integers; not floats
        except TypeError:
            number = None
        if isinstance(value, bool) or number is None or number < BASE or (capacity is not None and number >= capacity):
            last = capacity - 1 if capacity is not None else "the bank's last slot"
            raise ArgumentValueError(
                f"row slot {value!r} is not a slot number; pass integers from 0 to {last}, "
                f"or {BASE} (BASE) for a row without adapter"
            )
    members: dict[int, list[int]] = {}
    for row, value in enumerate(values):
        if value != BASE:
            members.setdefault(value, []).append(row)
    distinct = tuple(members)
    order, groups = [], []
    for slot, rows in members.items():
        groups.append((slot, slice(len(order), len(order) + len(rows))))
        order += rows
    onehot = torch.zeros(len(values), len(distinct))
    for k, rows in enumerate(members.values()):
        onehot[rows, k] = 1.0
    lo, hi = (min(distinct), max(distinct) + 1) if distinct else (0, 0)
    depth = max(map(len, members.values()), default=0)
    seen: dict[int, int] = {}
    adapted, cell = [], []
    for row, value in enumerate(values):
        if value != BASE:
            adapted.append(row)
            cell.append((value - lo) * depth + seen.get(value, 0))
            seen[value] = seen.get(value, 0) + 1

    def longs(numbers: Sequence[int]) -> torch.Tensor:
        return torch.tensor(numbers, dtype=torch.long, device=device)

    slots_t = longs(values)
    return RowPlan(
        slots=slots_t,
        distinct=distinct,
        distinct_t=longs(distinct),
        order=longs(order),
        groups=tuple(groups),
        identity=order == list(range(len(values))),
        window=(lo, hi),
        depth=depth,
        adapted=longs(adapted),
        cell=longs(cell),
        onehot=onehot.to(device),
        gather_index=slots_t.clamp(min=0),
        row_mask=(slots_t != BASE).float(),
        has_base=BASE in values,
    )


def choose(plan: RowPlan, tokens_per_row: int = 1, rank: int = 16) -> Algorithm:
    """The algorithm :func:`lora_delta_rows` uses for ``plan`` and its input's shape (eager).

    * ``"none"``: every row is a base row (the delta is zero).
    * ``"grouped"`` (SGMV): one matmul pair per distinct adapter on its rows, taken as
      one slice each of the rows sorted by adapter. A few small ops per distinct adapter,
      plus (unless the rows already sit in adapter order) copies of the input rows and of
      the delta: ``B * tokens * (in + out)`` numbers.
    * ``"window"``: the rows scattered into a zero-padded ``[hi - lo, depth * tokens, in]``
      tensor over the slot range ``window = (lo, hi)``, then one batched matmul pair
      straight on the bank's slots ``lo:hi`` (a view: no weight copies). Computes
      ``(hi - lo) * depth`` padded rows for the ``M`` real ones.
    * ``"gather"`` (BGMV, the compile-safe path): each row's weights gathered from the
      banks, batched matmuls. A copy of one adapter per row: ``B * rank * (in + out)``.
    * ``"dense"`` (never chosen; measured slower, kept for benchmarks): every row through
      all distinct adapters' stacked ranks, the others masked out (FLOPs x K).

    Rules (CPU measurements, bench/kernels_micro.py): with rows already in adapter order
    and at most 8 adapters, or one or two adapters in decode, grouping (no copies, few
    ops); in decode (fewer tokens per row than the rank), the window when it computes at
    most twice the real rows (about 2x faster than the gather at 8 to 32 distinct
    adapters), else grouping for up to 8 adapters; the gather otherwise (prefill, where
    copying rows costs more than copying weights).
    """
    k = len(plan.distinct)
    if k == 0:
        return "none"
    decode = tokens_per_row < rank
    if k <= _GROUPED_MAX_DISTINCT and plan.identity:
        return "grouped"
    if decode and k <= 2:
        return "grouped"
    if decode:
        lo, hi = plan.window
        if (hi - lo) * plan.depth <= _WINDOW_MAX_WASTE * len(plan.adapted):
            return "window"
        if k <= _GROUPED_MAX_DISTINCT:
            return "grouped"
    return "gather"


def _check_plan(plan: RowPlan, batch: int) -> None:
    if plan.rows != batch:
        raise ArgumentValueError(
            f"the row plan has {plan.rows} rows but the batch has {batch}; build the plan from one slot per row"
        )


# -- LoRA ------------------------------------------------------------------------------


def lora_delta_rows(
    x: torch.Tensor,
    A_bank: torch.Tensor,
    B_bank: torch.Tensor,
    scale: torch.Tensor,
    slots: torch.Tensor | RowPlan,
    algorithm: Algorithm | None = None,
) -> torch.Tensor:
    """The LoRA delta of a mixed batch: row ``b`` of ``x`` through the adapter in slot ``slots[b]``.

    Equals what peft's ``LoraLayer._mixed_batch_forward`` adds to the base output
    (``adapter_names=`` with ``"__base__"`` for :data:`BASE` rows).

    Args:
        x: ``[B, ..., in]`` (any dtype; cast to ``A_bank.dtype``).
        A_bank, B_bank, scale: the layer's banks (module docstring).
        slots: ``LongTensor [B]`` (compile-safe: always the BGMV gather), or a
            :class:`RowPlan` (eager: the algorithm :func:`choose` picks).
        algorithm: force an algorithm with a plan (benchmarks, tests).

    Returns:
        ``[B, ..., out]`` in ``A_bank.dtype``; add it as peft's mixed batch does,
        ``result + delta.to(result.dtype)`` (the delta cast first).
    """
    batch = x.shape[0]
    x3 = x.reshape(batch, -1, x.shape[-1]).to(A_bank.dtype)
    if isinstance(slots, torch.Tensor):
        index = slots.clamp(min=0)  # BASE rows read slot 0 and get scale 0
        delta = _gather(x3, A_bank, B_bank, index, scale.index_select(0, index) * (slots != BASE))
    else:
        _check_plan(slots, batch)
        chosen = (algorithm or choose(slots, x3.shape[1], A_bank.shape[1])) if slots.distinct else "none"
        if chosen == "none":
            delta = x3.new_zeros(*x3.shape[:2], B_bank.shape[1])
        elif chosen == "grouped":
            delta = _grouped(x3, A_bank, B_bank, scale, slots)
        elif chosen == "window":
            delta = _window(x3, A_bank, B_bank, scale, slots)
        elif chosen == "gather":
            row_scale = scale.index_select(0, slots.gather_index) * slots.row_mask
            delta = _gather(x3, A_bank, B_bank, slots.gather_index, row_scale)
        elif chosen == "dense":
            delta = _dense_rows(x3, A_bank, B_bank, scale, slots)
        else:
            raise ArgumentValueError(f"unknown algorithm {chosen!r}; use one of none, grouped, window, gather, dense")
    return delta.reshape(*x.shape[:-1], B_bank.shape[1])


def lora_delta_active(
    x: torch.Tensor,
    A_bank: torch.Tensor,
    B_bank: torch.Tensor,
    scale: torch.Tensor,
    slots_k: torch.Tensor,
    weights_k: torch.Tensor | None = None,
) -> torch.Tensor:
    """The summed LoRA delta of the active set: every row through every adapter in ``slots_k``.

    Equals what peft's LoRA forward adds with these adapters active (the sum of
    their deltas), times ``weights_k`` when given. Compile-safe; ``K`` (1..4 typically)
    is a shape: pad a smaller set with weight-0 entries (any slot) to keep it fixed.

    Args:
        x: ``[..., in]``.
        slots_k: ``LongTensor [K]``, the active slots.
        weights_k: ``[K]`` factors on top of ``scale`` (None: 1). With a scale bank that
            already holds scaling x weight, pass 1 for live entries and 0 for padding.

    Returns:
        ``[..., out]`` in ``A_bank.dtype``; add it as peft's active forward does,
        ``(result + delta).to(result.dtype)`` (in the promoted dtype, then cast: with float32
        adapters on a bfloat16 base the sum is rounded once). The mixed batch differs:
        :func:`lora_delta_rows`.
    """
    x2 = x.reshape(-1, x.shape[-1]).to(A_bank.dtype)
    factors = scale.index_select(0, slots_k)
    if weights_k is not None:
        factors = factors * weights_k
    delta = _stacked(x2.unsqueeze(0), A_bank, B_bank, slots_k, factors)
    return delta.reshape(*x.shape[:-1], B_bank.shape[1])


def _stacked(
    x3: torch.Tensor, A_bank: torch.Tensor, B_bank: torch.Tensor, slots_k: torch.Tensor, factors: torch.Tensor
) -> torch.Tensor:
    """Every row through the K adapters ``slots_k`` (times ``factors``), summed: one matmul pair of inner size K*R."""
    k, rank, out = len(slots_k), A_bank.shape[1], B_bank.shape[1]
    a = A_bank.index_select(0, slots_k).reshape(k * rank, -1)
    b = B_bank.index_select(0, slots_k).permute(1, 0, 2).reshape(out, k * rank)
    low = torch.matmul(x3, a.t())
    low = (low.unflatten(-1, (k, rank)) * factors.to(low.dtype).unsqueeze(-1)).flatten(-2)
    return torch.matmul(low, b.t())


def _dense_rows(
    x3: torch.Tensor, A_bank: torch.Tensor, B_bank: torch.Tensor, scale: torch.Tensor, plan: RowPlan
) -> torch.Tensor:
    """Rows through the stacked distinct adapters, each row keeping only its own adapter's rank block."""
    k, rank, out = len(plan.distinct), A_bank.shape[1], B_bank.shape[1]
    a = A_bank.index_select(0, plan.distinct_t).reshape(k * rank, -1)
    b = B_bank.index_select(0, plan.distinct_t).permute(1, 0, 2).reshape(out, k * rank)
    low = torch.matmul(x3, a.t()).unflatten(-1, (k, rank))  # [B, T, K, R]
    mask = (plan.onehot * scale.index_select(0, plan.distinct_t)).to(low.dtype)  # [B, K]
    low = (low * mask[:, None, :, None]).flatten(-2)
    return torch.matmul(low, b.t())


def _gather(
    x3: torch.Tensor, A_bank: torch.Tensor, B_bank: torch.Tensor, index: torch.Tensor, row_scale: torch.Tensor
) -> torch.Tensor:
    """BGMV: each row's A and B gathered from the banks, then batched matmuls. ``x3`` is ``[B, T, in]``."""
    a = A_bank.index_select(0, index)  # [B, R, in]
    b = B_bank.index_select(0, index)  # [B, out, R]
    # Input rows first (x @ A^T, low @ B^T): on CPU this orientation of bmm is 1.5-2x faster than A @ x^T.
    low = torch.bmm(x3, a.transpose(1, 2)) * row_scale.to(x3.dtype)[:, None, None]  # [B, T, R]
    return torch.bmm(low, b.transpose(1, 2))  # [B, T, out]


def _window(
    x3: torch.Tensor, A_bank: torch.Tensor, B_bank: torch.Tensor, scale: torch.Tensor, plan: RowPlan
) -> torch.Tensor:
    """Rows padded into their slots' cells over the slot window, batched matmuls on the bank's slots lo:hi."""
    (lo, hi), depth = plan.window, plan.depth
    batch, tokens, _ = x3.shape
    adapted = x3.index_select(0, plan.adapted) if plan.has_base else x3
    cells = x3.new_zeros((hi - lo) * depth, tokens, x3.shape[2]).index_copy(0, plan.cell, adapted)
    cells = cells.view(hi - lo, depth * tokens, -1)
    low = torch.bmm(cells, A_bank[lo:hi].transpose(1, 2)) * scale[lo:hi, None, None].to(x3.dtype)
    out = torch.bmm(low, B_bank[lo:hi].transpose(1, 2)).view((hi - lo) * depth, tokens, -1)
    picked = out.index_select(0, plan.cell)
    if not plan.has_base:
        return picked
    return x3.new_zeros(batch, tokens, B_bank.shape[1]).index_copy(0, plan.adapted, picked)


def _grouped(
    x3: torch.Tensor, A_bank: torch.Tensor, B_bank: torch.Tensor, scale: torch.Tensor, plan: RowPlan
) -> torch.Tensor:
    """SGMV: one matmul pair per distinct adapter on its rows, rows sorted by adapter once per call."""
    rows = x3 if plan.identity else x3.index_select(0, plan.order)
    parts = []
    for slot, positions in plan.groups:
        # Bank slots are views (no copy); the int slot comes from the plan, not from a tensor.
        low = torch.matmul(rows[positions], A_bank[slot].t()) * scale[slot].to(x3.dtype)
        parts.append(torch.matmul(low, B_bank[slot].t()))
    grouped = parts[0] if len(parts) == 1 else torch.cat(parts)
    if plan.identity:
        return grouped
    return x3.new_zeros(*x3.shape[:2], B_bank.shape[1]).index_copy(0, plan.order, grouped)


# -- IA3 -------------------------------------------------------------------------------


def ia3_rows(
    t: torch.Tensor,
    vec_bank: torch.Tensor,
    slots: torch.Tensor | RowPlan,
    *,
    dim: int = -1,
    cast: bool = True,
    out_dtype: torch.dtype | None = None,
    slot_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Row ``b`` of ``t`` scaled by the IA3 vector in slot ``slots[b]`` (:data:`BASE` rows: unchanged).

    ``t`` is what peft scales: the layer input for a feedforward layer, the base
    layer's output otherwise. The vector acts along ``dim`` (-1 for Linear, 1 for
    convolutions). Compile-safe with a tensor ``slots``; a :class:`RowPlan` works too.

    peft's dtype handling, by layer:
        * Linear, feedforward: ``ia3_rows(x, bank, slots)`` (``cast=True``), then the base layer.
        * Linear, otherwise: ``ia3_rows(result, bank, slots, cast=False)`` (type promotion).
        * Conv, feedforward: ``ia3_rows(x, bank, slots, dim=1, out_dtype=base.weight.dtype)``.
        * Conv, otherwise: ``ia3_rows(result, bank, slots, dim=1)``.

    Args:
        cast: cast ``t`` to ``vec_bank.dtype`` before scaling (else: type promotion).
        out_dtype: the result's dtype (None: ``t.dtype``).
        slot_weights: ``[S]``, each slot's weight (``set_active(weights=)``): its vector acts as
            ``1 + w (v - 1)``; None: weight 1.
    """
    if isinstance(slots, RowPlan):
        _check_plan(slots, t.shape[0])
        slots = slots.slots
    vectors = vec_bank.index_select(0, slots.clamp(min=0))
    if slot_weights is not None:
        vectors = _weighted(vectors, slot_weights.index_select(0, slots.clamp(min=0)))
    vectors = torch.where((slots != BASE)[:, None], vectors, torch.ones_like(vectors))  # [B, F]
    dim = dim % t.dim()
    shape = [t.shape[0]] + [1] * (t.dim() - 1)
    shape[dim] = vectors.shape[1]
    return _scaled(t, vectors.reshape(shape), cast, out_dtype)


def ia3_active_vector(
    vec_bank: torch.Tensor, slots_k: torch.Tensor, weights_k: torch.Tensor | None = None
) -> torch.Tensor:
    """The product of the active set's IA3 vectors, ``[F]``, each weighted as ``1 + w (v - 1)``.

    Computed as ``w v + (1 - w)``: exactly ``v`` for ``w = 1`` and exactly 1 for ``w = 0``
    (padding entries of a fixed-size active set). Compile-safe.
    """
    vectors = vec_bank.index_select(0, slots_k)  # [K, F]
    if weights_k is not None:
        vectors = _weighted(vectors, weights_k)
    return vectors.prod(0)  # one op whatever K (K may change between calls under compile)


def _weighted(vectors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """IA3 vectors ``[K, F]`` with weights ``[K]`` as ``w v + (1 - w)``: exactly ``v`` at 1, exactly 1 at 0."""
    w = weights.to(vectors.dtype)[:, None]
    return vectors * w + (1 - w)


def ia3_active(
    t: torch.Tensor,
    vec_bank: torch.Tensor,
    slots_k: torch.Tensor,
    weights_k: torch.Tensor | None = None,
    *,
    dim: int = -1,
    cast: bool = True,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``t`` scaled by the active set's IA3 vectors (:func:`ia3_active_vector`) along ``dim``.

    Equals peft's IA3 forward with these adapters active; ``cast`` and ``out_dtype``
    as in :func:`ia3_rows`. Compile-safe.
    """
    vector = ia3_active_vector(vec_bank, slots_k, weights_k)
    dim = dim % t.dim()
    shape = [1] * t.dim()
    shape[dim] = vector.shape[0]
    return _scaled(t, vector.reshape(shape), cast, out_dtype)


def _scaled(t: torch.Tensor, vectors: torch.Tensor, cast: bool, out_dtype: torch.dtype | None) -> torch.Tensor:
    source = t.to(vectors.dtype) if cast else t
    return (source * vectors).to(out_dtype or t.dtype)
