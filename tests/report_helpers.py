"""Shared checks for the inspection report tests: strict HTML well-formedness and the documented JSON schema."""
from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

SCHEMA_DOC = Path(__file__).resolve().parent.parent / "docs" / "report_schema.md"
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class StrictHTML(HTMLParser):
    """html.parser with errors for unbalanced or misnested tags (html.parser itself never raises)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href") and value and re.match(r"^(https?:)?//", value):
                self.errors.append(f"external asset {name}={value}")
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append(tag)

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
        else:
            self.stack.pop()


def check_html(text: str) -> StrictHTML:
    parser = StrictHTML()
    parser.feed(text)
    parser.close()
    assert not parser.errors, parser.errors[:5]
    assert not parser.stack, f"unclosed tags {parser.stack}"
    assert text.lstrip().lower().startswith("<!doctype html>")
    assert "<script" not in text.lower() and "<link" not in text.lower()
    return parser


def documented_keys() -> dict[str, set[str]]:
    """{section path: keys} from docs/report_schema.md (`## \\`path\\`` headings + `| \\`key\\` |` rows)."""
    sections: dict[str, set[str]] = {}
    current = None
    for line in SCHEMA_DOC.read_text(encoding="utf-8").splitlines():
        heading = re.match(r"^##\s+`([^`]+)`\s*$", line)
        if heading:
            current = heading.group(1)
            sections[current] = set()
            continue
        row = re.match(r"^\|\s*`([^`]+)`\s*\|", line)
        if row and current is not None:
            sections[current].add(row.group(1))
    return sections


def check_schema(data: dict) -> None:
    """Every object of ``data`` has exactly the documented keys (graphs, passes and sites must be non-empty)."""
    doc = documented_keys()
    assert data["schema_version"] == 2

    def check(path: str, obj: dict) -> None:
        assert isinstance(obj, dict), (path, type(obj))
        assert set(obj) == doc[path], f"{path}: report has {sorted(obj)}, doc lists {sorted(doc[path])}"

    check("<root>", data)
    check("summary", data["summary"])
    assert data["graphs"], "no graph in the report"
    for graph in data["graphs"]:
        check("graphs[]", graph)
        assert graph["passes"] and graph["sites"]
        for p in graph["passes"]:
            check("graphs[].passes[]", p)
            check("graphs[].passes[].changed_nodes", p["changed_nodes"])
        for site in graph["sites"]:
            check("graphs[].sites[]", site)
