"""The adalora plugin against peft as the oracle: training with rank allocation, checkpoints both ways, model API."""

from __future__ import annotations

import copy
import json
import types
import warnings

import adapterkit
import pytest
import torch
from adapterkit_adalora import AdaLoraMethod, orthogonal_regularization, update_and_allocate
from peft import (
    AdaLoraConfig,
    PeftConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F
from transformers import LlamaConfig, LlamaForCausalLM

PREFIX = "base_model.model."

# peft's own warnings in the oracle paths: loading a rank_pattern into PeftModel ("keys did not match any
# targeted module") and saving layers pruned to rank 0 ("invalid shape"). adapterkit's paths emit neither
# (test_pruned_checkpoint_loads_in_adapterkit checks).
pytestmark = [
    pytest.mark.filterwarnings("ignore:The following rank_pattern keys did not match:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:.*LoRA tensor\\(s\\) have invalid shape"),
]
SCHEDULE = dict(init_r=4, target_r=2, total_step=20, tinit=2, tfinal=2, deltaT=1)
LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]
MLP_TARGETS = ["inp", "block.0", "block.2"]


# -- models ---------------------------------------------------------------------------------
def llama() -> nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=64,
    )
    return LlamaForCausalLM(config).eval()


class MLP(nn.Module):
    """A plain module; with a target it returns an object with ``.loss`` (as AdaLoraModel.forward expects)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.block = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None):
        out = self.block(torch.relu(self.inp(x)))
        if target is None:
            return out
        return types.SimpleNamespace(loss=F.mse_loss(out, target), logits=out)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return MLP().eval()


_gen = torch.Generator().manual_seed(123)
IDS = torch.randint(0, 64, (3, 6), generator=_gen)
X = torch.randn(4, 8, generator=_gen)
LLAMA_DATA = [torch.randint(0, 64, (2, 6), generator=_gen) for _ in range(20)]
MLP_DATA = [(torch.randn(6, 8, generator=_gen), torch.randn(6, 4, generator=_gen)) for _ in range(20)]


def spec(targets: list[str], **extra) -> str:
    options = {**SCHEDULE, **extra, "target_modules": targets}
    return "adalora[" + ", ".join(f"{k}={v!r}" for k, v in options.items()) + "]"


def output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        y = model(x)
    return y.logits if hasattr(y, "logits") else y


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def snapshot(model: nn.Module) -> tuple[str, dict[str, torch.Tensor], dict[str, bool]]:
    return (
        str(model),
        {n: p.detach().clone() for n, p in model.named_parameters()},
        {n: p.requires_grad for n, p in model.named_parameters()},
    )


def assert_same(before: tuple, after: tuple) -> None:
    assert before[0] == after[0]
    assert list(before[1]) == list(after[1])
    for key, value in before[1].items():
        assert torch.equal(value, after[1][key]), key
    assert before[2] == after[2]


def files(folder) -> tuple[dict[str, torch.Tensor], dict]:
    return load_file(folder / "adapter_model.safetensors"), json.loads((folder / "adapter_config.json").read_text())


def scramble(model: nn.Module, seed: int, name: str = "default") -> None:
    """Give an adapter's triplets non-trivial values (lora_E starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if any(f"{part}.{name}" in key for part in ("lora_A", "lora_B", "lora_E")):
                param.copy_(torch.randn(param.shape, generator=g) * 0.5)


# -- training in lockstep with peft ---------------------------------------------------------------
CASES = {
    "llama": (llama, LLAMA_TARGETS, "CAUSAL_LM", IDS),
    "mlp": (mlp, MLP_TARGETS, None, X),
}


def batches(case: str):
    if case == "llama":
        return [((ids,), {"labels": ids}) for ids in LLAMA_DATA]
    return [((x, y), {}) for x, y in MLP_DATA]


def peft_loss(case: str, peft_model, args, kwargs) -> torch.Tensor:
    # PeftModelForCausalLM adds the orthogonal regularisation in AdaLoraModel.forward; for a plain
    # module (no task type) PeftModel.forward skips the tuner, so call it directly.
    if case == "llama":
        return peft_model(input_ids=args[0], **kwargs).loss
    return peft_model.base_model(*args, **kwargs).loss


@pytest.fixture(scope="module", params=list(CASES))
def trained(request, tmp_path_factory):
    """Train an adapterkit AdaLoRA adapter and an equivalent PeftModel side by side through rank allocation."""
    case = request.param
    factory, targets, task_type, _ = CASES[case]
    model = factory()
    adapters = adapterkit.attach(model)
    adapters.add(spec(targets))
    peft_model = get_peft_model(factory(), AdaLoraConfig(task_type=task_type, target_modules=targets, **SCHEDULE))
    set_peft_model_state_dict(peft_model, adapters.state_dict())  # same initial weights

    ours_opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.02)
    peft_opt = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=0.02)
    model.train()
    peft_model.train()
    losses, patterns = [], []
    for step, (args, kwargs) in enumerate(batches(case)):
        reg = orthogonal_regularization(model)
        ours = model(*args, **kwargs).loss + reg
        theirs = peft_loss(case, peft_model, args, kwargs)
        losses.append((ours.item(), theirs.item(), reg.item()))
        ours.backward()
        theirs.backward()
        ours_opt.step()
        peft_opt.step()
        update_and_allocate(model, step)
        peft_model.base_model.update_and_allocate(step)
        patterns.append((copy.deepcopy(adapters.config("default").rank_pattern),
                         copy.deepcopy(peft_model.peft_config["default"].rank_pattern)))
        ours_opt.zero_grad()
        peft_opt.zero_grad()
    model.eval()
    peft_model.eval()
    folder = tmp_path_factory.mktemp(f"{case}_ours")
    peft_folder = tmp_path_factory.mktemp(f"{case}_peft")
    adapters.save(folder)
    peft_model.save_pretrained(peft_folder)
    return types.SimpleNamespace(
        case=case, factory=factory, x=CASES[case][3], model=model, adapters=adapters, peft_model=peft_model,
        losses=losses, patterns=patterns, folder=folder, peft_folder=peft_folder,
    )


def test_training_matches_peft_step_by_step(trained) -> None:
    for ours, theirs, reg in trained.losses:
        assert abs(ours - theirs) <= 1e-6
        assert reg > 0  # the regularisation is really part of the loss
    # the allocation after every step, intermediate ones included, is peft's (peft keeps the adapter name in the keys)
    for step, (ours, theirs) in enumerate(trained.patterns):
        assert (ours is None) == (theirs is None), step
        if ours is not None:
            assert ours == {k.removesuffix(".default"): v for k, v in theirs.items()}, step
    assert trained.patterns[SCHEDULE["tinit"]][0] is None  # nothing before tinit
    intermediate = trained.patterns[SCHEDULE["tinit"] + 1][0]
    assert intermediate is not None and sum(map(sum, intermediate.values())) > SCHEDULE["target_r"] * len(intermediate)
    pattern = trained.adapters.config("default").rank_pattern
    assert pattern == trained.patterns[-1][0]
    n_layers = len(pattern)
    assert n_layers == (6 if trained.case == "llama" else 3)
    kept = [sum(mask) for mask in pattern.values()]
    assert sum(kept) == SCHEDULE["target_r"] * n_layers  # the final budget
    assert min(kept) < SCHEDULE["init_r"]  # ranks were pruned
    assert all(len(mask) == SCHEDULE["init_r"] for mask in pattern.values())


def test_saved_checkpoint_equals_peft_save(trained) -> None:
    tensors, config = files(trained.folder)
    peft_tensors, peft_config = files(trained.peft_folder)
    assert sorted(tensors) == sorted(peft_tensors)
    assert not any("ranknum" in k for k in tensors)
    for key, value in peft_tensors.items():
        assert value.shape == tensors[key].shape, key
        assert max_diff(tensors[key], value) <= 1e-6 if value.numel() else True, key
    assert config["rank_pattern"] == peft_config["rank_pattern"]
    assert config["peft_type"] == "ADALORA"
    pattern = config["rank_pattern"]
    for key, mask in pattern.items():  # cut down to the kept triplets
        prefix = PREFIX + key.removesuffix(".lora_E")
        assert tensors[f"{prefix}.lora_E"].shape == (sum(mask), 1)
        assert tensors[f"{prefix}.lora_A"].shape[0] == sum(mask)
        assert tensors[f"{prefix}.lora_B"].shape[1] == sum(mask)
    # the state dict is the same cut-down one
    state = trained.adapters.state_dict()
    assert sorted(state) == sorted(tensors) and all(torch.equal(state[k], tensors[k]) for k in state)


def test_our_checkpoint_loads_in_peft(trained) -> None:
    ours = output(trained.model, trained.x)
    peft_model = PeftModel.from_pretrained(trained.factory(), trained.folder).eval()
    assert max_diff(output(peft_model, trained.x), ours) <= 1e-6
    assert max_diff(ours, output(trained.factory(), trained.x)) > 1e-4  # the adapter does something
    tensors, _ = files(trained.folder)
    peft_state = get_peft_model_state_dict(peft_model)
    assert sorted(peft_state) == sorted(tensors)
    for key, value in peft_state.items():
        assert torch.equal(value, tensors[key]), key


@pytest.mark.parametrize("which", ["peft_folder", "folder"])
def test_pruned_checkpoint_loads_in_adapterkit(trained, which, tmp_path) -> None:
    folder = getattr(trained, which)
    peft_model = PeftModel.from_pretrained(trained.factory(), folder).eval()
    model = trained.factory()
    adapters = adapterkit.attach(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapters.load(folder)
    assert max_diff(output(model, trained.x), output(peft_model, trained.x)) <= 1e-6
    # layers were resized by the pattern, scaling still divides by init_r (as in peft)
    _, config = files(folder)
    for key, mask in config["rank_pattern"].items():
        layer = model.get_submodule(key.removesuffix(".lora_E"))
        peft_layer = peft_model.base_model.model.get_submodule(key.removesuffix(".lora_E"))
        assert layer.lora_E["default"].shape == (sum(mask), 1)
        assert layer.r["default"] == sum(mask)
        assert torch.equal(layer.ranknum["default"], peft_layer.ranknum["default"])
    # saving again writes the same checkpoint
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapters.save(tmp_path)
    again, again_config = files(tmp_path)
    original, _ = files(folder)
    assert sorted(again) == sorted(original) and all(torch.equal(again[k], original[k]) for k in again)
    assert again_config["rank_pattern"] == config["rank_pattern"]


def test_pruned_checkpoint_fine_tunes(trained, tmp_path) -> None:
    model = trained.factory()
    adapters = adapterkit.attach(model)
    adapters.load(trained.folder, is_trainable=True)
    before = output(model, trained.x)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.02)
    model.train()
    final_step = SCHEDULE["total_step"] - SCHEDULE["tfinal"]
    for step, (args, kwargs) in zip((final_step + 1, final_step + 2), batches(trained.case)):
        (model(*args, **kwargs).loss + orthogonal_regularization(model)).backward()
        optimizer.step()
        update_and_allocate(model, step)  # final phase: the pattern is already applied by the shapes
        if step == final_step + 1:
            # a new allocation over an adapter already at its target budget cannot prune anything
            with pytest.raises(adapterkit.ConfigValueError, match="target_r"):
                update_and_allocate(model, 0)
        optimizer.zero_grad()
    model.eval()
    tuned = output(model, trained.x)
    assert max_diff(tuned, before) > 1e-5
    adapters.save(tmp_path)
    _, config = files(tmp_path)
    assert config["rank_pattern"] == files(trained.folder)[1]["rank_pattern"]
    peft_model = PeftModel.from_pretrained(trained.factory(), tmp_path).eval()
    assert max_diff(output(peft_model, trained.x), tuned) <= 1e-6


def test_added_config_with_a_rank_pattern_saves_like_peft(trained, tmp_path) -> None:
    _, saved_config = files(trained.folder)
    model = trained.factory()
    adapters = adapterkit.attach(model)
    adapters.add(saved_config)  # full-rank layers (peft ignores rank_pattern when injecting) ...
    scramble(model, 7)
    assert all(layer.lora_E["default"].shape[0] == SCHEDULE["init_r"] for layer in adapters_plugin().layers(model))
    peft_config = PeftConfig.from_pretrained(trained.folder)
    peft_config.base_model_name_or_path = None  # adapterkit saved the model's name_or_path, "" here
    peft_model = get_peft_model(trained.factory(), peft_config)
    peft_params = dict(peft_model.base_model.model.named_parameters())
    with torch.no_grad():
        for key, param in model.named_parameters():
            if "lora_" in key:
                peft_params[key].copy_(param)
    adapters.save(tmp_path / "ours")  # ... cut down by the pattern on save
    peft_model.save_pretrained(tmp_path / "peft")
    ours, ours_config = files(tmp_path / "ours")
    theirs, theirs_config = files(tmp_path / "peft")
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert ours_config["rank_pattern"] == theirs_config["rank_pattern"] == saved_config["rank_pattern"]
    before = snapshot(model)
    bad = dict(saved_config, rank_pattern={"no.such.layer.lora_E": [True] * SCHEDULE["init_r"]})
    with pytest.raises(adapterkit.ConfigValueError, match="no.such.layer"):
        adapters.add(bad, "bad")
    assert_same(before, snapshot(model))


def adapters_plugin() -> AdaLoraMethod:
    return adapterkit.default_registry().plugin_manager.get_plugin("adalora")


def test_orthogonal_regularization_has_gradients(trained) -> None:
    model = trained.factory()
    adapters = adapterkit.attach(model)
    adapters.add(spec(CASES[trained.case][1], orth_reg_weight=0.25))
    reg = orthogonal_regularization(model)
    reg.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n or "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    # 0.25 x mean over matrices of ||A A^T - I||_F, ||B^T B - I||_F
    mats = [(n, p.detach()) for n, p in model.named_parameters() if "lora_A" in n or "lora_B" in n]
    covs = [p @ p.T if "lora_A" in n else p.T @ p for n, p in mats]
    norms = [torch.norm(cov - torch.eye(cov.shape[0])) for cov in covs]
    assert abs(reg.item() - 0.25 * (sum(norms) / len(norms)).item()) <= 1e-6


# -- configs and helper errors --------------------------------------------------------------------
def test_registered_through_entry_point() -> None:
    method = adapterkit.available_methods()["adalora"]
    assert method.distribution == "adapterkit-adalora"
    assert method.config_type is AdaLoraConfig
    assert isinstance(adapterkit.default_registry().plugin_manager.get_plugin("adalora"), AdaLoraMethod)
    config = adapterkit.parse_config('ADALORA[r=8, total_step=10, target_modules=["q_proj", "v_proj"]]')
    assert isinstance(config, AdaLoraConfig)
    assert config.total_step == 10 and config.target_modules == {"q_proj", "v_proj"}
    model = llama()
    adapters = adapterkit.attach(model)
    adapters.add('adalora[r=8, total_step=10, target_modules=["q_proj","v_proj"]]')
    assert adapters.method("default").name == "adalora"
    q_proj = model.model.layers[1].self_attn.q_proj
    assert q_proj.lora_A["default"].shape == (12, 32) and q_proj.lora_E["default"].requires_grad  # init_r=12
    assert sorted(adapters.state_dict(prefix="")) == sorted(
        f"model.layers.{i}.self_attn.{m}.lora_{p}" for i in range(2) for m in ("q_proj", "v_proj") for p in "ABE"
    )


def test_total_step_is_required() -> None:
    with pytest.raises(adapterkit.ConfigValueError, match="total_step"):
        adapterkit.parse_config('adalora[target_modules=["q_proj"]]')
    config = AdaLoraConfig(total_step=10, target_modules=["q_proj"])
    config.total_step = None  # set after peft's own check
    model = llama()
    before = snapshot(model)
    with pytest.raises(adapterkit.ConfigValueError, match=r"'total_step' is required"):
        adapterkit.attach(model).add(config)
    assert_same(before, snapshot(model))
    assert len(adapterkit.attach(model)) == 0


@pytest.mark.parametrize(
    "options, match",
    [
        ("total_step=10, tinit=5, tfinal=5", "tinit"),
        ("total_step=10, beta1=1.0", "beta1"),
        ("total_step=10, init_r=0", "init_r"),
        ("total_step=10, rank_pattern={'q_proj': [True]}", "rank_pattern"),
    ],
)
def test_bad_values_are_config_errors(options: str, match: str) -> None:
    with pytest.raises(adapterkit.ConfigValueError, match=match):
        adapterkit.parse_config(f'adalora[{options}, target_modules=["q_proj"]]')


def test_update_and_allocate_needs_gradients_and_a_training_adapter(tmp_path) -> None:
    model = llama()
    adapters = adapterkit.attach(model)
    adapters.add(spec(LLAMA_TARGETS))
    with pytest.raises(adapterkit.AdapterStateError, match="zero_grad"):
        update_and_allocate(model, 0)  # before backward
    model(IDS, labels=IDS).loss.backward()
    update_and_allocate(model, 0)
    for p in model.parameters():
        p.grad = None
    with pytest.raises(adapterkit.AdapterStateError, match="zero_grad"):
        update_and_allocate(model, 1)  # after zero_grad
    with pytest.raises(adapterkit.UnknownAdapterError):
        update_and_allocate(model, 1, name="nope")
    adapters.save(tmp_path)
    frozen = llama()
    adapterkit.attach(frozen).load(tmp_path)  # inference only
    with pytest.raises(adapterkit.AdapterStateError, match="being trained"):
        update_and_allocate(frozen, 0)
    with pytest.raises(adapterkit.AdapterStateError, match="being trained"):
        orthogonal_regularization(frozen)
    adapters.disable()
    with pytest.raises(adapterkit.AdapterStateError, match="being trained"):
        orthogonal_regularization(model)
    # target_r >= init_r leaves nothing to prune: a clear error instead of torch.kthvalue's
    other = llama()
    adapterkit.attach(other).add(spec(["q_proj"], target_r=4))
    other(IDS, labels=IDS).loss.backward()
    with pytest.raises(adapterkit.ConfigValueError, match="target_r"):
        update_and_allocate(other, 0)


def test_allocation_is_per_adapter_and_per_model() -> None:
    model = llama()
    adapters = adapterkit.attach(model)
    adapters.add(spec(["q_proj"]), "a")
    adapters.add(spec(["q_proj", "v_proj"]), "b")
    adapters.set_active(["a", "b"])  # both train; each has its own allocator and budget
    clone = copy.deepcopy(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in range(SCHEDULE["total_step"]):
        (model(IDS, labels=IDS).loss + orthogonal_regularization(model)).backward()
        optimizer.step()
        update_and_allocate(model, step)
        optimizer.zero_grad()
    for name, layers in (("a", 2), ("b", 4)):
        pattern = adapters.config(name).rank_pattern
        assert len(pattern) == layers
        assert sum(sum(mask) for mask in pattern.values()) == SCHEDULE["target_r"] * layers
    # the copy made before training has its own configs and allocators, untouched
    assert adapterkit.attach(clone).config("a").rank_pattern is None
    assert adapterkit.attach(clone).config("a") is not adapters.config("a")


# -- the model API ------------------------------------------------------------------------------------
def two_adapters(tmp_path):
    model = llama()
    adapters = adapterkit.attach(model)
    adapters.add(spec(LLAMA_TARGETS), "a")
    scramble(model, 1, "a")
    adapters.add(spec(["v_proj", "o_proj"]), "b")
    scramble(model, 2, "b")
    adapters.save(tmp_path)
    peft_model = PeftModel.from_pretrained(llama(), tmp_path / "a", adapter_name="a").eval()
    peft_model.load_adapter(tmp_path / "b", adapter_name="b")
    return model, adapters, peft_model


def test_several_adapters_and_set_active_match_peft(tmp_path) -> None:
    model, adapters, peft_model = two_adapters(tmp_path)
    base = output(llama(), IDS)
    peft_model.base_model.set_adapter("b")
    assert max_diff(output(model, IDS), output(peft_model, IDS)) <= 1e-6
    adapters.set_active(["a", "b"])  # deltas add up
    peft_model.base_model.set_adapter(["a", "b"])
    both = output(model, IDS)
    assert max_diff(both, output(peft_model, IDS)) <= 1e-6
    adapters.set_active("a")
    peft_model.base_model.set_adapter("a")
    assert max_diff(output(model, IDS), output(peft_model, IDS)) <= 1e-6
    assert max_diff(output(model, IDS), both) > 1e-4
    assert all(p.requires_grad == (".a" in n) for n, p in model.named_parameters() if "lora_" in n)
    adapters.set_active([])
    assert max_diff(output(model, IDS), base) == 0


def test_enable_disable_merge_unmerge(tmp_path) -> None:
    model = llama()
    adapters = adapterkit.attach(model)
    adapters.add(spec(LLAMA_TARGETS))
    scramble(model, 3)
    with_adapter = output(model, IDS)
    base = output(llama(), IDS)
    adapters.disable()
    assert torch.equal(output(model, IDS), base)
    adapters.enable()
    assert torch.equal(output(model, IDS), with_adapter)

    original = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    adapters.save(tmp_path)
    adapters.merge()
    merged = output(model, IDS)
    assert max_diff(merged, with_adapter) <= 1e-5
    peft_model = PeftModel.from_pretrained(llama(), tmp_path).eval()
    peft_model.merge_adapter()
    assert max_diff(merged, output(peft_model, IDS)) <= 1e-6
    adapters.unmerge()
    for name, param in model.named_parameters():
        if name in original:
            torch.testing.assert_close(param, original[name], rtol=0, atol=1e-6)
    assert max_diff(output(model, IDS), with_adapter) <= 1e-5


def test_delete_restores_the_model(tmp_path) -> None:
    model = llama()
    before = snapshot(model)
    base = output(model, IDS)
    model, adapters, _ = two_adapters(tmp_path)
    adapters.set_active("a")
    only_a = output(model, IDS)
    adapters.delete("b")
    assert torch.equal(output(model, IDS), only_a)
    assert "b" not in model.__dict__["_adapterkit_adalora"]
    adapters.delete("a")
    after = snapshot(model)
    assert after[0] == before[0] and list(after[1]) == list(before[1])
    assert torch.equal(output(model, IDS), base)


def test_failed_add_or_load_leaves_the_model_unchanged(trained, tmp_path) -> None:
    model = trained.factory()
    adapters = adapterkit.attach(model)
    adapters.add(spec(CASES[trained.case][1]), "a")
    scramble(model, 4, "a")
    before, out = snapshot(model), output(model, trained.x)
    x = trained.x

    def unchanged() -> None:
        assert_same(before, snapshot(model))
        assert torch.equal(output(model, x), out)
        assert adapters.names == ["a"] and adapters.active == ["a"]
        assert list(model.__dict__["_adapterkit_adalora"]) == ["a"]

    with pytest.raises(adapterkit.TargetError):
        adapters.add(spec(["nope"]), "b")
    unchanged()
    good, config = files(trained.folder)
    wrong = dict(good)
    key = next(k for k, v in wrong.items() if k.endswith("lora_A") and v.shape[0] > 0)
    wrong[key] = torch.zeros(wrong[key].shape[0] + 1, wrong[key].shape[1])
    with pytest.raises(adapterkit.StateDictMismatchError, match="wrong shapes"):
        adapters.load(trained.folder, "b", state_dict=wrong)
    unchanged()
    bad_pattern = dict(config, rank_pattern={"no.such.layer.lora_E": [True] * SCHEDULE["init_r"]})
    with pytest.raises(adapterkit.CheckpointError, match="no.such.layer"):
        adapters.load(None, "b", config=bad_pattern, state_dict=good)
    unchanged()
    short = dict(config, rank_pattern={k: v[:-1] for k, v in config["rank_pattern"].items()})
    with pytest.raises(adapterkit.CheckpointError, match="init_r"):
        adapters.load(None, "b", config=short, state_dict=good)
    unchanged()
    # and a good load next to the existing adapter works
    adapters.load(trained.folder, "b")
    assert max_diff(output(model, x), output(trained.model, x)) <= 1e-6


def test_per_sample_routes_rows(trained) -> None:
    x = trained.x[:3]
    model = trained.factory()
    adapters = adapterkit.attach(model)
    adapters.load(trained.folder, "a")
    adapters.add(spec(CASES[trained.case][1]), "b")
    scramble(model, 6, "b")
    expected = {}
    for name in ("a", "b"):
        adapters.set_active(name)
        expected[name] = output(model, x)
    expected["__base__"] = output(trained.factory(), x)
    rows = ["b", "__base__", "a"]
    with adapters.per_sample(rows):
        mixed = output(model, x)
    for i, row in enumerate(rows):
        assert max_diff(mixed[i], expected[row][i]) <= 1e-6, row
    assert max_diff(expected["a"], expected["b"]) > 1e-4
    assert torch.equal(output(model, x), expected["b"])
    with pytest.raises(adapterkit.PerSampleError), adapters.per_sample(["a", "b"]):
        output(model, x)


@pytest.mark.parametrize("load", [False, True])
def test_ranknum_never_trains_on_a_half_precision_base(load, tmp_path):
    """peft's dtype cast makes ranknum a trainable parameter on a bf16 base (an optimizer would change the rank
    count AdaLoRA divides by); adapterkit keeps it frozen, after add and after load."""
    spec = f"adalora[init_r=4, target_r=2, total_step=10, target_modules={MLP_TARGETS!r}]"
    model = MLP().to(torch.bfloat16)
    adapters = adapterkit.attach(model)
    adapters.add(spec)
    if load:
        adapters.save(tmp_path)
        model = MLP().to(torch.bfloat16)
        adapters = adapterkit.attach(model)
        adapters.load(tmp_path, is_trainable=True)
    ranknums = [p for n, p in model.named_parameters() if ".ranknum." in n]
    assert ranknums and all(p.dtype == torch.float32 and not p.requires_grad for p in ranknums)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".lora_E." in n)
