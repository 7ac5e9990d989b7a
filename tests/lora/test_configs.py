"""Config strings, dicts, saved configs and config objects (with the LoRA plugin installed)."""

from __future__ import annotations

import pytest
from peft import LoraConfig

import adapterkit
from adapterkit import (
    ConfigError,
    ConfigSyntaxError,
    ConfigValueError,
    UnknownConfigKeyError,
    UnknownMethodError,
    format_config,
    parse_config,
    parse_config_string,
)


def test_config_string_builds_the_methods_own_config():
    config = parse_config('lora[r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]]')
    assert type(config) is LoraConfig
    assert (config.r, config.lora_alpha) == (8, 16)
    assert config.target_modules == {"q_proj", "v_proj"}


@pytest.mark.parametrize(
    "spec",
    [
        "lora[r=8,lora_dropout=0.1]",
        "  lora [ r = 8 ,\n lora_dropout = 0.1 , ] ",
        "LORA[r=8, lora_dropout=0.1]",
    ],
)
def test_whitespace_trailing_comma_and_alias(spec):
    config = parse_config(spec)
    assert (config.r, config.lora_dropout) == (8, 0.1)


def test_quoted_strings_may_hold_any_character():
    method, options = parse_config_string("""lora[target_modules='.*\\.(q|v)_proj$', init_lora_weights="a], b=[c,\\"d"]""")
    assert method == "lora"
    assert options == {"target_modules": ".*\\.(q|v)_proj$", "init_lora_weights": 'a], b=[c,"d'}


def test_bare_method_name_gives_defaults():
    assert parse_config("lora") == LoraConfig()
    assert parse_config("lora[]") == LoraConfig()


@pytest.mark.parametrize(
    "spec",
    ["lora[r=8", "lora r=8]", "lora[r=8]]", "lora[r=]", "lora[8]", "lora[r=8 lora_alpha=2]", "lora[r=8, r=9]", "[r=8]", ""],
)
def test_syntax_errors(spec):
    with pytest.raises(ConfigSyntaxError) as info:
        parse_config(spec)
    assert isinstance(info.value, ValueError)


def test_non_literal_value_names_key_and_value():
    with pytest.raises(ConfigSyntaxError, match=r"'target_modules'.*q_proj.*not a Python literal"):
        parse_config("lora[target_modules=q_proj]")


def test_unknown_method_suggests_close_names():
    with pytest.raises(UnknownMethodError, match="Did you mean: lora"):
        parse_config("lorra[r=8]")


def test_unknown_key_names_key_and_closest():
    with pytest.raises(UnknownConfigKeyError, match=r"'lora_alpah'.*Did you mean: lora_alpha"):
        parse_config("lora[lora_alpah=16]")


@pytest.mark.parametrize(
    ("spec", "key"),
    [("lora[r='8']", "'r'"), ("lora[lora_dropout='high']", "'lora_dropout'"), ("lora[use_dora=1]", "'use_dora'")],
)
def test_wrong_type_names_key_and_value(spec, key):
    with pytest.raises(ConfigValueError, match=key):
        parse_config(spec)


@pytest.mark.parametrize("r", [0, -3])
def test_rank_must_be_positive(r):
    with pytest.raises(ConfigValueError, match=rf"'r' must be a positive integer, got {r}"):
        parse_config(f"lora[r={r}]")


def test_empty_target_list_is_refused():
    with pytest.raises(ConfigValueError, match="target_modules' is empty"):
        parse_config("lora[target_modules=[]]")


def test_unsupported_option_is_refused_clearly():
    with pytest.raises(ConfigValueError, match="trainable_token_indices.*modules_to_save=\\['embed_tokens'\\]"):
        parse_config("lora[trainable_token_indices=[1, 2]]")


def test_dict_with_method_key():
    assert parse_config({"method": "lora", "r": 4}) == LoraConfig(r=4)
    with pytest.raises(UnknownConfigKeyError):
        parse_config({"method": "lora", "rank": 4})


def test_saved_config_dict_with_peft_type():
    saved = LoraConfig(r=4, target_modules=["a"]).to_dict()
    saved["peft_type"] = "LORA"
    assert parse_config(saved) == LoraConfig(r=4, target_modules=["a"])


def test_dict_without_method_is_an_error():
    with pytest.raises(ConfigError, match="'method' key"):
        parse_config({"r": 4})


def test_config_object_is_copied():
    original = LoraConfig(r=4, target_modules=["q_proj"])
    parsed = parse_config(original)
    assert parsed == original and parsed is not original


def test_unrelated_object_is_refused():
    with pytest.raises(UnknownMethodError, match="cannot use 3.5 as an adapter config"):
        parse_config(3.5)


@pytest.mark.parametrize(
    "config",
    [
        LoraConfig(),
        LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.1),
        LoraConfig(target_modules=".*proj", use_rslora=True, rank_pattern={"q_proj": 2}),
    ],
)
def test_format_round_trips(config):
    text = format_config(config)
    assert text.startswith("lora")
    assert parse_config(text) == config


def test_config_to_dict_is_what_peft_saves(tmp_path):
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    data = adapterkit.config_to_dict(config)
    config.save_pretrained(tmp_path)
    import json

    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    # peft writes sets in hash order; adapterkit sorts them so files are reproducible.
    assert data.pop("target_modules") == sorted(saved.pop("target_modules"))
    assert data == saved


def test_a_saved_config_with_whole_number_floats_for_int_keys_loads_as_in_peft(tmp_path):
    """Other tools write "lora_alpha": 16.0 for an int key; peft reads it, and so does adapterkit (a fraction is refused)."""
    import json

    import torch
    from conftest import make_mlp, mlp_input, run
    from peft import PeftModel, get_peft_model

    torch.manual_seed(0)
    get_peft_model(make_mlp(), LoraConfig(r=4, lora_alpha=8, target_modules=["head"], init_lora_weights=False)).save_pretrained(
        tmp_path
    )
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    data.update(lora_alpha=8.0)
    path.write_text(json.dumps(data))
    model, x = make_mlp(), mlp_input()
    adapters = adapterkit.attach(model)
    adapters.load(tmp_path)
    assert adapters.config("default").lora_alpha == 8 and type(adapters.config("default").lora_alpha) is int
    assert torch.allclose(run(model, x), run(PeftModel.from_pretrained(make_mlp(), tmp_path), x), atol=1e-6)
    data.update(r=4.0)  # peft fails on this one (a float size for its layers); it is the same rank
    path.write_text(json.dumps(data))
    other = make_mlp()
    adapterkit.attach(other).load(tmp_path)
    assert torch.equal(run(other, x), run(model, x))
    data.update(r=4.5)
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigValueError, match=r"'r' expects int, got 4\.5"):
        adapterkit.attach(make_mlp()).load(tmp_path)
