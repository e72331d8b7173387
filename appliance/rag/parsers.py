"""Documents into sections: plain text, Markdown, HTML (BeautifulSoup) and PDF (pypdf), each turned into blocks
of text that carry the heading path above them, so chunks follow the document's structure and cite it."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from appliance.errors import InvalidRequest

Kind = Literal["text", "markdown", "html", "pdf"]
EXTENSIONS: dict[str, Kind] = {
    ".txt": "text", ".text": "text", ".log": "text", ".csv": "text", ".rst": "text",
    ".md": "markdown", ".markdown": "markdown",
    ".html": "html", ".htm": "html", ".xhtml": "html",
    ".pdf": "pdf",
}
MEDIA_TYPES: dict[str, Kind] = {
    "text/plain": "text", "text/csv": "text", "text/markdown": "markdown", "text/x-markdown": "markdown",
    "text/html": "html", "application/xhtml+xml": "html", "application/pdf": "pdf",
}
_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_FENCE = re.compile(r"^(```|~~~)")
_BLANK = re.compile(r"\n\s*\n")
_BLOCK_TAGS = ("p", "li", "pre", "blockquote", "td", "th", "dd", "dt", "figcaption", "caption")
_HEADING_TAGS = ("h1", "h2", "h3", "h4", "h5", "h6")


@dataclass(frozen=True)
class Block:
    """A paragraph-sized piece of a document and the headings it sits under."""

    headings: tuple[str, ...]
    text: str


class UnsupportedDocument(InvalidRequest):
    status_code = 415


def detect_kind(filename: str | None, media_type: str | None, head: bytes) -> Kind:
    """The parser for an upload: by content (PDF magic), then extension, then media type; else refused."""
    if head.startswith(b"%PDF-"):
        return "pdf"
    suffix = ("." + filename.rsplit(".", 1)[-1].lower()) if filename and "." in filename else ""
    if suffix in EXTENSIONS:
        kind = EXTENSIONS[suffix]
        if kind == "pdf":
            raise InvalidRequest(f"{filename!r} is named .pdf but is not a PDF file", code="invalid_document")
        return kind
    base = (media_type or "").split(";")[0].strip().lower()
    if base in MEDIA_TYPES and MEDIA_TYPES[base] != "pdf":
        return MEDIA_TYPES[base]
    raise UnsupportedDocument(
        f"cannot ingest {filename or 'the upload'!r} ({base or 'no media type'}): supported are .txt, .md, .html "
        "and .pdf files", code="unsupported_document")


def decode_text(data: bytes, what: str) -> str:
    if b"\x00" in data[:8192]:
        raise UnsupportedDocument(f"{what} looks binary, not text; upload .txt, .md, .html or .pdf",
                                  code="unsupported_document")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def parse(data: bytes, kind: Kind, what: str = "the document") -> list[Block]:
    if kind == "pdf":
        return list(_pdf_blocks(data, what))
    text = decode_text(data, what)
    if kind == "markdown":
        return list(markdown_blocks(text))
    if kind == "html":
        return list(html_blocks(text))
    return list(text_blocks(text, ()))


def text_blocks(text: str, headings: tuple[str, ...]) -> Iterator[Block]:
    for paragraph in _BLANK.split(text.replace("\r\n", "\n")):
        if paragraph.strip():
            yield Block(headings, paragraph.strip())


def markdown_blocks(text: str) -> Iterator[Block]:
    """ATX headings set the path; fenced code stays one block; blank lines separate paragraphs."""
    path: list[tuple[int, str]] = []
    lines: list[str] = []
    fenced = False

    def flush() -> Iterator[Block]:
        yield from text_blocks("\n".join(lines), tuple(title for _, title in path))
        lines.clear()

    for line in text.replace("\r\n", "\n").split("\n"):
        if _FENCE.match(line.strip()):
            if fenced:
                lines.append(line)
                fenced = False
                yield Block(tuple(title for _, title in path), "\n".join(lines).strip())
                lines.clear()
                continue
            yield from flush()
            fenced = True
        heading = None if fenced else _HEADING.match(line)
        if heading:
            yield from flush()
            level = len(heading.group(1))
            while path and path[-1][0] >= level:
                path.pop()
            path.append((level, heading.group(2).strip()))
            continue
        lines.append(line)
    yield from flush()


def html_blocks(html: str) -> Iterator[Block]:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(html, "html.parser")
    for tag in soup(["script", "style", "noscript", "template", "svg", "nav", "head"]):
        tag.decompose()
    path: list[tuple[int, str]] = []
    for element in soup.find_all([*_HEADING_TAGS, *_BLOCK_TAGS]):
        if element.name in _HEADING_TAGS:
            level = int(element.name[1])
            while path and path[-1][0] >= level:
                path.pop()
            title = " ".join(element.get_text(" ").split())
            if title:
                path.append((level, title))
            continue
        if element.find([*_BLOCK_TAGS, *_HEADING_TAGS]):
            continue  # a container: its inner blocks are visited on their own
        separator = "" if element.name == "pre" else " "
        text = element.get_text(separator)
        text = text.strip("\n") if element.name == "pre" else " ".join(text.split())
        if text:
            yield Block(tuple(title for _, title in path), text)
    if not path and not soup.find(_BLOCK_TAGS):  # bare text with no structure at all
        yield from text_blocks(soup.get_text("\n"), ())


def _pdf_blocks(data: bytes, what: str) -> Iterator[Block]:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise InvalidRequest(f"{what} is an encrypted PDF; remove its password and upload it again",
                                 code="invalid_document")
        pages = [page.extract_text() or "" for page in reader.pages]
    except (PdfReadError, ValueError, KeyError, TypeError, OSError) as exc:
        raise InvalidRequest(f"{what} is not a readable PDF ({type(exc).__name__}: {str(exc)[:200]})",
                             code="invalid_document") from None
    for number, text in enumerate(pages, start=1):
        yield from text_blocks(text, (f"page {number}",))
