"""The API site renders every doctest example as a code block with its output (issue 11).

Griffe reads a Google-style ``Example:`` as an admonition, whose ``>>>`` lines became nested
block quotes: one run-on paragraph. ``docs/_ext/griffe_examples.py`` rewrites them into
``Examples:`` sections. The rewrite is tested here directly; the built HTML is checked by the
slow tests, which build the site (about 20 s) or read the one ``MOSAIC_SITE_DIR`` names (CI,
after ``mkdocs build --strict``).
"""

import html
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _extension():
    pytest.importorskip("griffe")
    spec = importlib.util.spec_from_file_location("griffe_examples", ROOT / "docs" / "_ext" / "griffe_examples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "source, expected",
    [
        ("Sum.\n\nExample:\n    >>> 1 + 1\n    2", "Sum.\n\nExamples:\n    >>> 1 + 1\n    2"),
        ("Example (the data set above):\n    >>> f()\n    3", "Examples:\n    The data set above:\n    >>> f()\n    3"),
        ("Examples (two):\n        >>> f()", "Examples:\n        Two:\n        >>> f()"),
        ("Examples:\n    >>> f()", "Examples:\n    >>> f()"),  # already a section
        ("Example:\nnot indented below", "Example:\nnot indented below"),  # no section body: left alone
        ("```\nExample:\n    >>> f()\n```", "```\nExample:\n    >>> f()\n```"),  # inside a fence: left alone
        ("Module.\n\n>>> x = 1\n>>> x\n1\n\nMore.", "Module.\n\n```pycon\n>>> x = 1\n>>> x\n1\n```\n\nMore."),
    ],
)
def test_rewrite_turns_examples_into_sections_and_fences(source, expected):
    assert _extension().rewrite_examples(source) == expected


def test_the_parsed_docstring_has_an_examples_section_with_code():
    griffe = pytest.importorskip("griffe")
    docstring = griffe.Docstring(_extension().rewrite_examples(
        "Adds.\n\nArgs:\n    a: a number.\n\nExample:\n    >>> 1 + 1\n    2\n"
    ))
    sections = docstring.parse("google")
    kinds = [section.kind.value for section in sections]
    assert kinds == ["text", "parameters", "examples"]
    assert sections[-1].value == [(griffe.DocstringSectionKind.examples, ">>> 1 + 1\n2")]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The built API site: ``MOSAIC_SITE_DIR`` when set, else a strict build into a temporary folder."""
    given = os.environ.get("MOSAIC_SITE_DIR")
    if given:
        path = Path(given)
        assert (path / "index.html").is_file(), f"MOSAIC_SITE_DIR={given} holds no built site"
        return path
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-d", str(out)],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def _outside_code(page: str) -> str:
    return re.sub(r"<code>.*?</code>", "", page, flags=re.S)


@pytest.mark.slow
def test_no_page_shows_a_doctest_as_prose(site):
    pages = sorted(site.rglob("*.html"))
    assert any("api" in page.parts for page in pages)
    for page in pages:
        text = _outside_code(page.read_text(encoding="utf-8"))
        assert "&gt;&gt;&gt;" not in text, f"{page.relative_to(site)}: a '>>>' line outside a code block"
        assert "<blockquote>\n<blockquote>" not in text, f"{page.relative_to(site)}: an example as nested quotes"


def _code_blocks(page: Path) -> list[str]:
    blocks = re.findall(r'<div class="highlight"><pre>.*?</pre></div>', page.read_text(encoding="utf-8"), flags=re.S)
    return [html.unescape(re.sub(r"<[^>]+>", "", block)) for block in blocks]


@pytest.mark.slow
def test_an_example_renders_as_code_with_its_output(site):
    page = site / "api" / "losses" / "index.html"
    raw = page.read_text(encoding="utf-8")
    scal_example = [block for block in _code_blocks(page) if ">>> scal(A, corr, reduction=\"pooled\")" in block]
    assert scal_example, "the example of `scal` is not a code block"
    assert "tensor(0.6931)" in scal_example[0]  # its output, in the same block
    assert '<span class="gp">&gt;&gt;&gt; </span>' in raw and '<span class="go">tensor(0.6931)</span>' in raw
    # An `Example (context):` header and a module-level doctest render as code as well.
    data = _code_blocks(site / "api" / "data" / "index.html")
    assert any(">>> count_released_rows(root)" in block and "\n1" in block for block in data)
    assert any(">>> pyarrow.parquet.write_table(" in block for block in data)
