"""The documentation site: it builds strictly, and its hook reference and API reference are complete.

* Every hook (each ``adapterkit_*`` function of ``adapterkit.hookspecs``) must be on
  the hook reference page (``docs/reference/hooks.md``, rendered by mkdocstrings)
  with its exact signature, checked in the built HTML against ``inspect.signature``.
* Every hook must have tests of its own, listed in ``tests/docs/hook_coverage.py``
  (the rule is in that file's docstring and in docs/writing-a-plugin.md).
* ``mkdocs build --strict`` must succeed. These tests need mkdocs-material and
  mkdocstrings[python] (the ``docs`` tox environment installs them); without
  them they fail, saying what to install, rather than skip.
"""

from __future__ import annotations

import ast
import html
import importlib.util
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import adapterkit
import pytest
from adapterkit import errors, hookspecs

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
HOOK_PAGE = DOCS / "reference" / "hooks.md"
INSTALL_HINT = (
    "the docs tests need mkdocs: pip install mkdocs-material 'mkdocstrings[python]' (or run them with: tox -e docs)"
)

HOOKS = {
    name: func
    for name, func in vars(hookspecs).items()
    if name.startswith("adapterkit_") and inspect.isfunction(func) and func.__module__ == hookspecs.__name__
}

# Public operations the core routes to each hook (the "called by" column of the hook reference).
# A test that calls one of them exercises the hook for whichever method it uses.
ROUTES: dict[str, tuple[str, ...]] = {
    "adapterkit_register_methods": ("available_methods(", "default_registry(", "MethodRegistry("),
    "adapterkit_config_from_dict": (".load(", "parse_config("),
    "adapterkit_config_to_dict": (".save(", "config_to_dict("),
    "adapterkit_validate_config": ("parse_config(", ".add(", ".load("),
    "adapterkit_inject": (".add(", ".load("),
    "adapterkit_set_active": (".set_active(", ".add(", ".load("),
    "adapterkit_enable": (".enable(", ".disabled(", ".enable_adapters("),
    "adapterkit_disable": (".disable(", ".disabled(", ".disable_adapters("),
    "adapterkit_delete": (".delete(", ".delete_adapter("),
    "adapterkit_extract_state": (".state_dict(", ".save(", ".get_adapter_state_dict("),
    "adapterkit_load_state": (".load(", ".load_adapter("),
    "adapterkit_merge": (".merge(",),
    "adapterkit_unmerge": (".unmerge(", ".disable("),
    "adapterkit_per_sample": (".per_sample(",),
    "adapterkit_dispatch": (".dispatch(", "device_map="),
    "adapterkit_layer_adapters": (".layers(", ".merge("),
    "adapterkit_claim_checkpoint": (".load(",),
    "adapterkit_training_step": (".training_step(", "Trainer("),
    "adapterkit_regularization": (".regularization(", "Trainer("),
    "adapterkit_swap": (".swap(",),
    "adapterkit_prepare_compiled": (".prepare_compiled(",),
    "adapterkit_combine": (".combine(",),
}


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- the site builds ---------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def site(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """``mkdocs build --strict`` into a temporary folder, once per session."""
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings_handlers") is None:
        return SimpleNamespace(error=INSTALL_HINT)
    site_dir = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(site_dir),
        ],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )
    output = done.stdout + done.stderr
    if done.returncode != 0:
        problems = [line for line in output.splitlines() if line.startswith(("WARNING", "ERROR")) or "Error" in line]
        return SimpleNamespace(
            error="mkdocs build --strict failed:\n" + "\n".join(problems or output.splitlines()[-30:])
        )
    return SimpleNamespace(error=None, dir=site_dir, output=output)


def built(site: SimpleNamespace) -> Path:
    if site.error:
        pytest.fail(site.error, pytrace=False)
    return site.dir


def test_mkdocs_build_strict_succeeds(site: SimpleNamespace) -> None:
    site_dir = built(site)
    assert (site_dir / "index.html").is_file()
    assert (site_dir / "reference" / "hooks" / "index.html").is_file()


# -- the hook reference ------------------------------------------------------------------------------------
def test_hooks_are_pluggy_specs() -> None:
    assert len(HOOKS) >= 15
    for name, func in HOOKS.items():
        assert getattr(func, f"{hookspecs.PROJECT}_spec", None) is not None, f"{name} is not marked @hookspec"


def test_hook_page_renders_every_hook_and_nothing_else() -> None:
    text = HOOK_PAGE.read_text(encoding="utf-8")
    rendered = re.findall(r"^::: adapterkit\.hookspecs\.(\w+)\s*$", text, flags=re.MULTILINE)
    missing = sorted(set(HOOKS) - set(rendered))
    assert not missing, (
        f"hooks missing from {HOOK_PAGE.relative_to(ROOT)} (add a '::: adapterkit.hookspecs.NAME' block): {missing}"
    )
    stale = sorted(set(rendered) - set(HOOKS))
    assert not stale, f"{HOOK_PAGE.relative_to(ROOT)} renders hooks that no longer exist: {stale}"
    assert len(rendered) == len(set(rendered)), "a hook is rendered twice"
    table = set(re.findall(r"^\| `(adapterkit_\w+)` \|", text, flags=re.MULTILINE))
    assert table == set(HOOKS), f"the summary table's rows differ from the hooks: {sorted(table ^ set(HOOKS))}"


def _expected_signature(name: str) -> str:
    signature = inspect.signature(HOOKS[name])  # annotations stay source strings (postponed evaluation)

    def text(annotation: object) -> str:
        return annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)

    params = []
    for param in signature.parameters.values():
        item = param.name
        if param.annotation is not inspect.Parameter.empty:
            item += f": {text(param.annotation)}"
        if param.default is not inspect.Parameter.empty:
            item += f" = {param.default!r}"
        params.append(item)
    returns = (
        "" if signature.return_annotation is inspect.Signature.empty else f" -> {text(signature.return_annotation)}"
    )
    return f"{name}({', '.join(params)}){returns}"


def _normalise(signature: str) -> str:
    # The renderer wraps long signatures (one parameter a line, trailing comma): compare without layout.
    return re.sub(r",\)", ")", re.sub(r"\s+", "", signature))


def _rendered_signatures(page: str) -> dict[str, str]:
    """Hook name -> the signature text shown under its heading in the built page."""
    found = {}
    for match in re.finditer(r'<h\d id="adapterkit\.hookspecs\.(adapterkit_\w+)"', page):
        heading_end = page.find(">", match.end())
        start = page.find('<div class="doc-signature', heading_end)
        next_object = page.find('class="doc doc-heading"', heading_end)
        if start == -1 or (next_object != -1 and start > next_object):
            continue  # no signature block before the next object's heading
        end = page.find("</code></pre>", start)
        found[match[1]] = html.unescape(re.sub(r"<[^>]+>", "", page[start:end])).strip()
    return found


def test_built_hook_page_shows_each_hook_with_its_exact_signature(site: SimpleNamespace) -> None:
    page = (built(site) / "reference" / "hooks" / "index.html").read_text(encoding="utf-8")
    rendered = _rendered_signatures(page)
    missing = sorted(set(HOOKS) - set(rendered))
    assert not missing, f"hooks without a heading and signature on the built hook reference: {missing}"
    for name in HOOKS:
        expected = _expected_signature(name)
        assert _normalise(rendered[name]) == _normalise(expected), (
            f"{name}: the hook reference shows\n  {rendered[name]}\nbut adapterkit.hookspecs has\n  {expected}"
        )
        docstring = inspect.getdoc(HOOKS[name]).splitlines()[0]
        first_words = re.sub(r"[`*]", "", docstring)[:30]
        section = page[page.find(f'id="adapterkit.hookspecs.{name}"') :]
        assert first_words in re.sub(r"<[^>]+>", "", html.unescape(section))[:5000], f"{name}: docstring not rendered"


# -- every hook has tests ------------------------------------------------------------------------------------
def _test_source(node_id: str) -> str:
    path, *names = node_id.split("::")
    file = ROOT / path
    assert file.is_file(), f"{node_id}: no file {path}"
    tree = ast.parse(file.read_text(encoding="utf-8"))
    body = tree.body
    node: ast.AST | None = None
    for name in names:
        node = next((n for n in body if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name == name), None)
        assert node is not None, f"{node_id}: {path} defines no {name!r} there"
        body = node.body  # type: ignore[attr-defined]
    assert isinstance(node, ast.FunctionDef) and node.name.startswith("test"), f"{node_id} is not a test function"
    source = ast.get_source_segment(file.read_text(encoding="utf-8"), node)
    assert source is not None
    return source


def test_every_hook_has_tests() -> None:
    coverage = _load(Path(__file__).with_name("hook_coverage.py")).HOOK_TESTS
    missing = sorted(set(HOOKS) - set(coverage))
    assert not missing, f"hooks with no tests listed in tests/docs/hook_coverage.py: {missing}"
    stale = sorted(set(coverage) - set(HOOKS))
    assert not stale, f"tests/docs/hook_coverage.py lists hooks that do not exist: {stale}"
    assert set(ROUTES) == set(HOOKS), "ROUTES in test_docs.py must name every hook"
    problems = []
    for hook, node_ids in coverage.items():
        if not node_ids:
            problems.append(f"{hook}: no test listed")
        for node_id in node_ids:
            source = _test_source(node_id)
            if hook not in source and not any(route in source for route in ROUTES[hook]):
                problems.append(f"{hook}: {node_id} neither names the hook nor calls any of {ROUTES[hook]}")
    assert not problems, "\n".join(problems)


def test_the_conformance_suite_runs_for_every_listed_plugin() -> None:
    """Node ids in the conformance suite count only because plugins' test suites subclass it."""
    subclasses = [
        path
        for path in [
            *ROOT.glob("tests/**/test_*.py"),
            *ROOT.glob("plugins/*/tests/test_*.py"),
            *ROOT.glob("examples/*/tests/test_*.py"),
        ]
        if "(MethodContract)" in path.read_text(encoding="utf-8")
    ]
    assert len(subclasses) >= 2, subclasses


# -- the API reference -------------------------------------------------------------------------------------
def _directives() -> set[str]:
    found = set()
    for page in DOCS.rglob("*.md"):
        found |= set(re.findall(r"^::: ([\w.]+)", page.read_text(encoding="utf-8"), flags=re.MULTILINE))
    return found


def test_api_reference_covers_the_public_api() -> None:
    directives = _directives()
    documented = {d.removeprefix("adapterkit.") for d in directives if d.count(".") == 1}
    if "adapterkit.errors" in directives:
        documented |= set(errors.__all__)
    missing = sorted(set(adapterkit.__all__) - documented - {"__version__"})
    assert not missing, (
        f"public names of adapterkit.__all__ missing from the API reference (docs/reference/*.md): {missing}"
    )
    for extra in ("adapterkit.testing", "adapterkit_peft.PeftMethod", "adapterkit.hookspecs"):
        assert extra in directives, f"{extra} is not in the API reference"
