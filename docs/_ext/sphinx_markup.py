"""Griffe extension: render adapterkit's reST-flavoured docstrings as Markdown for mkdocstrings.

adapterkit's docstrings use Sphinx conventions (``:param x:`` fields, which
mkdocstrings' ``sphinx`` docstring style parses). This extension rewrites the
rest, in place, before rendering:

* cross-reference roles (``:class:`~adapterkit.TargetError```,
  ``:func:`adapterkit_set_active```, ``:meth:`Adapters.load```) become
  links to the rendered object, resolved from the docstring's own scope the
  way Sphinx would (the object, its class, its module, then ``adapterkit``);
  the public ``adapterkit.<name>`` path is preferred when the object is
  re-exported there. Links are *optional*: a target not rendered anywhere
  shows as code instead of failing the strict build;
* ``::`` literal blocks and ``>>>`` doctest blocks become fenced code blocks;
* ``double backticks`` become single ones.

Only docs build tooling: nothing in the package depends on it.
"""

from __future__ import annotations

import ast
import html
import re
import textwrap
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?P<role>func|meth|class|exc|attr|mod|data|obj|const):`(?P<target>[^`]+)`")
_DOUBLE = re.compile(r"``(?P<code>[^`]+?)``")


def _exists(loader: griffe.GriffeLoader, path: str) -> griffe.Object | griffe.Alias | None:
    try:
        return loader.modules_collection[path]
    except Exception:  # noqa: BLE001 - KeyError, alias resolution errors: not there
        return None


def _canonical(obj: griffe.Object | griffe.Alias) -> str:
    try:
        return obj.canonical_path
    except Exception:  # noqa: BLE001 - an alias that does not resolve
        return obj.path


class SphinxMarkup(griffe.Extension):
    """See the module docstring."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        stack: list[griffe.Object] = [pkg]
        seen: set[str] = set()
        while stack:
            obj = stack.pop()
            if obj.path in seen:
                continue
            seen.add(obj.path)
            if obj.docstring is not None:
                obj.docstring.value = self.convert(obj.docstring.value, obj, loader)
            for member in obj.members.values():
                if not member.is_alias:
                    stack.append(member)  # type: ignore[arg-type]

    # -- conversion ------------------------------------------------------------------------
    def convert(self, text: str, obj: griffe.Object, loader: griffe.GriffeLoader) -> str:
        text = _blocks(text)
        parts = re.split(r"(```.*?```)", text, flags=re.DOTALL)  # leave code blocks alone
        for i in range(0, len(parts), 2):
            parts[i] = _ROLE.sub(lambda m: self._link(m, obj, loader), parts[i])
            parts[i] = _DOUBLE.sub(lambda m: f"`{m['code']}`", parts[i])
        return "".join(parts)

    def _link(self, match: re.Match[str], obj: griffe.Object, loader: griffe.GriffeLoader) -> str:
        target = match["target"].strip()
        short = target.startswith("~")
        target = target.lstrip("~.")
        shown = target.rsplit(".", 1)[-1] if short else target
        if match["role"] in ("func", "meth"):
            shown += "()"
        path = self._resolve(target, obj, loader)
        code = f"<code>{html.escape(shown)}</code>"
        if path is None:
            return code
        return f'<autoref identifier="{html.escape(path)}" optional>{code}</autoref>'

    def _resolve(self, target: str, obj: griffe.Object, loader: griffe.GriffeLoader) -> str | None:
        scopes: list[str] = []
        current: griffe.Object | None = obj
        while current is not None:
            scopes.append(current.path)
            current = current.parent
        candidates = [target] + [f"{scope}.{target}" for scope in scopes] + [f"adapterkit.{target}"]
        for candidate in candidates:
            found = _exists(loader, candidate)
            if found is None:
                continue
            canonical = _canonical(found)
            # Prefer the public, re-exported spelling: adapterkit.model.Adapters.load -> adapterkit.Adapters.load.
            package, _, rest = canonical.partition(".")
            _, _, tail = rest.partition(".")
            if tail:
                public = _exists(loader, f"{package}.{tail}")
                if public is not None and _canonical(public) == canonical:
                    return f"{package}.{tail}"
            return canonical
        return None


def _blocks(text: str) -> str:
    """``para::`` + indented block -> fenced block; ``>>>`` lines -> a ``pycon`` fence."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.rstrip().endswith("::") and not line.strip().startswith(":"):
            indent = len(line) - len(line.lstrip())
            j = i + 1
            block: list[str] = []
            while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > indent):
                block.append(lines[j])
                j += 1
            while block and not block[-1].strip():
                block.pop()
                j -= 1
            if block:
                head = line.rstrip()[:-2].rstrip()
                out.append(head + ":" if head and not head.endswith(":") else head)
                body = textwrap.dedent("\n".join(block)).strip("\n")
                out += ["", " " * indent + "```" + _language(body)]
                out += [" " * indent + b if b else "" for b in body.splitlines()]
                out += [" " * indent + "```"]
                i = j
                continue
        if line.lstrip().startswith(">>> "):
            indent = len(line) - len(line.lstrip())
            j = i
            block = []
            while j < len(lines) and lines[j].strip():
                block.append(lines[j][indent:])
                j += 1
            out += [" " * indent + "```pycon", *(" " * indent + b for b in block), " " * indent + "```"]
            i = j
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


def _language(code: str) -> str:
    try:
        ast.parse(code)
    except SyntaxError:
        return "text"
    return "python"
