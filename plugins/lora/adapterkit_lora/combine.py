"""LoRA's ``combine``: a new adapter from a weighted combination of LoRA adapters.

The combinations of peft's ``LoraModel.add_weighted_adapter``, with its bugs fixed:

* every combination but ``"linear"`` is defined on the adapters' updates
  ``ΔW_i = s_i B_i A_i`` (``s_i`` the adapter's own scaling, rsLoRA or not), never on A and B
  separately, so no cross terms ``B_i A_j`` appear;
* the result folds every scaling into its factors and has scaling 1 (``lora_alpha = r``,
  ``use_rslora=False``), so no scaling is applied twice;
* its config (``r``, ``rank_pattern``, ``alpha_pattern``, ``target_modules``) names each
  layer's rank and every adapted layer exactly, so it saves and reloads to the same ``ΔW``.

Layers are visited in sorted order of their module paths, and in each layer the adapters in
the order given: the DARE combinations draw their random masks in that order from torch's
global generator (``torch.manual_seed`` makes them repeatable), as peft's ``dare_*`` do.
See the "Combining adapters" section of docs/usage.md.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from adapterkit import ConfigValueError, UnsupportedOperationError
from adapterkit.layers import positions
from adapterkit_peft import adapter_tensors, biases_of
from adapterkit_peft.heads import head_state
from adapterkit_peft.targets import exact_modules
from peft import LoraConfig
from peft.tuners.lora.layer import MultiheadAttention as LoraMultiheadAttention
from peft.tuners.lora.layer import ParamWrapper
from torch import nn

__all__ = ["COMBINATIONS", "combine"]

_SVD = ("svd_rank", "svd_clamp", "svd_full_matrices")
_TIES = ("density", "majority_sign_method")

COMBINATIONS: dict[str, tuple[str, ...]] = {
    "linear": (),
    "cat": (),
    "svd": _SVD,
    "ties": _TIES,
    "ties_svd": _TIES + _SVD,
    "dare_linear": ("density",),
    "dare_linear_svd": ("density", *_SVD),
    "dare_ties": _TIES,
    "dare_ties_svd": _TIES + _SVD,
    "magnitude_prune": ("density",),
    "magnitude_prune_svd": ("density", *_SVD),
}
"""Each ``how`` LoRA's ``combine`` offers, with the options it takes."""

_OPTIONS = ("density", "majority_sign_method", *_SVD)

# The two tensors of a plain LoRA adapter on a layer: (A, B) suffixes, layers with weights / embeddings.
_FACTORS = (("lora_A.weight", "lora_B.weight"), ("lora_embedding_A", "lora_embedding_B"))


@dataclasses.dataclass
class _Part:
    """One adapter on one layer: its factors, its own scaling, and the combination's weight."""

    name: str
    a: torch.Tensor  # [r, in, *kernel]
    b: torch.Tensor  # [out, r, *ones]
    scaling: float
    weight: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def delta(self) -> torch.Tensor:
        """``ΔW = s B A`` as a matrix [out, in * kernel] (the layer's ΔW, reshaped or transposed: same entries)."""
        return (self.b.reshape(self.b.shape[0], -1) @ self.a.reshape(self.rank, -1)) * self.scaling


@dataclasses.dataclass
class _Layer:
    layer: nn.Module
    keys: tuple[str, str]  # the A and B suffixes
    parts: list[_Part]


def combine(
    plugin: Any, model: nn.Module, names: Sequence[str], weights: Sequence[float], how: str, options: dict[str, Any]
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The config and tensors of the combination ``how`` of LoRA adapters ``names`` (``adapterkit_combine``)."""
    options = _check_options(how, options)
    layers = _layers(plugin, model, list(names), list(weights))
    if how == "linear":  # peft's definition sums factors: equal ranks on each layer
        for path, found in sorted(layers.items()):
            if len({part.rank for part in found.parts}) != 1:
                raise ConfigValueError(
                    f"combine(how='linear') needs the adapters to have equal ranks on each layer; on {path!r} they "
                    f"have ranks { {part.name: part.rank for part in found.parts} }. Use how='cat' (exact, any "
                    "ranks) or how='svd'"
                )
    rank = options.get("svd_rank") or max(part.rank for found in layers.values() for part in found.parts)
    combination = _combination(how, options, rank)
    state: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    with torch.no_grad():
        for path in sorted(layers):  # the documented order (DARE's random masks)
            found = layers[path]
            a, b = combination(found.parts)
            first = found.parts[0]
            a = a.reshape(a.shape[0], *first.a.shape[1:])
            b = b.reshape(b.shape[0], a.shape[0], *first.b.shape[2:])
            state[f"{path}.{plugin.file_key(found.keys[0])}"] = a.contiguous().clone()
            state[f"{path}.{plugin.file_key(found.keys[1])}"] = b.contiguous().clone()
            ranks[path] = a.shape[0]
    return _config(model, layers, ranks, names[0]), state


# -- checks -------------------------------------------------------------------------------------------------------
def _check_options(how: Any, options: dict[str, Any]) -> dict[str, Any]:
    """The options ``how`` takes, checked; ``None`` values count as not given (peft's defaults)."""
    if not isinstance(how, str) or how not in COMBINATIONS:
        raise ConfigValueError(f"combine: how={how!r} is not a LoRA combination; use one of {list(COMBINATIONS)}")
    options = {key: value for key, value in options.items() if value is not None}
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise ConfigValueError(f"combine: unknown options {unknown}; LoRA combinations take {list(_OPTIONS)}")
    takes = COMBINATIONS[how]
    foreign = sorted(set(options) - set(takes))
    if foreign:
        hint = "the '_svd' combinations take the svd_* options" if set(foreign) & set(_SVD) else "see docs/usage.md"
        raise ConfigValueError(
            f"combine(how={how!r}) takes no option {foreign}; it takes {list(takes) or 'none'} ({hint})"
        )
    if "density" in takes:
        density = options.get("density")
        if density is None:
            raise ConfigValueError(f"combine(how={how!r}) needs density=, the fraction of each ΔW kept, in (0, 1]")
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise ConfigValueError(f"combine: density={density!r}; pass a fraction in (0, 1], e.g. density=0.5")
    sign = options.setdefault("majority_sign_method", "total") if "majority_sign_method" in takes else "total"
    if sign not in ("total", "frequency"):
        raise ConfigValueError(f"combine: majority_sign_method={sign!r}; use 'total' or 'frequency'")
    svd_rank = options.get("svd_rank")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
        raise ConfigValueError(f"combine: svd_rank={svd_rank!r}; pass a positive integer (default: the largest rank)")
    clamp = options.get("svd_clamp")
    if clamp is not None and (isinstance(clamp, bool) or not isinstance(clamp, (int, float)) or not 0 < clamp <= 1):
        raise ConfigValueError(f"combine: svd_clamp={clamp!r}; pass a quantile in (0, 1], e.g. svd_clamp=0.99")
    full = options.get("svd_full_matrices")
    if full is not None and not isinstance(full, bool):
        raise ConfigValueError(f"combine: svd_full_matrices={full!r}; pass True or False")
    return options


def _layers(plugin: Any, model: nn.Module, names: list[str], weights: list[float]) -> dict[str, _Layer]:
    """Every layer holding one of ``names``, by module path, with the parts of the adapters it holds."""
    for name in names:
        if name in biases_of(model):
            raise UnsupportedOperationError(
                f"combine: LoRA adapter {name!r} trains base biases (bias='all' or 'lora_only'), which a weighted "
                "combination cannot hold; combine adapters with bias='none'"
            )
        if head_state(model, name):
            raise UnsupportedOperationError(
                f"combine: LoRA adapter {name!r} has modules_to_save (whole copies of modules, not low-rank updates), "
                "which cannot be combined; combine adapters without modules_to_save"
            )
    layers: dict[str, _Layer] = {}
    for name, weight in zip(names, weights):
        for site in plugin.sites(model, name):
            layer = site.layer
            _check_layer(layer, name, site.logical)
            tensors = {suffix: getattr(owner, leaf) for suffix, owner, leaf in adapter_tensors(layer, name)}
            keys = next((pair for pair in _FACTORS if set(pair) == set(tensors)), None)
            if keys is None:
                raise UnsupportedOperationError(
                    f"combine: LoRA adapter {name!r} on {site.logical!r} has tensors {sorted(tensors)}, not just the "
                    "A and B of plain LoRA (lora_bias=True adds lora_B.bias); combine plain LoRA adapters"
                )
            a, b = (tensors[key].detach() for key in keys)
            if a.is_meta or b.is_meta:
                raise UnsupportedOperationError(
                    f"combine: LoRA adapter {name!r} on {site.logical!r} is offloaded (meta tensors); combine "
                    "before dispatching the model, or on a model on one device"
                )
            if b.shape[1] != a.shape[0] or any(size != 1 for size in b.shape[2:]):
                raise UnsupportedOperationError(
                    f"combine: the LoRA layer {site.logical!r} ({type(layer).__name__}) has factors of shapes "
                    f"{tuple(a.shape)} and {tuple(b.shape)} (e.g. a grouped convolution), not a product B A"
                )
            rank = layer.r[name]
            scaling = layer.lora_alpha[name] / (math.sqrt(rank) if layer.use_rslora.get(name, False) else rank)
            dtype = torch.promote_types(a.dtype, torch.float32)  # half precision: the arithmetic in float32
            part = _Part(name, a.to(dtype), b.to(dtype), scaling, weight)
            layers.setdefault(site.logical, _Layer(layer, keys, [])).parts.append(part)
    return layers


def _check_layer(layer: nn.Module, name: str, path: str) -> None:
    if layer.use_dora.get(name, False) or name in layer.lora_variant:
        kind = "DoRA" if layer.use_dora.get(name, False) else type(layer.lora_variant[name]).__name__
        raise UnsupportedOperationError(
            f"combine: LoRA adapter {name!r} on {path!r} is a {kind} adapter, whose update is not s B A; "
            "combine plain LoRA adapters"
        )
    if isinstance(layer, (LoraMultiheadAttention, ParamWrapper)):
        raise UnsupportedOperationError(
            f"combine: LoRA adapter {name!r} adapts {path!r} through a peft {type(layer).__name__} layer "
            "(nn.MultiheadAttention, or target_parameters), which combine does not support"
        )


# -- the combinations -------------------------------------------------------------------------------------------
Combination = Callable[[list[_Part]], tuple[torch.Tensor, torch.Tensor]]


def _combination(how: str, options: dict[str, Any], rank: int) -> Combination:
    """The function from one layer's parts to the result's (A, B) as matrices."""
    if how == "linear":
        return _linear
    if how == "cat":
        return _cat
    base = how.removesuffix("_svd")
    merge = _MERGES[base if base != "svd" else "task_arithmetic"]
    density, sign = options.get("density", 1.0), options.get("majority_sign_method", "total")

    def combination(parts: list[_Part]) -> tuple[torch.Tensor, torch.Tensor]:
        weights = torch.tensor([part.weight for part in parts], dtype=parts[0].a.dtype, device=parts[0].a.device)
        delta = merge([part.delta() for part in parts], weights, density, sign)
        if how.endswith("_svd") or how == "svd":
            return _factor(delta, rank, options.get("svd_clamp"), options.get("svd_full_matrices", True))
        return _factor(delta)

    return combination


def _linear(parts: list[_Part]) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's "linear": A and B combined separately, ``A = Σ sgn(w_i s_i) √|w_i s_i| A_i``, ``B = Σ √|w_i s_i| B_i``.

    Its ΔW = B A holds the cross terms ``B_i A_j`` (i ≠ j); it equals ``Σ w_i ΔW_i`` only for one adapter.
    """
    a = sum(math.copysign(math.sqrt(abs(p.weight * p.scaling)), p.weight * p.scaling) * p.a for p in parts)
    b = sum(math.sqrt(abs(p.weight * p.scaling)) * p.b for p in parts)
    return a.reshape(parts[0].rank, -1), b.reshape(b.shape[0], -1)  # type: ignore[union-attr]


def _cat(parts: list[_Part]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact: the factors side by side, ``A = [w_1 s_1 A_1; w_2 s_2 A_2; ...]``, ``B = [B_1, B_2, ...]``, rank Σ r_i."""
    a = torch.cat([(part.weight * part.scaling) * part.a.reshape(part.rank, -1) for part in parts], dim=0)
    b = torch.cat([part.b.reshape(part.b.shape[0], -1) for part in parts], dim=1)
    return a, b


def _factor(
    delta: torch.Tensor, rank: int | None = None, clamp: float | None = None, full_matrices: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``delta`` as ``B @ A`` (``B = U S``, ``A = Vh``): its best rank-``rank`` approximation, or exact (``None``)."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=full_matrices)
    if rank is None:  # exact: every singular value above float rounding
        rank = max(1, int((s > s[0] * max(delta.shape) * torch.finfo(s.dtype).eps).sum()))
    rank = min(rank, s.numel())
    b, a = u[:, :rank] * s[:rank], vh[:rank]
    if clamp is not None:  # peft's svd_clamp: a quantile of the factors' entries bounds them both
        high = torch.quantile(torch.cat([b.flatten(), a.flatten()]), clamp)
        b, a = b.clamp(-high, high), a.clamp(-high, high)
    return a, b


# ΔW merges, as peft.utils.merge_utils defines them on task tensors (here each adapter's ΔW).
def _trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of entries of largest magnitude."""
    if density >= 1:
        return delta
    mask = torch.zeros_like(delta).reshape(-1)
    mask[torch.topk(delta.abs().reshape(-1), k=int(density * delta.numel())).indices] = 1
    return delta * mask.reshape(delta.shape)


def _drop(delta: torch.Tensor, density: float) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` (torch's global generator), rescaled by 1 / density."""
    if density >= 1:
        return delta
    return delta * torch.bernoulli(torch.full_like(delta, density)) / density


def _weighted(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return deltas * weights.view(-1, *([1] * (deltas.dim() - 1)))


def _ties_merge(deltas: torch.Tensor, weights: torch.Tensor, sign: str) -> torch.Tensor:
    """Elect each entry's sign (on the unweighted ΔWs, as peft), average the weighted entries that agree."""
    signs = deltas.sign()
    majority = torch.where((deltas.sum(0) if sign == "total" else signs.sum(0)) >= 0, 1, -1)
    agree = signs == majority
    return (_weighted(deltas, weights) * agree).sum(0) / torch.clamp(agree.sum(0), min=1.0)


_MERGES: dict[str, Callable[[list[torch.Tensor], torch.Tensor, float, str], torch.Tensor]] = {
    "task_arithmetic": lambda ds, w, density, sign: _weighted(torch.stack(ds), w).sum(0),
    "magnitude_prune": lambda ds, w, density, sign: _weighted(torch.stack([_trim(d, density) for d in ds]), w).sum(0),
    "dare_linear": lambda ds, w, density, sign: _weighted(torch.stack([_drop(d, density) for d in ds]), w).sum(0),
    "ties": lambda ds, w, density, sign: _ties_merge(torch.stack([_trim(d, density) for d in ds]), w, sign),
    "dare_ties": lambda ds, w, density, sign: _ties_merge(torch.stack([_drop(d, density) for d in ds]), w, sign),
}


# -- the result's config ----------------------------------------------------------------------------------------
def _config(model: nn.Module, layers: dict[str, _Layer], ranks: dict[str, int], first: str) -> LoraConfig:
    """A config that rebuilds exactly these layers, at these ranks, with scaling 1."""
    counts = collections.Counter(ranks.values())
    r = max(counts, key=lambda k: (counts[k], k))  # the most common rank; the others in rank_pattern
    # Keys are regexes peft matches as "(.*\.)?(key)$", the first match winning: escaped full paths,
    # longest first, so that no key matches another layer than its own.
    pattern = {re.escape(path): k for path, k in sorted(ranks.items(), key=lambda item: -len(item[0])) if k != r}
    holder = next(found.layer for found in layers.values() if first in found.layer.lora_dropout)
    dropout = holder.lora_dropout[first]
    return LoraConfig(
        r=r,
        lora_alpha=r,
        use_rslora=False,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),  # alpha = rank on every layer: scaling 1
        target_modules=exact_modules(list(layers), (path for path, *_ in positions(model))),
        lora_dropout=dropout.p if isinstance(dropout, nn.Dropout) else 0.0,
        fan_in_fan_out=any(getattr(found.layer, "fan_in_fan_out", False) for found in layers.values()),
        bias="none",
    )
