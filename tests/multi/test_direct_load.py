"""Loading builds exactly the layers peft builds, through the direct path or the tuner fallback.

``PeftMethod(direct_load=True)`` wraps each target with the tuner's per-target code instead of
constructing the tuner (see adapterkit_peft). These tests hold it to peft: same module tree, same
per-layer settings, same requires_grad, same outputs as ``PeftModel.from_pretrained`` of the
same folder, for configs that take the direct path and for those that fall back to the tuner.
"""

from __future__ import annotations

import pytest
import torch
from conftest import Fingerprint, llama_input, make_llama, run
from peft import AdaLoraConfig, IA3Config, LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

import adapterkit
from adapterkit import TargetError
from adapterkit_peft import PeftMethod

QKV_DOWN = ["q_proj", "v_proj", "down_proj"]
CONFIGS = {
    # direct path
    "lora-patterns-dropout": lambda: LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.1,
        target_modules=QKV_DOWN,
        rank_pattern={"v_proj": 2},
        alpha_pattern={"down_proj": 3},
    ),
    "lora-rslora-regex": lambda: LoraConfig(r=4, use_rslora=True, target_modules=r".*\.(q_proj|o_proj)"),
    "lora-layers-to-transform": lambda: LoraConfig(
        r=2, target_modules=QKV_DOWN, layers_to_transform=[1], layers_pattern="layers"
    ),
    "lora-exclude": lambda: LoraConfig(r=2, target_modules=QKV_DOWN, exclude_modules=r".*\.0\.self_attn\.q_proj"),
    "lora-embedding": lambda: LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"]),
    "ia3-feedforward": lambda: IA3Config(target_modules=QKV_DOWN, feedforward_modules=["down_proj"]),
    "adalora": lambda: AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=QKV_DOWN),
    # tuner fallback
    "lora-dora": lambda: LoraConfig(r=2, use_dora=True, target_modules=QKV_DOWN),
    "lora-all-linear": lambda: LoraConfig(r=2, target_modules="all-linear"),
    "lora-model-defaults": lambda: LoraConfig(r=2),
}


def save_peft_adapter(config, folder, seed=0):
    model = get_peft_model(make_llama(), config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:  # the adapter's weights: random, so outputs differ from the base model
                param.copy_(torch.randn_like(param) * 0.1)
    model.save_pretrained(folder)  # with a targeted embedding, peft saves its base weights too
    return folder


def layer_settings(model):
    """Module types by path, and each adapter layer's per-adapter settings (peft's plain dicts)."""
    types, settings = {}, {}
    for path, module in model.named_modules():
        types[path] = type(module).__name__
        if isinstance(module, BaseTunerLayer):
            settings[path] = {
                attr: dict(getattr(module, attr))
                for attr in ("r", "lora_alpha", "scaling", "use_dora")
                if isinstance(getattr(module, attr, None), dict)
            }
            dropout = getattr(module, "lora_dropout", None)
            if dropout is not None:
                settings[path]["dropout"] = {k: (type(v).__name__, getattr(v, "p", None)) for k, v in dropout.items()}
    return types, settings


@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_load_builds_what_peft_builds(kind, trainable, tmp_path):
    folder = save_peft_adapter(CONFIGS[kind](), tmp_path / kind)
    oracle = PeftModel.from_pretrained(make_llama(), folder, adapter_name="a", is_trainable=trainable).base_model.model
    model = make_llama()
    adapterkit.attach(model).load(folder, "a", is_trainable=trainable)

    assert layer_settings(model) == layer_settings(oracle)
    ours = {name: p.requires_grad for name, p in model.named_parameters()}
    assert ours == {name: p.requires_grad for name, p in oracle.named_parameters()}
    assert any(ours.values()) == trainable
    if not trainable:  # dropout is active when training
        x = llama_input()
        assert torch.equal(run(model, x), run(oracle, x))
        assert not torch.equal(run(model, x), run(make_llama(), x))


def test_many_loads_keep_each_adapters_trainability(tmp_path):
    folders = [save_peft_adapter(CONFIGS["lora-patterns-dropout"](), tmp_path / str(i), seed=i) for i in range(2)]
    model = make_llama()
    adapters = adapterkit.attach(model)
    adapters.load(folders[0], "t", is_trainable=True)
    for i in range(5):
        adapters.load(folders[i % 2], f"f{i}")

    def training():
        return {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad}

    assert training() == set()  # the last load is the only active adapter, and it is frozen
    adapters.set_active(["t", "f3"])
    assert training() == {"t"}
    adapters.set_active("f4")
    assert training() == set()
    adapters.set_active("t")
    assert training() == {"t"}
    x = llama_input()
    alone = make_llama()
    adapterkit.attach(alone).load(folders[0], "t")
    assert torch.equal(run(model, x), run(alone, x))


def test_a_load_that_fails_while_creating_layers_changes_nothing(tmp_path):
    folder = save_peft_adapter(CONFIGS["lora-patterns-dropout"](), tmp_path / "ok")
    model = make_llama()
    adapters = adapterkit.attach(model)
    adapters.load(folder, "first")
    originals = (nn.init.kaiming_uniform_, nn.init.zeros_, BaseTunerLayer.set_adapter)
    x = llama_input()
    before = Fingerprint(model, x)
    # act_fn (SiLU) matches the pattern too: peft refuses it after wrapping some projections.
    config = LoraConfig(r=2, target_modules=r".*\.(q_proj|act_fn)")
    state = {
        f"model.layers.{i}.self_attn.q_proj.lora_{ab}.weight": w
        for i in range(2)
        for ab, w in (("A", torch.zeros(2, 32)), ("B", torch.zeros(32, 2)))
    }
    with pytest.raises(TargetError, match="act_fn|not supported"):
        adapters.load(None, "broken", config=config, state_dict=state)
    before.assert_same(model, x)
    assert (nn.init.kaiming_uniform_, nn.init.zeros_, BaseTunerLayer.set_adapter) == originals
    assert adapters.names == ["first"]


def test_direct_load_is_opt_in_for_peft_methods():
    method = PeftMethod("mine", LoraConfig, type(None))
    assert method.direct_load is False
