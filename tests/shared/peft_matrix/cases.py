"""The case table: which config of which method on which model, and what adapterkit refuses.

It covers the ground of the TEST_CASES of peft's ``tests/test_custom_models.py``
for LoRA, IA3 and AdaLoRA (target forms, DoRA, rsLoRA, rank and alpha
patterns, ``lora_bias``, ``bias``, ``layers_to_transform``, ``target_parameters``,
every layer kind of :mod:`peft_matrix.models`). ``modules_to_save`` and
``trainable_token_indices`` belong to the training-stack work and are left out.

A case either works end to end or names, per operation, the typed error
adapterkit raises instead (and why): the suite asserts the refusal, the model
left exactly as it was.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import pytest
from adapterkit import ConfigValueError, TargetError, UnsupportedOperationError

METHODS = ("lora", "ia3", "adalora")

# Why an operation is refused; the docs page on peft parity says the same.
GROUPED_MERGE = "peft cannot merge LoRA into a convolution with groups > 1"
NO_BASE_BIAS = "lora_bias=True cannot merge into a layer without a bias"
CONV3D_1X1_MERGE = "peft 0.21 cannot merge LoRA into a Conv3d with a 1x1 kernel face (its 1x1 shortcut assumes Conv2d)"
DORA_ROWS = "peft's mixed batches cannot take DoRA adapters"
MHA_ROWS = "peft's MultiheadAttention layer merges the adapter into the weights on each forward: no per-row adapters"
PARAM_ROWS = "an adapted nn.Parameter is one weight for the whole batch (peft: no mixed batches for target_parameters)"
BIAS_ROWS = "bias='lora_only'/'all' trains base biases, which every row of a batch shares"


@dataclasses.dataclass(frozen=True)
class Case:
    """One config of one method on one model of :data:`peft_matrix.models.MODELS`."""

    id: str
    model: str
    method: str
    config: Mapping[str, Any]
    refuses: Mapping[str, tuple[type[Exception], str]] = dataclasses.field(default_factory=dict)
    """Operation ("merge", "per_sample") -> (adapterkit's error, why)."""

    @property
    def exact_after_training(self) -> bool:
        """Whether training gives bit-identical results in peft and adapterkit.

        Not with nn.MultiheadAttention: peft's layer merges the adapter into the attention weights for
        each call and subtracts it after, so its base weights move by float rounding on the first call;
        adapterkit puts the original weights back (the base model stays exact). Later calls then agree
        up to that rounding.
        """
        return self.model != "mha"

    @property
    def peft_mixed_batch(self) -> bool:
        """Whether peft's own ``adapter_names=`` forward computes per-row adapters for this case."""
        return self.method == "lora" and "per_sample" not in self.refuses

    @property
    def bias(self) -> str:
        return self.config.get("bias", "none")


@dataclasses.dataclass(frozen=True)
class RefusedCase:
    """A config peft refuses for this model; adapterkit refuses it too, with ``error``, on add and on load."""

    id: str
    model: str
    method: str
    config: Mapping[str, Any]
    error: type[Exception]


def _lora(id: str, model: str, refuses: Mapping[str, tuple[type[Exception], str]] | None = None, **config: Any) -> Case:
    return Case(id, model, "lora", config, refuses or {})


def _ia3(id: str, model: str, **config: Any) -> Case:
    return Case(id, model, "ia3", config)


def _adalora(
    id: str, model: str, refuses: Mapping[str, tuple[type[Exception], str]] | None = None, **config: Any
) -> Case:
    return Case(id, model, "adalora", {"total_step": 1, **config}, refuses or {})


_MERGE_GROUPED = {"merge": (UnsupportedOperationError, GROUPED_MERGE)}
_MERGE_CONV3D_1X1 = {"merge": (UnsupportedOperationError, CONV3D_1X1_MERGE)}
_ROWS_DORA = {"per_sample": (UnsupportedOperationError, DORA_ROWS)}
_ROWS_MHA = {"per_sample": (UnsupportedOperationError, MHA_ROWS)}
_ROWS_PARAM = {"per_sample": (UnsupportedOperationError, PARAM_ROWS)}
_ROWS_BIAS = {"per_sample": (UnsupportedOperationError, BIAS_ROWS)}

CASES: list[Case] = [
    # -- LoRA: linear layers --------------------------------------------------------
    _lora("dense-regex", "dense", target_modules="proj_in"),
    _lora("dense-in", "dense", target_modules=["proj_in"]),
    _lora("dense-out", "dense", target_modules=["proj_out"]),
    _lora("dense-both", "dense", target_modules=["proj_in", "proj_out"]),
    _lora("dense-alpha-dropout", "dense", target_modules=["proj_in"], lora_alpha=4, lora_dropout=0.1),
    _lora("dense-rslora", "dense", target_modules=["proj_in", "proj_out"], r=4, lora_alpha=16, use_rslora=True),
    _lora(
        "dense-patterns", "dense", target_modules=["proj_in", "proj_out"], r=4,
        rank_pattern={"proj_out": 2}, alpha_pattern={"proj_in": 16},
    ),  # fmt: skip
    _lora("dense-dora-in", "dense", _ROWS_DORA, target_modules=["proj_in"], use_dora=True),
    _lora("dense-dora-both", "dense", _ROWS_DORA, target_modules=["proj_in", "proj_out"], use_dora=True),
    _lora("dense-dora-alpha", "dense", _ROWS_DORA, target_modules="proj_out", use_dora=True, lora_alpha=32),
    _lora("dense-lora-bias", "dense", target_modules=["proj_in", "proj_out"], lora_bias=True, lora_alpha=32),
    _lora(
        "dense-nobias-lora-bias", "dense_nobias", {"merge": (UnsupportedOperationError, NO_BASE_BIAS)},
        target_modules=["proj_in", "proj_out"], lora_bias=True,
    ),  # fmt: skip
    _lora("dense-nobias", "dense_nobias", target_modules=["proj_in", "proj_out"]),
    _lora("dense-bias-lora-only", "dense", _ROWS_BIAS, target_modules=["proj_in"], bias="lora_only"),
    _lora("dense-bias-all", "dense", _ROWS_BIAS, target_modules=["proj_in"], bias="all"),
    _lora("stack-layers", "stack", target_modules=["fc"], layers_to_transform=[0, 2], layers_pattern="layers"),
    # -- LoRA: embedding and transformers' Conv1D -------------------------------------------
    _lora("conv1D", "tokens_conv1D", target_modules=["conv1d"]),
    _lora("emb", "tokens_conv1D", target_modules=["emb"]),
    _lora("emb-conv1D", "tokens_conv1D", target_modules=["emb", "conv1d"]),
    _lora("conv1D-dora", "tokens_conv1D", _ROWS_DORA, target_modules=["conv1d"], use_dora=True),
    _lora("emb-dora", "tokens_conv1D", _ROWS_DORA, target_modules=["emb"], use_dora=True),
    _lora("emb-conv1D-dora", "tokens_conv1D", _ROWS_DORA, target_modules=["emb", "conv1d"], use_dora=True),
    _lora("conv1D-bias-all", "tokens_conv1D", _ROWS_BIAS, target_modules=["conv1d"], bias="all"),
    # -- LoRA: convolutions -------------------------------------------------------------
    _lora("conv1d", "conv1d", target_modules=["conv"]),
    _lora("conv1d-dora", "conv1d", _ROWS_DORA, target_modules=["conv"], use_dora=True),
    _lora("conv1d-groups", "conv1d_groups", _MERGE_GROUPED, target_modules=["conv"]),
    _lora("conv2d", "conv2d", target_modules=["conv"]),
    _lora("conv2d-head", "conv2d", target_modules=["conv", "head"]),
    _lora("conv2d-dora", "conv2d", _ROWS_DORA, target_modules=["conv"], use_dora=True),
    _lora("conv2d-head-dora", "conv2d", _ROWS_DORA, target_modules=["conv", "head"], use_dora=True),
    _lora("conv2d-groups", "conv2d_groups", _MERGE_GROUPED, target_modules=["conv"]),
    _lora(
        "conv2d-groups-dora", "conv2d_groups", {**_MERGE_GROUPED, **_ROWS_DORA}, target_modules=["conv"], use_dora=True
    ),
    _lora("conv2d-1x1", "conv2d_1x1", target_modules=["conv"]),
    _lora("conv2d-lora-bias", "conv2d", target_modules=["conv"], lora_bias=True, lora_alpha=32),
    _lora("conv2d-bias-lora-only", "conv2d", _ROWS_BIAS, target_modules=["conv", "head"], bias="lora_only"),
    _lora("conv3d", "conv3d", target_modules=["conv"]),
    _lora("conv3d-head", "conv3d", target_modules=["conv", "head"]),
    _lora("conv3d-dora", "conv3d", _ROWS_DORA, target_modules=["conv"], use_dora=True),
    _lora("conv3d-head-dora", "conv3d", _ROWS_DORA, target_modules=["conv", "head"], use_dora=True),
    _lora("conv3d-1x1", "conv3d_1x1", _MERGE_CONV3D_1X1, target_modules=["conv"]),
    _lora(
        "conv3d-1x1-dora", "conv3d_1x1", {**_MERGE_CONV3D_1X1, **_ROWS_DORA}, target_modules=["conv"], use_dora=True
    ),
    _lora("conv3d-lora-bias", "conv3d", target_modules=["conv"], lora_bias=True, lora_alpha=32),
    # -- LoRA: nn.MultiheadAttention ----------------------------------------------------------
    _lora("mha", "mha", _ROWS_MHA, target_modules=["mha"]),
    _lora("mha-head", "mha", _ROWS_MHA, target_modules=["mha", "head"]),
    _lora("mha-bias-lora-only", "mha", {**_ROWS_MHA, **_ROWS_BIAS}, target_modules=["mha"], bias="lora_only"),
    # -- LoRA: nn.Parameter targets (target_parameters) ---------------------------------------
    _lora("param", "affine", _ROWS_PARAM, target_parameters=["proj_in.weight"]),
    _lora("param-both", "affine", _ROWS_PARAM, target_parameters=["proj_in.weight", "proj_out.weight"]),
    _lora("module-and-param", "dense", _ROWS_PARAM, target_modules=["proj_in"], target_parameters=["proj_out.weight"]),
    _lora("experts", "experts", _ROWS_PARAM, target_parameters=["experts.gate_up_proj", "experts.down_proj"]),
    _lora(
        "experts-router-bias-all", "experts", {**_ROWS_PARAM, **_ROWS_BIAS},
        target_modules=["router"], target_parameters=["experts.down_proj"], bias="all",
    ),  # fmt: skip
    # -- IA3 ------------------------------------------------------------------------------------
    _ia3("dense-regex", "dense", target_modules="proj_in", feedforward_modules=[]),
    _ia3("dense-regex-ff", "dense", target_modules="proj_in", feedforward_modules="proj_in"),
    _ia3("dense-in", "dense", target_modules=["proj_in"], feedforward_modules=[]),
    _ia3("dense-in-ff", "dense", target_modules=["proj_in"], feedforward_modules=["proj_in"]),
    _ia3("dense-out", "dense", target_modules=["proj_out"], feedforward_modules=[]),
    _ia3("dense-out-ff", "dense", target_modules=["proj_out"], feedforward_modules=["proj_out"]),
    _ia3("dense-both", "dense", target_modules=["proj_in", "proj_out"], feedforward_modules=[]),
    _ia3("dense-both-ff", "dense", target_modules=["proj_in", "proj_out"], feedforward_modules=["proj_in", "proj_out"]),
    _ia3("dense-nobias", "dense_nobias", target_modules=["proj_in", "proj_out"], feedforward_modules=["proj_out"]),
    _ia3("conv1D-ff", "tokens_conv1D", target_modules=["conv1d"], feedforward_modules=["conv1d"]),
    _ia3("conv1D-head-ff", "tokens_conv1D", target_modules=["conv1d", "head"], feedforward_modules=["conv1d", "head"]),
    _ia3("conv2d", "conv2d", target_modules=["conv"], feedforward_modules=[]),
    _ia3("conv2d-ff", "conv2d", target_modules=["conv"], feedforward_modules=["conv"]),
    _ia3("conv2d-head", "conv2d", target_modules=["conv", "head"], feedforward_modules=[]),
    _ia3("conv2d-head-ff-conv", "conv2d", target_modules=["conv", "head"], feedforward_modules=["conv"]),
    _ia3("conv2d-head-ff", "conv2d", target_modules=["conv", "head"], feedforward_modules=["conv", "head"]),
    _ia3("conv3d", "conv3d", target_modules=["conv"], feedforward_modules=[]),
    _ia3("conv3d-ff", "conv3d", target_modules=["conv"], feedforward_modules=["conv"]),
    _ia3("conv3d-head", "conv3d", target_modules=["conv", "head"], feedforward_modules=[]),
    _ia3("conv3d-head-ff-conv", "conv3d", target_modules=["conv", "head"], feedforward_modules=["conv"]),
    _ia3("conv3d-head-ff", "conv3d", target_modules=["conv", "head"], feedforward_modules=["conv", "head"]),
    # IA3Config has no layers_to_transform: a regular expression picks the layers
    _ia3("stack-regex", "stack", target_modules=r"layers\.(0|2)\.fc", feedforward_modules=[]),
    # -- AdaLoRA ----------------------------------------------------------------------------------
    _adalora("dense-in", "dense", target_modules=["proj_in"], orth_reg_weight=0.0),
    _adalora("dense-both", "dense", target_modules=["proj_in", "proj_out"]),
    _adalora("dense-both-r", "dense", target_modules=["proj_in", "proj_out"], init_r=6, lora_alpha=12),
    _adalora("conv1D", "tokens_conv1D", target_modules=["conv1d", "head"]),
    _adalora("conv2d", "conv2d", target_modules=["conv"]),
    _adalora("conv2d-head", "conv2d", target_modules=["conv", "head"]),
    _adalora("stack-layers", "stack", target_modules=["fc"], layers_to_transform=[0, 2], layers_pattern="layers"),
    _adalora("dense-bias-lora-only", "dense", _ROWS_BIAS, target_modules=["proj_in"], bias="lora_only"),
]

REFUSED: list[RefusedCase] = [
    RefusedCase("ia3-emb", "tokens_conv1D", "ia3", {"target_modules": ["emb"], "feedforward_modules": []}, TargetError),
    RefusedCase("ia3-mha", "mha", "ia3", {"target_modules": ["mha"], "feedforward_modules": []}, TargetError),
    RefusedCase("adalora-emb", "tokens_conv1D", "adalora", {"target_modules": ["emb"], "total_step": 1}, TargetError),
    RefusedCase("adalora-mha", "mha", "adalora", {"target_modules": ["mha"], "total_step": 1}, TargetError),
    RefusedCase("lora-mha-dora", "mha", "lora", {"target_modules": ["mha"], "use_dora": True}, ConfigValueError),
    RefusedCase(
        "lora-emb-lora-bias", "tokens_conv1D", "lora", {"target_modules": ["emb"], "lora_bias": True}, TargetError
    ),
    RefusedCase("lora-groups-rank", "conv2d_groups", "lora", {"target_modules": ["conv"], "r": 3}, ConfigValueError),
]


def cases_for(method: str) -> list[Any]:
    """The cases of ``method`` as pytest params (ids: the case ids)."""
    return [pytest.param(case, id=case.id) for case in CASES if case.method == method]


def refused_for(method: str) -> list[Any]:
    return [pytest.param(case, id=case.id) for case in REFUSED if case.method == method]
