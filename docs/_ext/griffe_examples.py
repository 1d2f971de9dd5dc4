"""A Griffe extension for the API site: doctest examples render as code blocks with their output.

Griffe's Google-style parser knows the section ``Examples:`` (whose ``>>>`` lines and their output
become code blocks) but reads the singular ``Example:`` as an admonition, whose text is Markdown:
the ``>>>`` lines turned into nested block quotes, one run-on paragraph. The docstrings of
mosaic_kit say ``Example:`` (or ``Example (some context):``), so before parsing this extension
rewrites, in Griffe's copy of each docstring only (the sources and the doctests are untouched):

- ``Example:`` and ``Example (context):`` (also ``Examples (context):``) to ``Examples:``, the
  context becoming the section's first line of text;
- a doctest block outside any section (e.g. in a module docstring) to a fenced ``pycon`` block.

Loaded by mkdocstrings (``mkdocs.yml``: ``handlers.python.options.extensions``); checked by
``tests/test_docs_site.py``.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_HEADER = re.compile(r"^(?P<indent>\s*)Examples?(?:\s*\((?P<context>[^)]*)\))?:\s*$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def rewrite_examples(text: str) -> str:
    """The docstring ``text`` with its examples in the form Griffe renders as code.

    Example:
        >>> rewrite_examples("Sum.\\n\\nExample (two numbers):\\n    >>> 1 + 1\\n    2").splitlines()
        ['Sum.', '', 'Examples:', '    Two numbers:', '    >>> 1 + 1', '    2']
    """
    lines = text.split("\n")
    out: list[str] = []
    index, in_fence = 0, False
    while index < len(lines):
        line = lines[index]
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        header = None if in_fence else _HEADER.match(line)
        if header is not None:
            following = next((candidate for candidate in lines[index + 1:] if candidate.strip()), "")
            if _indent(following) > len(header["indent"]):
                out.append(f"{header['indent']}Examples:")
                context = (header["context"] or "").strip()
                if context:
                    out.append(" " * _indent(following) + context[0].upper() + context[1:] + ":")
                index += 1
                continue
        if not in_fence and line.startswith(">>>"):  # a doctest block outside any section
            out.append("```pycon")
            while index < len(lines) and lines[index].strip():
                out.append(lines[index])
                index += 1
            out.append("```")
            continue
        out.append(line)
        index += 1
    return "\n".join(out)


class DoctestExamples(griffe.Extension):
    """Rewrites each loaded object's docstring with `rewrite_examples`."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite_examples(obj.docstring.value)
