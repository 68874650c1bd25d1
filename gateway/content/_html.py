"""The text a reader sees in an HTML part: tags out, entities decoded, blocks on their own lines."""

from __future__ import annotations

import re
from html.parser import HTMLParser

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
_SPACES = re.compile(r"[ \t\r\f\v\u00a0]+")
_LINES = re.compile(r"\s*\n\s*")


class _TextCollector(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.chunks: list[str] = []
        self.skipping: list[str] = []  # open elements whose content is not shown

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIPPED:
            self.skipping.append(tag)
        if tag in _BLOCKS:
            self.chunks.append("\n")
        elif tag == "img":
            alt = dict(attrs).get("alt")
            if alt and not self.skipping:
                self.chunks.append(f" {alt} ")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.skipping:
            # Close it and anything left open inside it.
            del self.skipping[len(self.skipping) - 1 - self.skipping[::-1].index(tag) :]
        if tag in _BLOCKS:
            self.chunks.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.chunks.append(data)


def html_text(markup: str) -> tuple[str, tuple[str, ...]]:
    """The text of an HTML document -> (text, defects)."""
    collector = _TextCollector()
    defects: tuple[str, ...] = ()
    try:
        collector.feed(markup)
        collector.close()
    except Exception:  # html.parser has raised on odd markup in some Python versions
        defects = ("malformed html",)
    text = "".join(collector.chunks)
    text = _SPACES.sub(" ", text)
    return _LINES.sub("\n", text).strip(), defects
