"""The docs site stays whole: every page is in the nav, every relative link resolves, every
public name has an API entry, the landing page's quickstart code runs, and the strict
``mkdocs build`` of CI passes with every cross-link to the API landing on an anchor.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", flags=re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
# [text](target) and ![alt](target); the target ends at whitespace or ")"
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
PYTHON_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", flags=re.S | re.M)
AUTODOC = re.compile(r"^:::[ \t]+([\w.]+)", flags=re.M)


def _nav_pages(node: object) -> list[str]:
    """All page paths in a mkdocs ``nav`` tree (strings, lists and one-key dicts)."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [page for item in node for page in _nav_pages(item)]
    if isinstance(node, dict):
        return [page for value in node.values() for page in _nav_pages(value)]
    return []


def _nav() -> list[str]:
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    return [p for p in _nav_pages(config["nav"]) if not re.match(r"^[a-z]+://", p)]


def _prose(text: str) -> str:
    """The Markdown without fenced code blocks and inline code (links there are not links)."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def test_docs_tree_is_found() -> None:
    assert "index.md" in PAGES and len(PAGES) >= 10


def test_every_page_is_in_the_nav_and_every_nav_entry_exists() -> None:
    nav = _nav()
    assert sorted(set(PAGES) - set(nav)) == [], "pages missing from mkdocs.yml nav"
    assert sorted(set(nav) - set(PAGES)) == [], "nav entries without a page"
    assert len(nav) == len(set(nav)), "a page appears twice in the nav"


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_point_to_existing_files(page: str) -> None:
    source = DOCS / page
    broken = []
    for target in LINK.findall(_prose(source.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # external (https:, mailto:) or same-page anchor
        path = target.split("#", 1)[0].split("?", 1)[0]
        resolved = (source.parent / path).resolve()
        if not resolved.is_file() or DOCS.resolve() not in resolved.parents:
            broken.append(target)
    assert broken == [], f"{page}: broken relative links"


def test_link_pattern_sees_links_but_not_code() -> None:
    text = "[a](x.md) ![b](img/y.png#z) `[c](no.md)`\n```\n[d](no2.md)\n```\n[e](https://e.org)"
    assert LINK.findall(_prose(text)) == ["x.md", "img/y.png#z", "https://e.org"]


def test_every_autodoc_block_names_an_importable_object() -> None:
    missing = []
    for page in PAGES:
        for path in AUTODOC.findall((DOCS / page).read_text(encoding="utf-8")):
            parts = path.split(".")
            for split in range(len(parts), 0, -1):  # longest importable module prefix
                try:
                    obj = importlib.import_module(".".join(parts[:split]))
                except ImportError as exc:
                    cause = exc if isinstance(exc, ModuleNotFoundError) else exc.__cause__
                    name = getattr(cause, "name", None) or ""
                    if isinstance(cause, ModuleNotFoundError) and not name.startswith("sdopt"):
                        break  # an optional framework (lightning, transformers) is missing
                    continue
                try:
                    for attr in parts[split:]:
                        obj = getattr(obj, attr)
                except AttributeError:
                    missing.append(f"{page}: {path}")
                break
            else:
                missing.append(f"{page}: {path}")
    assert missing == []


def test_api_reference_documents_every_top_level_name() -> None:
    import sdopt

    documented = set()
    for page in (DOCS / "api").glob("*.md"):
        documented.update(AUTODOC.findall(page.read_text(encoding="utf-8")))
    undocumented = [
        f"{module}.{name}"
        for name, module in sdopt._EXPORTS.items()
        if f"sdopt.{module}.{name}" not in documented
    ]
    assert undocumented == []


def test_landing_page_quickstart_runs() -> None:
    blocks = PYTHON_BLOCK.findall((DOCS / "index.md").read_text(encoding="utf-8"))
    assert len(blocks) >= 2, "the quickstart lost its code"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest on a busy machine
    try:
        with torch.random.fork_rng(devices=[]):
            for i, code in enumerate(blocks):
                namespace: dict[str, object] = {"__name__": f"docs_index_block_{i}"}
                exec(compile(code, f"docs/index.md (python block {i + 1})", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)


def test_readme_snippets_run() -> None:
    readme = DOCS.parent / "README.md"
    blocks = PYTHON_BLOCK.findall(readme.read_text(encoding="utf-8"))
    assert len(blocks) >= 2, "the README lost its code"
    namespace: dict[str, object] = {"__name__": "readme"}  # the blocks build on each other
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            for i, code in enumerate(blocks):
                exec(compile(code, f"README.md (python block {i + 1})", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
    rec = namespace["rec"]
    assert rec.ok and rec.step == 40 and rec.lambda_max > 0


def test_hook_turns_sphinx_roles_into_links() -> None:
    sys.path.insert(0, str(ROOT))
    try:
        hooks = importlib.import_module("mkdocs_hooks")
    finally:
        sys.path.remove(str(ROOT))
    exports = {"SDOptimizer": "optim", "EstimateRecord": "records"}
    pages = {"sdopt.optim.SDOptimizer": "api/optimizer/", "sdopt.records.EstimateRecord": "api/x/"}
    html = (
        '<h3 id="sdopt.records.EstimateRecord">EstimateRecord</h3>'
        "<p>See :class:<code>~sdopt.SDOptimizer</code>, :meth:<code>EstimateRecord.to_dict</code>,"
        " :func:<code>torch.func.hessian</code> and :meth:<code>SDOptimizer._estimate</code>.</p>"
        '<p>Example::</p>\n<div class="language-text highlight">'
    )
    out = hooks.sphinx_roles_to_links(html, "optimizer/", pages, exports)
    assert 'href="../api/optimizer/#sdopt.optim.SDOptimizer"><code>SDOptimizer</code></a>' in out
    assert 'href="#sdopt.records.EstimateRecord.to_dict"><code>EstimateRecord.to_dict</code>' in out
    assert " <code>torch.func.hessian</code> and <code>SDOptimizer._estimate</code>." in out
    assert "Example:</p>" in out and ":class:" not in out and ":meth:" not in out
    assert hooks.api_pages(DOCS)["sdopt.optim.SDOptimizer"] == "api/optimizer/"


def _hooks() -> object:
    sys.path.insert(0, str(ROOT))
    try:
        return importlib.import_module("mkdocs_hooks")
    finally:
        sys.path.remove(str(ROOT))


def test_hook_renders_formulas_as_mathml() -> None:
    pytest.importorskip("latex2mathml")
    hooks = _hooks()
    html = (
        '<p>Step <span class="arithmatex">\\(\\eta &lt; 2/\\lambda\\)</span>.</p>'
        '<div class="arithmatex">\\[\n\\sum_{i=1}^{j} \\log\\lvert 1-\\eta\\alpha_i\\rvert\n\\]</div>'
    )
    out = hooks.math_to_mathml(html, "theory.md")
    assert out.count("<math ") == 2 and 'display="block"' in out and 'display="inline"' in out
    assert "&lt;" in out and ("∑" in out or "&#x02211;" in out)
    assert 'alttext="\\eta &lt; 2/\\lambda"' in out and "\\(" not in out
    with pytest.raises(ValueError, match=r"theory.md: cannot render the formula"):
        hooks.math_to_mathml('<span class="arithmatex">\\(x^\\)</span>', "theory.md")
    with pytest.raises(ValueError, match=r"unknown command \\notacommand"):
        hooks.math_to_mathml('<span class="arithmatex">\\(\\notacommand x\\)</span>', "a.md")
    with pytest.raises(ValueError, match=r"a.md: cannot render"):  # rendered as text otherwise
        hooks.math_to_mathml('<div class="arithmatex">\\[a \\\\[2pt] b\\]</div>', "a.md")


def test_strict_build_and_internal_api_links(tmp_path: Path) -> None:
    """The CI build, plus what it does not check: every API cross-link lands on an anchor."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    broken = []
    for page in site.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        for href in re.findall(r'<a class="autorefs autorefs-internal"[^>]*href="([^"]+)"', text):
            path, _, anchor = href.partition("#")
            target = (page.parent / path).resolve() if path else page
            if target.is_dir():
                target = target / "index.html"
            if not target.is_file() or f'id="{anchor}"' not in target.read_text(encoding="utf-8"):
                broken.append(f"{page.relative_to(site)}: {href}")
    assert broken == []
    # the formulas render offline: MathML in the page, no TeX left for a script, no remote asset
    pages = {
        p.relative_to(site).as_posix(): p.read_text(encoding="utf-8") for p in site.rglob("*.html")
    }
    assert pages["theory/index.html"].count("<math ") >= 40
    left = [p for p, t in pages.items() if re.search(r'class="arithmatex">\s*\\[(\[]', t)]
    assert left == []
    # nor TeX broken out of its markers (a "|" inside a table cell splits the cell)
    code = re.compile(r"<(pre|code)\b.*?</\1>|alttext=\"[^\"]*\"", flags=re.S)
    stray = [
        p for p, t in pages.items() if re.search(r"\\[(\[]|\\(log|eta|alpha)\b", code.sub("", t))
    ]
    assert stray == []
    remote = [p for p, t in pages.items() if re.search(r'<script[^>]+src="(https?:)?//', t)]
    assert remote == []
