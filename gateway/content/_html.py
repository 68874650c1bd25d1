"""The text a reader sees in an HTML part: tags out, entities decoded, blocks on their own lines.

Not `html.parser`: on CPython 3.11 it takes time growing with the square of the input
on unfinished constructs (60 KB of ``<a x='`` took 42 s, 80 KB of ``<!--`` 3.3 s),
which a hostile message can send. This scanner moves forward only: every search
starts where the last one ended, so the cost is linear in the markup. It follows
the browsers where it matters to a filter: script, style and template content is
not shown, an unclosed comment runs to the end, entities are decoded.
"""

from __future__ import annotations

import html
import re

__all__ = ["html_text"]

# Content never shown to the reader. (Not <head>: an unclosed one would hide the whole
# body from the filters, and it holds no text but the title.)
_SKIPPED = frozenset({"script", "style", "template"})
# Elements that start a new line where a reader would see one.
_BLOCKS = frozenset(
    {
        "address", "article", "aside", "blockquote", "br", "caption", "dd", "div", "dl", "dt",
        "fieldset", "figcaption", "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6",
        "header", "hr", "li", "main", "nav", "ol", "p", "pre", "section", "table", "tbody",
        "td", "tfoot", "th", "thead", "title", "tr", "ul", "body", "html", "center", "option",
    }
)  # fmt: skip
# A start or end tag from its "<": the name, then attributes (quoted values may hold ">").
# The alternatives start with different characters, so there is no backtracking.
_TAG = re.compile(r"</?([a-zA-Z][^\s/>]*)((?:[^>\"']|\"[^\"]*\"|'[^']*')*)>?")
_ALT = re.compile(r"""\balt\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s>]+))""", re.IGNORECASE)
_SPACES = re.compile(r"[ \t\r\f\v\u00a0]+")
_LINES = re.compile(r"\s*\n\s*")


def html_text(markup: str) -> tuple[str, tuple[str, ...]]:
    """The text of an HTML document -> (text, defects)."""
    chunks: list[str] = []
    position = 0
    length = len(markup)
    while position < length:
        opening = markup.find("<", position)
        if opening < 0:
            chunks.append(markup[position:])
            break
        if opening > position:
            chunks.append(markup[position:opening])
        position = _markup(markup, opening, chunks)
    # Entities decoded once, in the joined text (an entity is never split by a tag in
    # practice, and "<" that starts no tag is kept as "<", which unescape leaves alone).
    text = _SPACES.sub(" ", html.unescape("".join(chunks)))
    return _LINES.sub("\n", text).strip(), ()


def _markup(markup: str, opening: int, chunks: list[str]) -> int:
    """Reads the markup at `opening` (a "<"), adding what it shows; -> where the text goes on."""
    if markup.startswith("<!--", opening):
        end = markup.find("-->", opening + 4)
        return len(markup) if end < 0 else end + 3
    if markup.startswith(("<!", "<?"), opening):
        end = markup.find(">", opening + 2)
        return len(markup) if end < 0 else end + 1
    tag = _TAG.match(markup, opening)
    if tag is None:  # a "<" that starts no tag is text
        chunks.append("<")
        return opening + 1
    name = tag.group(1).lower()
    closing = markup.startswith("</", opening)
    if name in _BLOCKS:
        chunks.append("\n")
    elif name == "img" and not closing:
        alt = _ALT.search(tag.group(2))
        if alt:
            chunks.append(
                " " + html.unescape(next(group for group in alt.groups() if group is not None)) + " "
            )
    if name in _SKIPPED and not closing:
        closer = re.compile(rf"</{re.escape(name)}\b[^>]*>?", re.IGNORECASE).search(markup, tag.end())
        return len(markup) if closer is None else closer.end()
    return tag.end()
