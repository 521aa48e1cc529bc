"""The reproduction report as Markdown, read from its HTML: the same tables, headings and notes, for a docs page
or a pull request. Plots stay in report.html; the Markdown names each one by its caption."""

from __future__ import annotations

from html.parser import HTMLParser

__all__ = ["report_markdown"]

_HEADINGS = {"h1": "#", "h2": "##", "h3": "###", "h4": "####"}
_SKIPPED = {"style", "title", "nav", "script"}


class _Table:
    def __init__(self) -> None:
        self.rows: list[list[str]] = []
        self.header_rows = 0
        self.in_head = False

    def markdown(self) -> str:
        if not self.rows:
            return ""
        width = max(len(r) for r in self.rows)
        rows = [r + [""] * (width - len(r)) for r in self.rows]
        head = rows[0] if self.header_rows else [""] * width
        body = rows[1:] if self.header_rows else rows
        lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * width]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines)


class _Converter(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[str] = []
        self.text: list[str] = []
        self.skip = 0
        self.table: _Table | None = None
        self.row: list[str] | None = None
        self.cell: list[str] | None = None
        self.cell_span = 1
        self.list_depth = 0

    # text gathered for the block or cell being read
    def _sink(self) -> list[str]:
        return self.cell if self.cell is not None else self.text

    def _flush(self, prefix: str = "") -> None:
        text = " ".join("".join(self.text).split())
        self.text = []
        if text:
            self.blocks.append(prefix + text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIPPED:
            self.skip += 1
            return
        if self.skip:
            return
        if tag in _HEADINGS or tag in ("p", "figure"):
            self._flush()
        elif tag == "li":
            self._flush()
        elif tag in ("ul", "ol"):
            self._flush()
            self.list_depth += 1
        elif tag == "table":
            self._flush()
            self.table = _Table()
        elif tag == "thead" and self.table is not None:
            self.table.in_head = True
        elif tag == "tr" and self.table is not None:
            self.row = []
        elif tag in ("td", "th") and self.row is not None:
            self.cell = []
            span = dict(attrs).get("colspan") or "1"
            self.cell_span = int(span) if span.isdigit() else 1
        elif tag == "br":
            self._sink().append(" ")
        elif tag in ("b", "strong"):
            self._sink().append("**")
        elif tag == "code":
            self._sink().append("`")

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIPPED:
            self.skip = max(0, self.skip - 1)
            return
        if self.skip:
            return
        if tag in _HEADINGS:
            self._flush(_HEADINGS[tag] + " ")
        elif tag == "p":
            self._flush()
        elif tag == "figcaption":
            text = " ".join("".join(self.text).split())
            self.text = []
            if text:
                self.blocks.append(f"*Plot in report.html: {text}*")
        elif tag == "figure":
            self.text = []
        elif tag == "li":
            self._flush("  " * (self.list_depth - 1) + "- ")
        elif tag in ("ul", "ol"):
            self._flush()
            self.list_depth = max(0, self.list_depth - 1)
        elif tag in ("td", "th") and self.cell is not None and self.row is not None:
            text = " ".join("".join(self.cell).split()).replace("|", "\\|")
            self.row.append(text)
            self.row.extend([""] * (self.cell_span - 1))
            self.cell = None
        elif tag == "tr" and self.table is not None and self.row is not None:
            self.table.rows.append(self.row)
            if self.table.in_head:
                self.table.header_rows += 1
            self.row = None
        elif tag == "thead" and self.table is not None:
            self.table.in_head = False
        elif tag == "table" and self.table is not None:
            self.blocks.append(self.table.markdown())
            self.table = None
        elif tag in ("b", "strong"):
            self._sink().append("**")
        elif tag == "code":
            self._sink().append("`")

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self._sink().append(data)


def report_markdown(html: str) -> str:
    """Markdown of a report rendered by `cnnmod.paper.html.render_report`."""
    converter = _Converter()
    converter.feed(html)
    converter.close()
    converter._flush()
    out: list[str] = []
    for block in (b for b in converter.blocks if b.strip()):
        if out and _is_item(block) and _is_item(out[-1]):
            out[-1] += "\n" + block  # one list, not a paragraph per item
        else:
            out.append(block)
    return "\n\n".join(out) + "\n"


def _is_item(block: str) -> bool:
    return block.lstrip(" ").startswith("- ")
