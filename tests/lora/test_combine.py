"""``combine`` for LoRA (``adapterkit_combine``): every combination against the ΔW it should produce.

ΔW_i of each adapter comes from peft's own ``get_delta_weight`` (``s_i B_i A_i`` in the layer's
layout); the ΔW merges are checked against ``peft.utils.merge_utils`` applied to those ΔW_i, the
SVD variants against ``torch.linalg.svd`` of the expected matrix, and the combinations peft gets
right against peft's ``add_weighted_adapter``.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import Fingerprint, llama_input, make_llama, make_mlp, mlp_input, run
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils import merge_utils
from toy_plugin import ScalePlugin
from torch import nn

import adapterkit
from adapterkit import ConfigValueError, MethodRegistry, UnsupportedOperationError, make_plugin_manager

MLP_A = "lora[r=2, lora_alpha=4, target_modules=['blocks.0.0', 'head'], init_lora_weights=False]"
# other rank, rsLoRA, other targets (embed only in b, head only in a)
MLP_B = "lora[r=3, lora_alpha=5, use_rslora=True, target_modules=['blocks.0.0', 'embed'], init_lora_weights=False]"
MLP_C = "lora[r=2, lora_alpha=3, target_modules=['blocks.0.0', 'blocks.1.0', 'head'], init_lora_weights=False]"
WEIGHTS = [0.7, -0.4]
ATOL = 1e-5


def mlp_with(*specs, seed=0):
    model = make_mlp()
    adapters = adapterkit.attach(model)
    torch.manual_seed(seed)  # init_lora_weights=False: random A and B, so every ΔW is non-zero
    for index, spec in enumerate(specs):
        adapters.add(spec, "abcdefgh"[index])
    return model, adapters


def deltas(model, name):
    """{module path: ΔW} of adapter ``name``, by peft's get_delta_weight (scaling included)."""
    found = {}
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer) and (name in module.lora_A or name in module.lora_embedding_A):
            with torch.no_grad():
                found[path.removeprefix("base_model.model.")] = module.get_delta_weight(name).clone()
    return found


def weighted_sum(model, names, weights):
    """{path: Σ w_i ΔW_i} over the union of the adapters' layers; an adapter absent from a layer adds 0."""
    total = {}
    for name, weight in zip(names, weights):
        for path, delta in deltas(model, name).items():
            total[path] = total.get(path, 0) + weight * delta
    return total


def assert_deltas(got, expected, atol=ATOL):
    assert sorted(got) == sorted(expected)
    for path in expected:
        assert got[path].shape == expected[path].shape, path
        gap = (got[path] - expected[path]).abs().max()
        assert torch.allclose(got[path], expected[path], atol=atol, rtol=1e-4), (path, gap)


def best_rank(matrix, rank):
    """The best rank-``rank`` approximation of ``matrix`` (a conv ΔW as [out, in * kernel])."""
    flat = matrix.flatten(1) if matrix.dim() > 2 else matrix
    u, s, vh = torch.linalg.svd(flat.double(), full_matrices=False)
    rank = min(rank, s.numel())
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).float().reshape(matrix.shape)


def with_deltas_folded_in(make, total):
    """A fresh base model with ``total`` added to its weights by hand: what an exact combination computes."""
    model = make()
    with torch.no_grad():
        for path, delta in total.items():
            model.get_submodule(path).weight += delta
    return model


def peft_copy(make, adapters, names, tmp_path):
    """The same adapters in a peft PeftModel (through saved files)."""
    adapters.save(tmp_path / "saved", names)
    model = PeftModel.from_pretrained(make(), tmp_path / "saved" / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(tmp_path / "saved" / name, adapter_name=name)
    return model.eval()


# -- cat: exact -------------------------------------------------------------------------------------------------------
def test_cat_is_exactly_the_weighted_sum_of_the_deltas_with_mixed_ranks_rslora_and_targets():
    model, adapters = mlp_with(MLP_A, MLP_B)
    expected = weighted_sum(model, ["a", "b"], WEIGHTS)
    assert set(expected) == {"embed", "blocks.0.0", "head"}  # the union; each adapter is absent from one layer
    assert adapters.combine(["a", "b"], WEIGHTS, "c", how="cat") == "c"
    assert_deltas(deltas(model, "c"), expected)
    config = adapters.config("c")
    # rank r_a + r_b where both adapt the layer, the one adapter's rank elsewhere; scaling 1
    assert (config.r, config.rank_pattern, config.use_rslora) == (5, {"embed": 3, "head": 2}, False)
    assert config.alpha_pattern == config.rank_pattern and config.lora_alpha == config.r
    # the new adapter is inactive and trainable; active alone, the model computes base + Σ w_i ΔW_i
    assert "c" in adapters.names and "c" not in adapters.active and adapters.trainable("c")
    adapters.set_active("c")
    x = mlp_input()
    assert torch.allclose(run(model, x), run(with_deltas_folded_in(make_mlp, expected), x), atol=ATOL)


def test_cat_matches_peft_where_peft_is_right(tmp_path):
    specs = (MLP_A, MLP_A.replace("r=2", "r=3"))  # peft's cat is exact without rsLoRA
    model, adapters = mlp_with(*specs)
    theirs = peft_copy(make_mlp, adapters, ["a", "b"], tmp_path)
    theirs.add_weighted_adapter(["a", "b"], WEIGHTS, "c", combination_type="cat")
    adapters.combine(["a", "b"], WEIGHTS, "c", how="cat")
    assert_deltas(deltas(model, "c"), deltas(theirs, "c"))


# -- linear: peft's definition ----------------------------------------------------------------------------------------
def test_linear_is_peft_definition_with_its_cross_terms_and_equals_peft_factors(tmp_path):
    specs = (MLP_A, MLP_A.replace("lora_alpha=4", "lora_alpha=6, use_rslora=True"))  # equal ranks, mixed rsLoRA
    model, adapters = mlp_with(*specs)
    theirs = peft_copy(make_mlp, adapters, ["a", "b"], tmp_path)
    theirs.add_weighted_adapter(["a", "b"], WEIGHTS, "c", combination_type="linear")
    adapters.combine(["a", "b"], WEIGHTS, "c", how="linear")
    ours = adapters.state_dict("c", prefix="")
    # A = Σ sgn(w_i s_i) √|w_i s_i| A_i and B = Σ √|w_i s_i| B_i: the factors peft computes ...
    peft_state = {k.removeprefix("base_model.model."): v for k, v in theirs.state_dict().items() if ".c." in k}
    for key, value in ours.items():
        assert torch.allclose(value, peft_state[key.replace(".weight", ".c.weight")], atol=1e-6), key
    # ... and ΔW = B A with scaling 1 (not peft's result's scaling, which re-applies rsLoRA's)
    layer = model.get_submodule("head")
    scalings = [layer.scaling[n] for n in ("a", "b")]
    roots = [math.sqrt(abs(w * s)) for w, s in zip(WEIGHTS, scalings)]
    a = sum(math.copysign(t, w * s) * layer.lora_A[n].weight for n, t, w, s in zip("ab", roots, WEIGHTS, scalings))
    b = sum(t * layer.lora_B[n].weight for n, t in zip("ab", roots))
    assert torch.allclose(deltas(model, "c")["head"], b @ a, atol=ATOL)
    # the cross terms B_a A_b, B_b A_a: linear is not Σ w_i ΔW_i for two adapters
    exact = weighted_sum(model, ["a", "b"], WEIGHTS)["head"]
    assert (deltas(model, "c")["head"] - exact).abs().max() > 1e-2


def test_linear_of_one_adapter_is_its_weighted_delta():
    model, adapters = mlp_with(MLP_B)
    adapters.combine(["a"], [-0.6], "c", how="linear")
    assert_deltas(deltas(model, "c"), weighted_sum(model, ["a"], [-0.6]))


def test_linear_with_unequal_ranks_on_a_layer_is_refused_naming_the_layer():
    model, adapters = mlp_with(MLP_A, MLP_B)
    x = mlp_input()
    before = Fingerprint(model, x)
    with pytest.raises(ConfigValueError, match=r"blocks\.0\.0.*'a': 2, 'b': 3.*cat"):
        adapters.combine(["a", "b"], WEIGHTS, "c", how="linear")
    before.assert_same(model, x)
    assert adapters.names == ["a", "b"]


# -- scaling and reloading: peft's bugs -------------------------------------------------------------------------------
def test_peft_reapplies_rslora_scaling_to_its_result_and_combine_does_not(tmp_path):
    """docs/usage.md says peft's result is off by √r with rsLoRA adapters: checked here, beside ours."""
    rslora = MLP_A.replace("lora_alpha=4", "lora_alpha=4, use_rslora=True")
    model, adapters = mlp_with(rslora, rslora.replace("r=2", "r=3"))
    theirs = peft_copy(make_mlp, adapters, ["a", "b"], tmp_path)
    expected = weighted_sum(model, ["a", "b"], WEIGHTS)
    theirs.add_weighted_adapter(["a", "b"], WEIGHTS, "c", combination_type="cat")
    peft_result = deltas(theirs, "c")
    assert torch.allclose(peft_result["head"], math.sqrt(5) * expected["head"], atol=1e-4)  # rank 2 + 3
    adapters.combine(["a", "b"], WEIGHTS, "c", how="cat")
    assert_deltas(deltas(model, "c"), expected)


@pytest.mark.parametrize("how", ["cat", "linear", "svd", "ties"])
def test_result_with_rank_and_alpha_patterns_saves_and_reloads_the_same_in_adapterkit_and_peft(how, tmp_path):
    patterned = (
        "lora[r=4, lora_alpha=8, rank_pattern={'head': 2}, alpha_pattern={'head': 3}, "
        "target_modules=['blocks.0.0', 'head'], init_lora_weights=False]"
    )
    model, adapters = mlp_with(patterned, patterned.replace("lora_alpha=8", "lora_alpha=5, use_rslora=True"))
    options = {"density": 0.6} if how == "ties" else {}
    adapters.combine(["a", "b"], WEIGHTS, "c", how=how, **options)
    adapters.set_active("c")
    x = mlp_input()
    ours = run(model, x)
    adapters.save(tmp_path / "out", ["c"])

    fresh = make_mlp()
    adapterkit.attach(fresh).load(tmp_path / "out" / "c")
    assert torch.equal(run(fresh, x), ours)
    assert_deltas(deltas(fresh, "default"), deltas(model, "c"), atol=0)
    theirs = PeftModel.from_pretrained(make_mlp(), tmp_path / "out" / "c").eval()  # peft's own result would not load
    assert torch.allclose(run(theirs, x), ours, atol=1e-6)


def test_targets_name_exactly_the_combined_layers_where_a_list_would_match_more(tmp_path):
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 6), nn.Sequential(nn.Linear(6, 6)), nn.Linear(6, 3)).eval()

    model = make()
    adapters = adapterkit.attach(model)
    torch.manual_seed(1)
    # the outer "0" only (a regex, matched against whole paths); a target list ["0"] would also match "1.0"
    adapters.add("lora[r=2, target_modules='0', init_lora_weights=False]", "a")
    adapters.add("lora[r=2, target_modules=['2'], init_lora_weights=False]", "b")
    adapters.combine(["a", "b"], WEIGHTS, "c", how="cat")
    assert sorted(deltas(model, "c")) == ["0", "2"]
    adapters.save(tmp_path, ["c"])
    fresh = make()
    adapterkit.attach(fresh).load(tmp_path / "c")
    assert_deltas(deltas(fresh, "default"), weighted_sum(model, ["a", "b"], WEIGHTS))


# -- the SVD combinations ---------------------------------------------------------------------------------------------
def test_svd_is_the_best_rank_k_approximation_of_the_weighted_sum():
    model, adapters = mlp_with(MLP_A, MLP_B)
    expected = weighted_sum(model, ["a", "b"], WEIGHTS)
    adapters.combine(["a", "b"], WEIGHTS, "c", how="svd")  # svd_rank: the largest rank, 3
    adapters.combine(["a", "b"], WEIGHTS, "d", how="svd", svd_rank=2, svd_full_matrices=False)
    adapters.combine(["a", "b"], WEIGHTS, "e", how="svd", svd_rank=100)  # more than a layer has: its full rank
    assert adapters.config("c").r == 3 and adapters.config("d").r == 2
    assert_deltas(deltas(model, "c"), {p: best_rank(d, 3) for p, d in expected.items()})
    assert_deltas(deltas(model, "d"), {p: best_rank(d, 2) for p, d in expected.items()})
    assert_deltas(deltas(model, "e"), expected)  # rank 5 at most here: exact
    assert adapters.config("e").rank_pattern == {"head": 4, "embed": 8} and adapters.config("e").r == 16


def test_svd_clamp_bounds_the_factors_at_the_quantile_as_peft_does(tmp_path):
    model, adapters = mlp_with(MLP_A, MLP_A.replace("r=2", "r=3"))
    theirs = peft_copy(make_mlp, adapters, ["a", "b"], tmp_path)
    theirs.add_weighted_adapter(["a", "b"], WEIGHTS, "c", combination_type="svd", svd_rank=2, svd_clamp=0.9)
    adapters.combine(["a", "b"], WEIGHTS, "free", how="svd", svd_rank=2)
    adapters.combine(["a", "b"], WEIGHTS, "c", how="svd", svd_rank=2, svd_clamp=0.9)
    free, clamped = adapters.state_dict("free", prefix=""), adapters.state_dict("c", prefix="")
    for path in ("blocks.0.0", "head"):
        a, b = free[f"{path}.lora_A.weight"], free[f"{path}.lora_B.weight"]
        high = torch.quantile(torch.cat([b.flatten(), a.flatten()]), 0.9)
        assert torch.allclose(clamped[f"{path}.lora_A.weight"], a.clamp(-high, high), atol=1e-6)
        assert torch.allclose(clamped[f"{path}.lora_B.weight"], b.clamp(-high, high), atol=1e-6)
        assert clamped[f"{path}.lora_B.weight"].abs().max() <= high + 1e-7 < b.abs().max()
    assert_deltas(deltas(model, "c"), deltas(theirs, "c"), atol=1e-4)


def test_svd_matches_peft_where_peft_is_right(tmp_path):
    model, adapters = mlp_with(MLP_A, MLP_A.replace("r=2", "r=3"))
    theirs = peft_copy(make_mlp, adapters, ["a", "b"], tmp_path)
    theirs.add_weighted_adapter(["a", "b"], WEIGHTS, "c", combination_type="svd")
    adapters.combine(["a", "b"], WEIGHTS, "c", how="svd")
    assert_deltas(deltas(model, "c"), deltas(theirs, "c"), atol=1e-4)


# -- TIES, DARE, magnitude pruning: on ΔW -----------------------------------------------------------------------------
def reference(model, names, weights, how, density, sign="total", seed=0):
    """peft.utils.merge_utils applied to the adapters' ΔW, layer by layer in sorted path order (DARE's masks)."""
    functions = {
        "ties": lambda ds, w: merge_utils.ties(ds, w, density, sign),
        "dare_ties": lambda ds, w: merge_utils.dare_ties(ds, w, density, sign),
        "dare_linear": lambda ds, w: merge_utils.dare_linear(ds, w, density),
        "magnitude_prune": lambda ds, w: merge_utils.magnitude_prune(ds, w, density),
    }
    per_adapter = [deltas(model, name) for name in names]
    torch.manual_seed(seed)
    merged = {}
    for path in sorted(set().union(*per_adapter)):
        present = [(found[path], w) for found, w in zip(per_adapter, weights) if path in found]
        merged[path] = functions[how]([d for d, _ in present], torch.tensor([w for _, w in present]))
    return merged


@pytest.mark.parametrize(
    ("how", "sign"),
    [(how, "total") for how in ("ties", "dare_ties", "dare_linear", "magnitude_prune")]
    + [("ties", "frequency"), ("dare_ties", "frequency")],
)
def test_pruned_merges_are_merge_utils_on_the_deltas_exactly_and_after_svd(how, sign):
    model, adapters = mlp_with(MLP_A, MLP_B, MLP_C)
    names, weights = ["a", "b", "c"], [0.7, -0.4, 0.5]
    options = {"density": 0.5} | ({"majority_sign_method": sign} if "ties" in how else {})
    expected = reference(model, names, weights, how, 0.5, sign, seed=3)
    torch.manual_seed(3)
    adapters.combine(names, weights, "exact", how=how, **options)
    assert_deltas(deltas(model, "exact"), expected)
    torch.manual_seed(3)
    adapters.combine(names, weights, "low", how=f"{how}_svd", svd_rank=2, **options)
    assert_deltas(deltas(model, "low"), {p: best_rank(d, 2) for p, d in expected.items()})


def test_pruned_merges_have_no_cross_terms_unlike_peft(tmp_path):
    """With density 1 nothing is pruned: magnitude_prune is Σ w_i ΔW_i exactly; peft's (on A and B) is not."""
    specs = (MLP_A, MLP_A.replace("lora_alpha=4", "lora_alpha=2"))
    model, adapters = mlp_with(*specs)
    expected = weighted_sum(model, ["a", "b"], WEIGHTS)
    adapters.combine(["a", "b"], WEIGHTS, "c", how="magnitude_prune", density=1.0)
    assert_deltas(deltas(model, "c"), expected)
    assert adapters.config("c").r == 4  # exact at the rank the sum has (2 + 2), found by the SVD
    theirs = peft_copy(make_mlp, adapters, ["a", "b"], tmp_path)
    with pytest.warns(UserWarning, match="density"):
        theirs.add_weighted_adapter(["a", "b"], WEIGHTS, "c", combination_type="magnitude_prune", density=1.0)
    assert (deltas(theirs, "c")["head"] - expected["head"]).abs().max() > 1e-2


def test_dare_draws_from_torch_global_generator():
    model, adapters = mlp_with(MLP_A, MLP_C)
    for name, seed in (("c", 5), ("d", 5), ("e", 6)):
        torch.manual_seed(seed)
        adapters.combine(["a", "b"], WEIGHTS, name, how="dare_linear", density=0.5)
    same, other = deltas(model, "d"), deltas(model, "e")
    assert_deltas(deltas(model, "c"), same, atol=0)
    assert not torch.allclose(same["blocks.0.0"], other["blocks.0.0"])


# -- a transformers model, embeddings and convolutions ----------------------------------------------------------------
def test_tiny_llama_cat_svd_and_ties_and_reload(tmp_path):
    model = make_llama()
    adapters = adapterkit.attach(model)
    torch.manual_seed(2)
    adapters.add("lora[r=4, lora_alpha=8, target_modules=['q_proj', 'v_proj'], init_lora_weights=False]", "a")
    adapters.add(
        "lora[r=2, lora_alpha=4, use_rslora=True, target_modules=['v_proj', 'down_proj'], "
        "layers_to_transform=[1], init_lora_weights=False]",
        "b",
    )
    expected = weighted_sum(model, ["a", "b"], WEIGHTS)
    adapters.combine(["a", "b"], WEIGHTS, "cat", how="cat")
    adapters.combine(["a", "b"], WEIGHTS, "svd", how="svd", svd_rank=3)
    torch.manual_seed(0)
    adapters.combine(["a", "b"], WEIGHTS, "ties", how="ties", density=0.3)
    assert_deltas(deltas(model, "cat"), expected)
    assert_deltas(deltas(model, "svd"), {p: best_rank(d, 3) for p, d in expected.items()})
    assert_deltas(deltas(model, "ties"), reference(model, ["a", "b"], WEIGHTS, "ties", 0.3))
    x = llama_input()
    for name in ("cat", "svd", "ties"):
        adapters.set_active(name)
        ours = run(model, x)
        adapters.save(tmp_path / name, [name])
        fresh = make_llama()
        adapterkit.attach(fresh).load(tmp_path / name / name)
        assert torch.allclose(run(fresh, x), ours, atol=1e-6), name
        theirs = PeftModel.from_pretrained(make_llama(), tmp_path / name / name).eval()
        assert torch.allclose(run(theirs, x), ours, atol=1e-5), name


def test_gpt2_conv1d_layers_with_fan_in_fan_out(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    def make():
        torch.manual_seed(0)
        config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=16, bos_token_id=0)
        config.eos_token_id = 0
        return GPT2LMHeadModel(config).eval()

    model = make()
    adapters = adapterkit.attach(model)
    torch.manual_seed(1)
    conv1d = "fan_in_fan_out=True, init_lora_weights=False"  # GPT-2's Conv1D layers store their weights transposed
    adapters.add(f"lora[r=2, target_modules=['c_attn', 'c_proj'], {conv1d}]", "a")
    adapters.add(f"lora[r=3, use_rslora=True, target_modules=['c_attn'], {conv1d}]", "b")
    adapters.combine(["a", "b"], WEIGHTS, "c", how="cat")
    adapters.combine(["a", "b"], WEIGHTS, "d", how="svd", svd_rank=2)
    expected = weighted_sum(model, ["a", "b"], WEIGHTS)
    assert_deltas(deltas(model, "c"), expected)
    assert_deltas(deltas(model, "d"), {p: best_rank(d, 2) for p, d in expected.items()})
    x = llama_input()
    adapters.set_active("c")
    adapters.save(tmp_path, ["c"])
    theirs = PeftModel.from_pretrained(make(), tmp_path / "c").eval()
    assert torch.allclose(run(theirs, x), run(model, x), atol=1e-6)


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.conv = nn.Conv2d(6, 5, 3, padding=1)
        self.out = nn.Linear(5, 4)

    def forward(self, ids):
        h = self.emb(ids).permute(0, 2, 1).unsqueeze(-1).expand(-1, -1, -1, 3)
        return self.out(self.conv(h).mean((2, 3)))


def make_mixed():
    torch.manual_seed(0)
    return Mixed().eval()


@pytest.mark.parametrize("how", ["cat", "svd", "ties_svd", "magnitude_prune"])
def test_embedding_and_conv_layers(how, tmp_path):
    model = make_mixed()
    adapters = adapterkit.attach(model)
    torch.manual_seed(4)
    adapters.add("lora[r=2, lora_alpha=3, target_modules=['emb', 'conv', 'out'], init_lora_weights=False]", "a")
    adapters.add(
        "lora[r=3, lora_alpha=3, use_rslora=True, target_modules=['emb', 'conv'], init_lora_weights=False]",
        "b",
    )
    options = {"density": 0.5} if "ties" in how or "prune" in how else {}
    adapters.combine(["a", "b"], WEIGHTS, "c", how=how, **options)
    if how == "cat":
        expected = weighted_sum(model, ["a", "b"], WEIGHTS)
    elif how == "svd":
        expected = {p: best_rank(d, 3) for p, d in weighted_sum(model, ["a", "b"], WEIGHTS).items()}
    else:  # elementwise merges: the layer's own layout or the factor layout, the same entries
        expected = reference(model, ["a", "b"], WEIGHTS, how.removesuffix("_svd"), 0.5)
        if how.endswith("_svd"):
            expected = {p: best_rank(d, 3) for p, d in expected.items()}
    assert_deltas(deltas(model, "c"), expected)
    ids = torch.tensor([[1, 2, 3], [4, 5, 9]])
    adapters.set_active("c")
    adapters.save(tmp_path, ["c"])
    fresh = make_mixed()
    adapterkit.attach(fresh).load(tmp_path / "c")
    assert torch.allclose(run(fresh, ids), run(model, ids), atol=1e-6)


# -- refusals: typed, the model as it was -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("how", "options", "match"),
    [
        ("mean", {}, r"how='mean' is not a LoRA combination; use one of \['linear', 'cat', 'svd', 'ties'"),
        (None, {}, "not a LoRA combination"),
        ("cat", {"svd_rank": 2}, r"how='cat'\) takes no option \['svd_rank'\].*_svd"),
        ("ties", {"density": 0.5, "svd_clamp": 0.9}, "takes no option"),
        ("linear", {"density": 0.5}, "takes no option"),
        ("svd", {"majority_sign_method": "total"}, "takes no option"),
        ("dare_linear", {"majority_sign_method": "total", "density": 0.5}, "takes no option"),
        ("svd", {"rank": 2}, r"unknown options \['rank'\]"),
        ("ties", {}, "needs density="),
        ("ties", {"density": 0}, r"density=0; pass a fraction in \(0, 1\]"),
        ("dare_ties", {"density": 1.5}, "density=1.5"),
        ("magnitude_prune", {"density": -0.1}, "density=-0.1"),
        ("magnitude_prune", {"density": True}, "density=True"),
        ("ties", {"density": 0.5, "majority_sign_method": "max"}, "majority_sign_method='max'"),
        ("svd", {"svd_rank": 0}, "svd_rank=0"),
        ("svd", {"svd_rank": 2.0}, "svd_rank=2.0"),
        ("svd", {"svd_clamp": 1.5}, "svd_clamp=1.5"),
        ("svd", {"svd_full_matrices": "yes"}, "svd_full_matrices='yes'"),
    ],
)
def test_bad_how_and_options_are_config_errors_and_change_nothing(how, options, match):
    model, adapters = mlp_with(MLP_A, MLP_B)
    x = mlp_input()
    before = Fingerprint(model, x)
    with pytest.raises(ConfigValueError, match=match):
        adapters.combine(["a", "b"], WEIGHTS, "c", how=how, **options)
    before.assert_same(model, x)
    assert adapters.names == ["a", "b"]


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("lora[r=2, target_modules=['blocks.0.0'], use_dora=True]", "DoRA"),
        ("lora[r=2, target_modules=['blocks.0.0'], bias='lora_only']", "trains base biases"),
        ("lora[r=2, target_modules=['blocks.0.0'], lora_bias=True]", r"lora_B\.bias"),
        ("lora[r=2, target_modules=['blocks.0.0'], modules_to_save=['blocks.1.0']]", "modules_to_save"),
    ],
)
def test_adapters_that_are_not_plain_lora_are_refused(spec, match):
    model, adapters = mlp_with(MLP_A, spec)
    x = mlp_input()
    before = Fingerprint(model, x)
    with pytest.raises(UnsupportedOperationError, match=match):
        adapters.combine(["a", "b"], WEIGHTS, "c", how="cat")
    before.assert_same(model, x)
    assert adapters.names == ["a", "b"]


def test_adapters_of_several_methods_or_of_a_method_without_the_hook_are_refused_by_the_core():
    pm = make_plugin_manager()
    pm.register(ScalePlugin(), name="toy")
    model = make_mlp()
    adapters = adapterkit.attach(model, MethodRegistry(pm))
    adapters.add("lora[r=2, target_modules=['blocks.0.0'], init_lora_weights=False]", "a")
    adapters.add("scale[target_modules=['head'], init=2.0]", "s")
    adapters.add("scale[target_modules=['head'], init=3.0]", "t")
    x = mlp_input()
    before = Fingerprint(model, x)
    with pytest.raises(ConfigValueError, match=r"several methods \(\['lora', 'scale'\]\)"):
        adapters.combine(["a", "s"], WEIGHTS, "c", how="cat")
    with pytest.raises(UnsupportedOperationError, match="'scale'.*does not support combining"):
        adapters.combine(["s", "t"], WEIGHTS, "c")
    before.assert_same(model, x)
    assert adapters.names == ["a", "s", "t"]
