"""MkDocs hooks for the sdopt docs site (``hooks:`` in mkdocs.yml).

sdopt's Google-style docstrings use Sphinx roles for cross-references
(``:class:`sdopt.records.EstimateRecord```, ``:func:`~sdopt.spectrum.top_eigenpairs```), which
mkdocstrings renders literally as ``:class:<code>...</code>``. This hook turns each of them into
a link to the object's entry: on the same page when the page renders it, else in the API
reference (``docs/api/*.md``); into plain code when the object is not documented (private
helpers, torch). A trailing reST ``::`` before a code block becomes ``:``.

The links are written directly rather than through mkdocs-autorefs because several objects are
rendered twice (in a guide and in the API reference), which autorefs cannot always disambiguate.

Mathematics: ``pymdownx.arithmatex`` (generic mode) marks every formula as
``<span class="arithmatex">\\(…\\)</span>`` or ``<div class="arithmatex">\\[…\\]</div>``; this hook
converts each to MathML at build time with ``latex2mathml`` (installed with the ``docs`` extra),
which browsers render natively, so the site shows its formulas offline: no script, font or CDN.
A formula that does not convert fails the build, naming the page and the formula.
"""

from __future__ import annotations

import html
import posixpath
import re
from pathlib import Path
from typing import Any

ROLE = re.compile(
    r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj|const):"
    r"<code>(?P<tilde>~?)(?P<target>[A-Za-z_][\w.]*)(?P<call>\(\))?</code>"
)
LITERAL_BLOCK = re.compile(r"::</p>(\s*<div class=\"(?:language-\w+ )?highlight\">)")
AUTODOC = re.compile(r"^:::[ \t]+([\w.]+)", flags=re.M)
MATH = re.compile(
    r'<(?P<tag>span|div) class="arithmatex">\s*\\(?P<open>[(\[])(?P<tex>.*?)\\[)\]]\s*</(?P=tag)>',
    flags=re.S,
)
UNKNOWN_COMMAND = re.compile(r">(\\[A-Za-z]+)<")
UNSUPPORTED = re.compile(r"(\\\\\[[^\]]*\])")  # a line break with spacing, \\[2pt]: shown as text


def _exports() -> dict[str, str]:
    try:
        import sdopt
    except ImportError:  # pragma: no cover - the docs build installs the package
        return {}
    return dict(sdopt._EXPORTS)


def api_pages(docs_dir: str | Path) -> dict[str, str]:
    """``{identifier: page url}`` for every ``::: identifier`` block under ``docs/api/``."""
    pages: dict[str, str] = {}
    for path in sorted(Path(docs_dir, "api").glob("*.md")):
        url = "api/" if path.stem == "index" else f"api/{path.stem}/"
        for identifier in AUTODOC.findall(path.read_text(encoding="utf-8")):
            pages.setdefault(identifier, url)
    return pages


def qualify(target: str, exports: dict[str, str]) -> str:
    """The documented path of ``target``: top-level re-exports map to their defining module."""
    parts = target.split(".")
    if parts[0] == "sdopt" and len(parts) > 1 and parts[1] in exports:
        return ".".join(["sdopt", exports[parts[1]], *parts[1:]])
    if parts[0] in exports:  # a bare exported name, e.g. EstimateRecord.to_dict
        return ".".join(["sdopt", exports[parts[0]], *parts])
    return target


def _api_url(identifier: str, pages: dict[str, str]) -> str | None:
    if identifier in pages:
        return pages[identifier]
    parent, _, name = identifier.rpartition(".")
    if parent in pages and not name.startswith("_"):  # a public member of a documented object
        return pages[parent]
    return None


def sphinx_roles_to_links(
    content: str, page_url: str, pages: dict[str, str], exports: dict[str, str]
) -> str:
    """Replace rendered Sphinx roles in a page's HTML by links (or plain code)."""

    def replace(match: re.Match[str]) -> str:
        target = match["target"]
        shown = target.rsplit(".", 1)[-1] if match["tilde"] else target
        code = f"<code>{shown}{match['call'] or ''}</code>"
        identifier = qualify(target, exports)
        anchor = html.escape(identifier, quote=True)
        parent, _, name = identifier.rpartition(".")
        on_page = f'id="{anchor}"' in content or (
            parent
            and not name.startswith("_")
            and f'id="{html.escape(parent, quote=True)}"' in content
        )
        if on_page:  # rendered here (a public member is rendered with its object)
            href = f"#{anchor}"
        else:
            url = _api_url(identifier, pages)
            if url is None:
                return code
            here = (
                posixpath.dirname(page_url.rstrip("/")) if page_url.endswith(".html") else page_url
            )
            relative = posixpath.relpath(url, here or ".")
            href = f"{relative.rstrip('/')}/#{anchor}" if relative != "." else f"#{anchor}"
        return f'<a class="autorefs autorefs-internal" href="{href}">{code}</a>'

    return LITERAL_BLOCK.sub(r":</p>\1", ROLE.sub(replace, content))


def math_to_mathml(content: str, where: str = "page") -> str:
    """Every arithmatex formula in ``content`` as MathML (``display="block"`` for ``\\[…\\]``).

    Raises:
        ValueError: a formula ``latex2mathml`` cannot convert (the page and formula named).
    """
    from latex2mathml.converter import convert

    def replace(match: re.Match[str]) -> str:
        tex = html.unescape(match["tex"]).strip()
        block = match["open"] == "["
        try:
            mathml = convert(tex, display="block" if block else "inline")
        except Exception as exc:  # latex2mathml raises many types; all mean "cannot render"
            raise ValueError(
                f"{where}: cannot render the formula {tex!r} as MathML: {exc}"
            ) from exc
        unknown = UNKNOWN_COMMAND.search(mathml) or UNSUPPORTED.search(tex)
        if unknown:  # latex2mathml passes commands it does not know through as text
            raise ValueError(
                f"{where}: cannot render the formula {tex!r} as MathML: unknown command "
                f"{unknown[1]}"
            )
        # the TeX source stays in the page for copying and for screen readers' fallback
        mathml = mathml.replace("<math ", f'<math alttext="{html.escape(tex)}" ', 1)
        tag = "div" if block else "span"
        return f'<{tag} class="arithmatex">{mathml}</{tag}>'

    return MATH.sub(replace, content)


def on_page_content(html_content: str, page: Any, config: Any, **kwargs: Any) -> str:
    """MkDocs event: runs on every page's HTML after it is rendered."""
    pages = api_pages(config["docs_dir"])
    content = sphinx_roles_to_links(html_content, page.url, pages, _exports())
    return math_to_mathml(content, page.file.src_path)
