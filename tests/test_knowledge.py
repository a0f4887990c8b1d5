"""Knowledge base: parsing, chunking, and retrieval on real embedded Chroma with the real
MiniLM model (loaded once per session). Fixtures: an Acme Dialer FAQ (Markdown) and pricing
page (HTML) in tests/fixtures/knowledge; PDFs are written by `_pdf` below."""

from __future__ import annotations

import dataclasses
import io
import itertools
import re
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import chromadb
import numpy as np
import pypdf
import pytest
from chromadb.config import Settings as ChromaSettings

from config import Settings
from knowledge.chroma import (
    KnowledgeBase,
    Passage,
    collection_name,
    format_passages_for_prompt,
)
from knowledge.documents import (
    Chunk,
    DocumentTooLarge,
    EmptyDocument,
    ParsedDocument,
    UnreadableDocument,
    UnsupportedType,
    chunk_document,
    parse_document,
)
from knowledge.embedding import EmbeddingModelUnavailable, MiniLMEmbeddingFunction, embed

FIXTURES = Path(__file__).parent / "fixtures" / "knowledge"
FAQ = FIXTURES / "acme_dialer_faq.md"
PRICING = FIXTURES / "acme_dialer_pricing.html"
AGENT = "agt_acme01"


# --- helpers and fixtures ------------------------------------------------------------------


def _pdf(pages: list[list[str]]) -> bytes:
    """A minimal valid PDF: one Helvetica text line per entry, one list per page."""
    objects: list[bytes] = [b"<< /Type /Catalog /Pages 2 0 R >>", b""]  # pages filled below
    page_ids = []
    for lines in pages:
        ops = ["BT /F1 11 Tf 72 740 Td 14 TL"]
        ops += ["(" + _pdf_escape(line) + ") '" for line in lines]
        content = "\n".join([*ops, "ET"]).encode("latin-1")
        objects.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(content), content))
        objects.append(
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents %d 0 R "
            b"/Resources << /Font << /F1 %d 0 R >> >> >>" % (len(objects), 3 + 2 * len(pages))
        )
        page_ids.append(len(objects))
    kids = " ".join(f"{i} 0 R" for i in page_ids).encode()
    objects[1] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (kids, len(pages))
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)


def _pdf_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def _encrypted(pdf: bytes, *, user_password: str) -> bytes:
    writer = pypdf.PdfWriter(clone_from=pypdf.PdfReader(io.BytesIO(pdf)))
    writer.encrypt(user_password=user_password, owner_password="owner", algorithm="RC4-128")
    buffer = io.BytesIO()
    writer.write(buffer)
    return buffer.getvalue()


def _parse_fixture(path: Path) -> ParsedDocument:
    return parse_document(path.read_bytes(), filename=path.name, content_type=None)


def _settings(tmp_path: Path) -> Settings:
    return Settings(_env_file=None, CHROMA_PATH=tmp_path / "chroma", CHROMA_HOST="")  # type: ignore[call-arg]


@pytest.fixture
def kb(tmp_path: Path, embedding_model: None) -> Iterator[KnowledgeBase]:
    knowledge_base = KnowledgeBase(_settings(tmp_path), write_batch_size=4)
    yield knowledge_base
    knowledge_base.close()


@pytest.fixture
async def loaded_kb(kb: KnowledgeBase) -> AsyncIterator[KnowledgeBase]:
    for document_id, path in (("doc-faq", FAQ), ("doc-pricing", PRICING)):
        chunks = chunk_document(_parse_fixture(path))
        await kb.add_document(AGENT, document_id, chunks, source=path.name)
    yield kb


# --- parsing -------------------------------------------------------------------------------


def test_markdown_sections_follow_heading_levels() -> None:
    parsed = _parse_fixture(FAQ)

    assert parsed.kind == "markdown"
    assert parsed.title == "Acme Dialer FAQ"
    headings = [section.heading for section in parsed.sections]
    assert ("Acme Dialer FAQ", "Security and data", "Is Acme Dialer SOC 2 compliant?") in headings
    assert ("Acme Dialer FAQ", "Support and billing", "Is there a free trial?") in headings
    assert "audience: prospects" not in parsed.text  # front matter dropped
    assert "**" not in parsed.text and "within two business days" in parsed.text
    for section in parsed.sections:
        assert parsed.text[section.start_char :].startswith(section.text)


def test_html_keeps_headings_and_drops_script_style_nav() -> None:
    parsed = parse_document(PRICING.read_bytes(), filename=None, content_type="text/html")

    assert parsed.kind == "html"
    assert parsed.title == "Acme Dialer Pricing"
    sections = {section.heading: section.text for section in parsed.sections}
    assert "$79 per user per month" in sections[("Pricing", "Pro plan")]
    assert "Price per user per month | $29 | $79 | Custom" in sections[("Pricing", "Compare plans")]
    for dropped in ("pricing_view", "Log in", "font-weight"):
        assert dropped not in parsed.text


def test_pdf_text_is_extracted() -> None:
    data = _pdf(
        [
            ["Acme Dialer security overview.", "All data is encrypted at rest with AES-256."],
            ["Recordings are kept for 24 months by default."],
        ]
    )

    parsed = parse_document(data, filename="security.pdf", content_type="application/pdf")

    assert parsed.kind == "pdf"
    assert "encrypted at rest with AES-256." in parsed.text
    assert "kept for 24 months" in parsed.text


def test_pdf_encrypted_with_empty_user_password_still_opens() -> None:
    data = _encrypted(_pdf([["Support is open on weekdays."]]), user_password="")

    parsed = parse_document(data, filename="hours.pdf", content_type=None)

    assert "open on weekdays" in parsed.text


def test_plain_text_joins_wrapped_lines_into_paragraphs() -> None:
    data = b"Acme Dialer support\n\nSupport answers chat and\nemail on weekdays.\n\nPhones: 24/7.\n"

    parsed = parse_document(data, filename="notes.txt", content_type="text/plain; charset=utf-8")

    assert parsed.kind == "text"
    assert [s.text for s in parsed.sections] == [
        "Acme Dialer support\nSupport answers chat and email on weekdays.\nPhones: 24/7."
    ]


@pytest.mark.parametrize(
    ("data", "filename", "content_type", "kind"),
    [
        (_pdf([["Hello there."]]), None, None, "pdf"),  # sniffed
        (b"<!DOCTYPE html><html><body><p>Hi there.</p></body></html>", None, None, "html"),
        (b"# Title\n\nBody text.", "faq.md", "text/plain", "markdown"),  # extension refines
        (b"<p>Hi there.</p>", "page.txt", "text/html", "html"),  # content type wins
        (b"Just words.", "notes.txt", "application/octet-stream", "text"),
    ],
)
def test_type_detection(
    data: bytes, filename: str | None, content_type: str | None, kind: str
) -> None:
    assert parse_document(data, filename=filename, content_type=content_type).kind == kind


@pytest.mark.parametrize(
    ("data", "filename", "content_type", "error", "message"),
    [
        (b"", "a.txt", None, EmptyDocument, "empty"),
        (b"  \n\t ", "a.txt", None, EmptyDocument, "empty"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "logo.png", None, UnsupportedType, ".png"),
        (b"PK\x03\x04", "deck.docx", None, UnsupportedType, ".docx"),
        (b"abc", "a.txt", "image/png", UnsupportedType, "image/png"),
        (b"\x00\x01\x02\xff\xfe", None, None, UnsupportedType, "type"),
        (b"%PDF-1.7\n1 0 obj <<>> garbage", "a.pdf", None, UnreadableDocument, "corrupt"),
        (b"\xff\xfe\xfa not utf-8 \x81", "a.txt", "text/plain", UnreadableDocument, "UTF-8"),
        (b"text\x00\x00\x00with nulls", "a.txt", None, UnreadableDocument, "binary"),
        (b"<html><script>x()</script></html>", "a.html", None, EmptyDocument, "no extractable"),
        (_pdf([[]]), "scan.pdf", None, EmptyDocument, "no extractable"),
    ],
)
def test_bad_documents_raise_named_errors(
    data: bytes, filename: str | None, content_type: str | None, error: type, message: str
) -> None:
    with pytest.raises(error, match=re.escape(message)):
        parse_document(data, filename=filename, content_type=content_type)


def test_password_protected_pdf_is_unreadable() -> None:
    data = _encrypted(_pdf([["Secret pricing."]]), user_password="s3cret")

    with pytest.raises(UnreadableDocument, match="password"):
        parse_document(data, filename="a.pdf", content_type="application/pdf")


def test_oversize_document_is_refused_before_parsing() -> None:
    with pytest.raises(DocumentTooLarge, match="limit is 100 bytes"):
        parse_document(b"x" * 101, filename="a.txt", content_type=None, max_bytes=100)


# --- chunking ------------------------------------------------------------------------------

SENTENCES = [f"Sentence number {n} explains one more detail of the rollout." for n in range(1, 21)]


def _long_markdown() -> ParsedDocument:
    body = " ".join(SENTENCES)
    text = f"# Guide\n\n## Onboarding\n\n{body}\n\n## Billing\n\n{body}\n"
    return parse_document(text.encode(), filename="guide.md", content_type=None)


def test_chunks_never_cross_a_heading() -> None:
    parsed = _long_markdown()

    chunks = chunk_document(parsed, max_chars=300, overlap_chars=100)

    spans = [(s.start_char, s.start_char + len(s.text), s.heading) for s in parsed.sections]
    for chunk in chunks:
        assert parsed.text[chunk.start_char :].startswith(chunk.text)
        (section,) = [s for s in spans if s[0] <= chunk.start_char < s[1]]
        assert chunk.start_char + len(chunk.text) <= section[1]
        assert chunk.heading == " > ".join(section[2])
    assert {chunk.heading for chunk in chunks} == {"Guide > Onboarding", "Guide > Billing"}
    assert [chunk.index for chunk in chunks] == list(range(len(chunks)))


def test_chunks_hold_whole_sentences_within_max() -> None:
    chunks = chunk_document(_long_markdown(), max_chars=300, overlap_chars=100)

    for chunk in chunks:
        assert len(chunk.text) <= 300
        pieces = chunk.text.split(". ")
        rebuilt = [p if p.endswith(".") else p + "." for p in pieces]
        assert all(sentence in SENTENCES for sentence in rebuilt), chunk.text


def test_consecutive_chunks_of_a_section_overlap_by_whole_sentences() -> None:
    chunks = chunk_document(_long_markdown(), max_chars=300, overlap_chars=100)

    same_section = [(a, b) for a, b in itertools.pairwise(chunks) if a.heading == b.heading]
    assert same_section
    for previous, current in same_section:
        last_sentence = previous.text.rsplit(". ", 1)[-1]
        assert current.text.startswith(last_sentence)
        assert current.start_char < previous.start_char + len(previous.text)


def test_sentence_longer_than_max_is_cut_at_word_boundaries() -> None:
    words = [f"word{n}" for n in range(300)]
    parsed = parse_document(" ".join(words).encode(), filename="long.txt", content_type=None)

    chunks = chunk_document(parsed, max_chars=200, overlap_chars=40)

    assert len(chunks) > 1
    assert all(len(chunk.text) <= 200 for chunk in chunks)
    assert " ".join(chunk.text for chunk in chunks).split() == words


def test_word_longer_than_max_is_hard_cut() -> None:
    parsed = parse_document(b"A" * 450, filename="blob.txt", content_type=None)

    chunks = chunk_document(parsed, max_chars=200, overlap_chars=0)

    assert [len(chunk.text) for chunk in chunks] == [200, 200, 50]


def test_embed_text_carries_the_heading_path() -> None:
    chunks = chunk_document(
        parse_document(PRICING.read_bytes(), filename=PRICING.name, content_type=None)
    )

    pro = next(chunk for chunk in chunks if chunk.heading == "Pricing > Pro plan")
    assert pro.embed_text == "Pricing > Pro plan\n" + pro.text


# --- embedding function --------------------------------------------------------------------


def test_embedding_function_is_not_legacy_and_rebuilds_cheaply() -> None:
    function = MiniLMEmbeddingFunction()

    assert not function.is_legacy()
    assert function.default_space() == "cosine"
    rebuilt = MiniLMEmbeddingFunction.build_from_config(function.get_config())
    assert rebuilt.get_config() == {"model_path": ""}


def test_missing_model_fails_on_first_use_not_on_construction(tmp_path: Path) -> None:
    function = MiniLMEmbeddingFunction(str(tmp_path / "no-model"))

    with pytest.raises(EmbeddingModelUnavailable, match="no-model"):
        function(["hello"])


def test_embeddings_are_unit_length(embedding_model: None) -> None:
    vectors = embed(["When is support open?", "How much is Pro?"])

    assert vectors.shape == (2, 384)
    assert all(abs(float((v * v).sum()) - 1.0) < 1e-4 for v in vectors)


def test_concurrent_embedding_matches_serial(embedding_model: None) -> None:
    texts = [f"Question {n}: does plan {n % 3} include {n * 7} minutes?" for n in range(40)]
    batches = [
        texts[n : n + size] for n, size in zip(range(0, 40, 5), [1, 5, 3, 5] * 2, strict=True)
    ]
    serial = [embed(batch) for batch in batches]

    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(embed, batches))

    for expected, actual in zip(serial, concurrent, strict=True):
        assert np.allclose(expected, actual, atol=1e-5)


# --- the store -----------------------------------------------------------------------------

# Caller questions paraphrased from the fixture topics, each with the text that marks the
# right passage (heading or content, never chunk ids).
CALLER_QUESTIONS = [
    ("Do you guys hook into HubSpot?", "Which integrations are available?"),
    ("What would the Pro tier cost me for each rep monthly?", "Pro plan"),
    ("Has an outside firm audited your security controls?", "SOC 2 compliant"),
    ("If we leave, when does our information get wiped?", "How long do you keep our data?"),
    ("Can the bot handle callers who only speak Spanish?", "Which languages"),
    ("What hours is your help desk staffed?", "When can I reach support?"),
    ("Is there some way to test it out before we pay anything?", "Is there a free trial?"),
    ("How would I get out of my plan if it doesn't work for us?", "How do I cancel"),
    ("Do conversations get taped?", "Are calls recorded?"),
    ("We're a charity, is there any price break for us?", "discount for nonprofits"),
]


async def test_caller_questions_find_the_right_passage(loaded_kb: KnowledgeBase) -> None:
    misses = []
    for question, marker in CALLER_QUESTIONS:
        passages = await loaded_kb.search(AGENT, question, top_k=3, min_similarity=0.0)
        if not any(marker in p.heading or marker in p.text for p in passages):
            misses.append((question, [p.heading for p in passages]))

    assert len(misses) <= 1, misses


async def test_search_returns_passages_with_metadata(loaded_kb: KnowledgeBase) -> None:
    passages = await loaded_kb.search(AGENT, "How much is the Pro plan per user?", top_k=2)

    top = passages[0]
    assert top.heading == "Pricing > Pro plan"
    assert top.text.startswith("The Pro plan costs $79")  # no heading prefix in the text
    assert (top.source, top.document_id) == ("acme_dialer_pricing.html", "doc-pricing")
    assert 0.3 <= top.similarity <= 1.0 and len(passages) <= 2
    assert [p.similarity for p in passages] == sorted(
        (p.similarity for p in passages), reverse=True
    )


async def test_search_drops_passages_below_min_similarity(loaded_kb: KnowledgeBase) -> None:
    unrelated = "What is the boiling point of mercury on Jupiter?"

    assert await loaded_kb.search(AGENT, unrelated, top_k=3, min_similarity=0.5) == []
    everything = await loaded_kb.search(AGENT, unrelated, top_k=3, min_similarity=-1.0)
    assert len(everything) == 3


async def test_unknown_or_empty_agent_has_no_passages(kb: KnowledgeBase) -> None:
    assert await kb.search("agt_nobody", "pricing?") == []
    assert await kb.count("agt_nobody") == 0
    await kb.add_document("agt_empty", "doc-none", [], source="empty.txt")
    assert await kb.search("agt_empty", "pricing?") == []


async def test_collections_are_per_agent(loaded_kb: KnowledgeBase) -> None:
    assert await loaded_kb.search("agt_other", "How much is the Pro plan?") == []
    assert await loaded_kb.count(AGENT) == 23


async def test_delete_document_removes_only_its_chunks(loaded_kb: KnowledgeBase) -> None:
    pricing_chunks = len(chunk_document(_parse_fixture(PRICING)))

    removed = await loaded_kb.delete_document(AGENT, "doc-faq")

    assert removed == 23 - pricing_chunks
    assert await loaded_kb.count(AGENT) == pricing_chunks
    passages = await loaded_kb.search(AGENT, "Are you SOC 2 compliant?", min_similarity=-1.0)
    assert {p.document_id for p in passages} == {"doc-pricing"}
    assert await loaded_kb.delete_document(AGENT, "doc-faq") == 0


async def test_adding_a_document_again_replaces_its_chunks(loaded_kb: KnowledgeBase) -> None:
    chunks = chunk_document(_parse_fixture(FAQ))[:3]

    assert await loaded_kb.add_document(AGENT, "doc-faq", chunks, source=FAQ.name) == 3

    assert await loaded_kb.count(AGENT) == 3 + len(chunk_document(_parse_fixture(PRICING)))


async def test_failed_add_leaves_nothing_of_that_document(loaded_kb: KnowledgeBase) -> None:
    chunks = chunk_document(_parse_fixture(FAQ))
    # Chroma rejects a dict as a metadata value. With batches of 4 the bad chunk is in the
    # third batch, after two batches were already written.
    chunks[9] = dataclasses.replace(chunks[9], heading={"not": "a string"})  # type: ignore[arg-type]
    before = await loaded_kb.count(AGENT)

    with pytest.raises(ValueError, match="metadata"):
        await loaded_kb.add_document(AGENT, "doc-faq-v2", chunks, source=FAQ.name)

    assert await loaded_kb.count(AGENT) == before
    passages = await loaded_kb.search(AGENT, "Which CRMs do you integrate with?", top_k=5)
    assert "doc-faq-v2" not in {p.document_id for p in passages}


async def test_delete_agent_drops_the_collection(loaded_kb: KnowledgeBase) -> None:
    await loaded_kb.delete_agent(AGENT)

    assert await loaded_kb.count(AGENT) == 0
    assert await loaded_kb.search(AGENT, "pricing") == []
    await loaded_kb.delete_agent(AGENT)  # already gone: no error


async def test_reopened_store_searches_through_the_registered_function(
    loaded_kb: KnowledgeBase, tmp_path: Path
) -> None:
    loaded_kb.close()

    reopened = KnowledgeBase(_settings(tmp_path))
    try:
        passages = await reopened.search(AGENT, "Can I try it free first?")
        assert passages[0].heading.endswith("Is there a free trial?")
    finally:
        reopened.close()

    # A plain client that passes no embedding function gets ours back from the registry.
    client = chromadb.PersistentClient(
        path=str(tmp_path / "chroma"), settings=ChromaSettings(anonymized_telemetry=False)
    )
    try:
        collection = client.get_collection(collection_name(AGENT))
        assert isinstance(collection.configuration["embedding_function"], MiniLMEmbeddingFunction)
        result = collection.query(query_texts=["Where is our data hosted?"], n_results=1)
        assert "Frankfurt" in result["documents"][0][0]  # type: ignore[index]
    finally:
        client.close()  # type: ignore[attr-defined]  # on Client, not on the ClientAPI type


async def test_healthy(kb: KnowledgeBase) -> None:
    assert await kb.healthy() is True


def test_collection_name_rules() -> None:
    assert collection_name("agt_1a2b") == "kb-agt_1a2b"
    for bad in ("", "agt 1", "agt/1", "agt_", "é"):
        with pytest.raises(ValueError, match="cannot name"):
            collection_name(bad)


def test_prompt_block_marks_reference_material_with_sources() -> None:
    passages = [
        Passage("Pro costs $79.", "pricing.html", "Pricing > Pro plan", "d1", 0.8, 2),
        Passage("Support is 8-8 ET.", "faq.md", "", "d2", 0.6, 0),
    ]

    block = format_passages_for_prompt(passages)

    assert block.startswith("Reference material")
    assert "[1] Source: pricing.html — Pricing > Pro plan\nPro costs $79." in block
    assert "[2] Source: faq.md\nSupport is 8-8 ET." in block
    assert format_passages_for_prompt([]) == ""


def test_chunk_is_a_plain_value() -> None:
    chunk = Chunk("Text.", 0, "", 0)

    assert chunk.embed_text == "Text."
