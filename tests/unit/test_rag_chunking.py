"""Parsing and chunking with the real embedding tokenizer: structure is followed, sizes are in word-pieces."""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterator

import pytest

from appliance.errors import InvalidRequest
from appliance.rag.chunking import chunk_blocks
from appliance.rag.embeddings import DEFAULT_MODEL, EmbeddingModel, default_model_path
from appliance.rag.parsers import UnsupportedDocument, detect_kind, html_blocks, markdown_blocks, parse


@pytest.fixture(scope="module")
def tokenizer() -> Iterator[EmbeddingModel]:
    yield EmbeddingModel(DEFAULT_MODEL, default_model_path(), threads=1)


def test_markdown_headings_make_the_path_and_fences_stay_whole() -> None:
    text = "# Guide\n\nIntro.\n\n## Install\n\nRun it.\n\n```\ncode\n\nmore code\n```\n\n# Other\n\nEnd."
    blocks = list(markdown_blocks(text))
    assert [(b.headings, b.text) for b in blocks] == [
        (("Guide",), "Intro."),
        (("Guide", "Install"), "Run it."),
        (("Guide", "Install"), "```\ncode\n\nmore code\n```"),
        (("Other",), "End."),
    ]


def test_html_blocks_follow_headings_and_skip_scripts() -> None:
    html = ("<html><head><title>t</title><script>var secret = 1;</script></head><body><h1>Top</h1><p>One</p>"
            "<ul><li>item <b>bold</b></li></ul><h2>Sub</h2><div><p>Two</p></div></body></html>")
    blocks = list(html_blocks(html))
    assert [(b.headings, b.text) for b in blocks] == [
        (("Top",), "One"), (("Top",), "item bold"), (("Top", "Sub"), "Two")]
    assert all("secret" not in b.text for b in blocks)


def test_chunks_never_exceed_the_budget_and_overlap(tokenizer: EmbeddingModel) -> None:
    words = " ".join(f"word{i}" for i in range(2000))
    blocks = list(markdown_blocks(f"# Long\n\n{words}\n\n# Short\n\nsmall paragraph"))
    chunks = chunk_blocks(blocks, tokenizer, max_tokens=100, overlap=20)
    assert [c.position for c in chunks] == list(range(len(chunks)))
    assert chunks[-1].headings == ("Short",) and chunks[-1].text == "small paragraph"
    long = [c for c in chunks if c.headings == ("Long",)]
    assert len(long) > 10
    for chunk in chunks:
        assert tokenizer.count_tokens([chunk.indexed_text])[0] <= 100 + 1
    for before, after in itertools.pairwise(long):  # neighbours share their edge
        assert before.text.split()[-1] in after.text.split()[:12]
    joined = " ".join(c.text for c in long)
    assert all(f"word{i}" in joined for i in range(2000))  # nothing dropped


def test_paragraphs_are_packed_whole(tokenizer: EmbeddingModel) -> None:
    paragraphs = [f"Paragraph {i} says something short." for i in range(30)]
    chunks = chunk_blocks(list(markdown_blocks("\n\n".join(paragraphs))), tokenizer, max_tokens=60, overlap=0)
    assert 1 < len(chunks) < 30
    for chunk in chunks:
        for part in chunk.text.split("\n\n"):
            assert part in paragraphs


def test_a_real_pdf_is_parsed_by_page() -> None:
    pypdf = pytest.importorskip("pypdf")
    writer = pypdf.PdfWriter()
    writer.add_blank_page(width=200, height=200)
    out = io.BytesIO()
    writer.write(out)
    assert parse(out.getvalue(), "pdf") == []  # a blank page has no text, and is no error
    with pytest.raises(InvalidRequest, match="not a readable PDF"):
        parse(b"%PDF-1.7\n garbage", "pdf")


@pytest.mark.parametrize(("name", "media", "head", "kind"), [
    ("a.md", None, b"# x", "markdown"), ("a.HTML", None, b"<h", "html"), ("notes", "text/plain", b"x", "text"),
    ("scan.bin", "application/octet-stream", b"%PDF-1.4", "pdf"),
])
def test_detect_kind(name: str, media: str | None, head: bytes, kind: str) -> None:
    assert detect_kind(name, media, head) == kind


def test_unsupported_and_disguised_files_are_refused() -> None:
    with pytest.raises(UnsupportedDocument) as refused:
        detect_kind("tool.exe", "application/octet-stream", b"MZ\x90\x00")
    assert refused.value.status_code == 415
    with pytest.raises(InvalidRequest, match="not a PDF"):
        detect_kind("fake.pdf", "application/pdf", b"hello")
    with pytest.raises(UnsupportedDocument):
        parse(b"\x00\x01binary", "text")
