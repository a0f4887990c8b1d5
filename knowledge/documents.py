"""Document parsing and chunking for the knowledge base.

Role: turn uploaded bytes (plain text, Markdown, PDF, HTML) into a `ParsedDocument` made of
heading-scoped sections, and cut those sections into sentence-aligned `Chunk`s for embedding.
Pure functions over the bytes given: no file, network or database I/O.
Must not import: fastapi, starlette, uvicorn, twilio, deepgram, ollama, api, voice_pipeline,
sqlalchemy, chromadb.
Of ours, imports only: nothing.

Parsing is bounded: bytes (`max_bytes`), PDF pages (`max_pages`) and the text extracted
(`max_text_chars`, which a compressed PDF can inflate far past its size). Time is bounded by
the caller (`knowledge.parsing` runs this in a worker process it kills on a deadline).

Errors, with the HTTP status a route is expected to map them to:

    DocumentError
    ├── DocumentTooLarge     more bytes, pages or extracted text than the limit 413
    ├── UnsupportedType      not text, Markdown, PDF or HTML                  415
    ├── EmptyDocument        no bytes, or no extractable text                 422
    ├── UnreadableDocument   corrupt or encrypted PDF, text that won't decode 422
    └── DocumentTooComplex   took too long or too much memory to read         422
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePath
from typing import Literal

import pypdf
from bs4 import BeautifulSoup, Comment, Tag
from bs4.element import NavigableString

DEFAULT_MAX_BYTES = 10 * 1024 * 1024  # same default as Settings.MAX_DOCUMENT_BYTES
DEFAULT_MAX_PAGES = 500  # same default as Settings.MAX_DOCUMENT_PAGES
DEFAULT_MAX_TEXT_CHARS = 2_000_000  # same default as Settings.MAX_DOCUMENT_TEXT_CHARS
HEADING_SEPARATOR = " > "

Kind = Literal["text", "markdown", "pdf", "html"]


# --- errors --------------------------------------------------------------------------------


class DocumentError(Exception):
    """Base for every problem with an uploaded document; the message names the problem."""


class DocumentTooLarge(DocumentError):
    pass


class UnsupportedType(DocumentError):
    pass


class EmptyDocument(DocumentError):
    pass


class UnreadableDocument(DocumentError):
    pass


class DocumentTooComplex(DocumentError):
    """Raised by the parse worker's supervisor (`knowledge.parsing`), never in here."""


# --- results -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Section:
    """Body text under one heading path. `start_char` is the offset of `text` in the document."""

    heading: tuple[str, ...]  # outermost heading first; () for text before any heading
    text: str  # blocks (paragraphs, list items, table rows) joined by "\n"
    start_char: int


@dataclass(frozen=True, slots=True)
class ParsedDocument:
    text: str  # normalised full text: heading lines and section bodies
    title: str | None
    sections: tuple[Section, ...]
    kind: Kind


@dataclass(frozen=True, slots=True)
class Chunk:
    """A slice of one section; `start_char` is its offset in `ParsedDocument.text`."""

    text: str
    index: int  # position in the document, from 0
    heading: str  # heading path joined with " > "; "" when the section has none
    start_char: int

    @property
    def embed_text(self) -> str:
        """What gets embedded and stored: the heading path first, so it is searchable too."""
        return f"{self.heading}\n{self.text}" if self.heading else self.text


# --- parsing -------------------------------------------------------------------------------


def parse_document(
    data: bytes,
    *,
    filename: str | None,
    content_type: str | None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pages: int = DEFAULT_MAX_PAGES,
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
) -> ParsedDocument:
    """Parse an upload. The type comes from `content_type`, then the extension, then sniffing."""
    if len(data) > max_bytes:
        raise DocumentTooLarge(f"document is {len(data)} bytes; the limit is {max_bytes} bytes")
    if not data.strip():
        raise EmptyDocument("document is empty")
    media_type, charset = _split_content_type(content_type)
    kind = detect_kind(data, filename=filename, media_type=media_type)
    builder = _SectionBuilder(max_chars=max_text_chars, max_pages=max_pages)
    title = _PARSERS[kind](data, charset, builder)
    return builder.finish(title, kind)


_BY_MEDIA_TYPE: dict[str, Kind] = {
    "text/plain": "text",
    "text/markdown": "markdown",
    "text/x-markdown": "markdown",
    "application/pdf": "pdf",
    "text/html": "html",
    "application/xhtml+xml": "html",
}
_BY_EXTENSION: dict[str, Kind] = {
    ".txt": "text",
    ".text": "text",
    ".md": "markdown",
    ".markdown": "markdown",
    ".pdf": "pdf",
    ".html": "html",
    ".htm": "html",
    ".xhtml": "html",
}
# Clients send these when they do not know; they say nothing about the content.
_GENERIC_MEDIA_TYPES = {"", "application/octet-stream", "binary/octet-stream"}
_SUPPORTED = "plain text, Markdown, PDF or HTML"


def detect_kind(data: bytes, *, filename: str | None, media_type: str) -> Kind:
    extension = PurePath(filename).suffix.lower() if filename else ""
    if media_type not in _GENERIC_MEDIA_TYPES:
        kind = _BY_MEDIA_TYPE.get(media_type)
        if kind is None:
            raise UnsupportedType(f"unsupported content type {media_type!r}; send {_SUPPORTED}")
        # Markdown is often uploaded as text/plain; the extension refines it.
        if kind == "text" and _BY_EXTENSION.get(extension) == "markdown":
            return "markdown"
        return kind
    if extension:
        kind = _BY_EXTENSION.get(extension)
        if kind is None:
            raise UnsupportedType(f"unsupported file extension {extension!r}; send {_SUPPORTED}")
        return kind
    return _sniff(data)


def _sniff(data: bytes) -> Kind:
    head = data[:1024].lstrip()
    if head.startswith(b"%PDF-"):
        return "pdf"
    if head.lower().startswith((b"<!doctype html", b"<html")):
        return "html"
    try:
        _decode_text(data, None)
    except UnreadableDocument:
        raise UnsupportedType(f"could not tell the document type; send {_SUPPORTED}") from None
    return "text"


def _split_content_type(content_type: str | None) -> tuple[str, str | None]:
    if not content_type:
        return "", None
    media_type, *params = content_type.split(";")
    charset = None
    for param in params:
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset" and value.strip():
            charset = value.strip().strip('"')
    return media_type.strip().lower(), charset


def _decode_text(data: bytes, charset: str | None) -> str:
    encoding = (charset or "utf-8").lower()
    if encoding in {"utf-8", "utf8"}:
        encoding = "utf-8-sig"  # tolerate a byte-order mark
    try:
        text = data.decode(encoding)
    except LookupError:
        raise UnreadableDocument(f"unknown charset {charset!r}") from None
    except UnicodeDecodeError as exc:
        raise UnreadableDocument(
            f"document is not valid {charset or 'UTF-8'} text (bad byte at offset {exc.start})"
        ) from None
    if _looks_binary(text):
        raise UnreadableDocument("document contains binary data, not text")
    return text


_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")


def _looks_binary(text: str) -> bool:
    controls = len(_CONTROL_CHARS.findall(text[:65536]))
    return "\x00" in text[:65536] or controls > len(text[:65536]) * 0.01


class _SectionBuilder:
    """Collects heading and paragraph blocks in reading order and lays out the full text."""

    def __init__(
        self, *, max_chars: int = DEFAULT_MAX_TEXT_CHARS, max_pages: int = DEFAULT_MAX_PAGES
    ) -> None:
        self.max_chars, self.max_pages = max_chars, max_pages
        self._taken = 0  # characters of text given, before spaces collapse
        self._pieces: list[str] = []
        self._length = 0
        self._path: list[tuple[int, str]] = []  # (level, heading text), outermost first
        self._body: list[str] = []
        self._sections: list[Section] = []

    def take(self, text: str) -> str:
        """`text`, counted against `max_chars`: past it the document is too large."""
        self._taken += len(text)
        if self._taken > self.max_chars:
            raise DocumentTooLarge(
                f"document has more than {self.max_chars} characters of text; split it"
            )
        return text

    def heading(self, level: int, text: str) -> None:
        text = _collapse_spaces(self.take(text))
        if not text:
            return
        self._close_section()
        while self._path and self._path[-1][0] >= level:
            self._path.pop()
        self._path.append((level, text))
        self._write(text)

    def paragraph(self, text: str, *, counted: bool = False) -> None:
        """`counted`: `take` has already seen this text."""
        text = _collapse_spaces(text if counted else self.take(text))
        if text:
            self._body.append(text)

    def finish(self, title: str | None, kind: Kind) -> ParsedDocument:
        self._close_section()
        if not self._sections:
            raise EmptyDocument(f"no extractable text in this {kind} document")
        if title is None and self._sections[0].heading:
            title = self._sections[0].heading[0]
        return ParsedDocument("".join(self._pieces), title, tuple(self._sections), kind)

    def _close_section(self) -> None:
        if not self._body:
            return
        body = "\n".join(self._body)
        start = self._write(body)
        heading = tuple(text for _, text in self._path)
        self._sections.append(Section(heading, body, start))
        self._body = []

    def _write(self, text: str) -> int:
        if self._pieces:
            self._pieces.append("\n\n")
            self._length += 2
        start = self._length
        self._pieces.append(text)
        self._length += len(text)
        return start


def _collapse_spaces(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


# --- plain text and PDF --------------------------------------------------------------------

_BLANK_LINE = re.compile(r"\n\s*\n")


def _parse_text(data: bytes, charset: str | None, builder: _SectionBuilder) -> str | None:
    _add_paragraphs(_decode_text(data, charset), builder)
    return None


def _add_paragraphs(text: str, builder: _SectionBuilder, *, counted: bool = False) -> None:
    """Paragraphs are separated by blank lines; hard-wrapped lines inside one are joined.
    `counted`: the text was already counted against the builder's limit."""
    for paragraph in _BLANK_LINE.split(text.replace("\r\n", "\n")):
        builder.paragraph(paragraph, counted=counted)


def _parse_pdf(data: bytes, charset: str | None, builder: _SectionBuilder) -> str | None:
    reader = _open_pdf(data)
    try:
        count = len(reader.pages)
    except Exception as exc:
        raise UnreadableDocument(f"PDF is corrupt: {exc}") from exc
    if count > builder.max_pages:
        raise DocumentTooLarge(f"PDF has {count} pages; the limit is {builder.max_pages}")
    for index in range(count):
        try:
            page = reader.pages[index].extract_text() or ""
        except Exception as exc:  # pypdf raises many types on malformed content streams
            raise UnreadableDocument(f"PDF is corrupt: {exc}") from exc
        # Counted before anything else touches it: a small page can inflate to megabytes.
        page = builder.take(page)
        # Rejoin words hyphenated at line ends ("retent-\nion").
        _add_paragraphs(re.sub(r"(\w)-\n(\w)", r"\1\2", page), builder, counted=True)
    return _pdf_title(reader)


def _open_pdf(data: bytes) -> pypdf.PdfReader:
    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
    except Exception as exc:  # PdfReadError, but also ValueError/KeyError on broken xrefs
        raise UnreadableDocument(f"PDF is corrupt or truncated: {exc}") from exc
    if reader.is_encrypted:
        try:
            opened = reader.decrypt("")  # owner-password-only PDFs open with an empty password
        except Exception as exc:
            raise UnreadableDocument(f"PDF is encrypted and cannot be opened: {exc}") from exc
        if not opened:
            raise UnreadableDocument("PDF is password-protected; upload an unencrypted copy")
    return reader


def _pdf_title(reader: pypdf.PdfReader) -> str | None:
    try:
        title = reader.metadata.title if reader.metadata else None
    except Exception:  # a broken info dictionary only costs us the title
        return None
    if not isinstance(title, str):
        return None
    return _collapse_spaces(title) or None


# --- Markdown ------------------------------------------------------------------------------

_ATX_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
_SETEXT_UNDERLINE = re.compile(r"^ {0,3}(=+|-+)\s*$")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")
_LIST_ITEM = re.compile(r"^\s*(?:[-*+]|\d{1,9}[.)])\s+")
_FRONT_MATTER = re.compile(r"\A---\n.*?\n---\n", re.DOTALL)  # YAML front matter
_TABLE_RULE = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")
_INLINE_RULES = [
    (re.compile(r"!\[([^\]]*)\]\([^)]*\)"), r"\1"),  # image -> alt text
    (re.compile(r"\[([^\]]+)\]\([^)]*\)"), r"\1"),  # link -> its text
    (re.compile(r"<(https?://[^>]+)>"), r"\1"),  # autolink
    (re.compile(r"<!--.*?-->"), ""),
    (re.compile(r"(?<!\w)(\*{1,3}|_{1,3})(?=\S)(.+?)(?<=\S)\1(?!\w)"), r"\2"),  # emphasis
    (re.compile(r"`([^`]*)`"), r"\1"),
]


def _parse_markdown(data: bytes, charset: str | None, builder: _SectionBuilder) -> str | None:
    text = _FRONT_MATTER.sub("", _decode_text(data, charset).replace("\r\n", "\n"), count=1)
    reader = _MarkdownReader(builder)
    for line in text.split("\n"):
        reader.line(line)
    reader.flush()
    return None


class _MarkdownReader:
    """Line-by-line CommonMark subset: ATX/setext headings, fences, lists, tables, quotes."""

    def __init__(self, builder: _SectionBuilder) -> None:
        self._builder = builder
        self._paragraph: list[str] = []
        self._in_fence = False

    def line(self, line: str) -> None:
        if _FENCE.match(line):
            self.flush()
            self._in_fence = not self._in_fence
        elif self._in_fence:
            self._builder.paragraph(line)  # code lines stay separate blocks
        elif heading := _ATX_HEADING.match(line):
            self.flush()
            self._builder.heading(len(heading.group(1)), _markdown_inline(heading.group(2)))
        elif _SETEXT_UNDERLINE.match(line) and len(self._paragraph) == 1:
            level = 1 if line.strip().startswith("=") else 2
            self._builder.heading(level, _markdown_inline(self._paragraph.pop()))
        elif not line.strip() or _SETEXT_UNDERLINE.match(line):
            self.flush()  # blank line or thematic break
        else:
            self._content(line)

    def flush(self) -> None:
        if self._paragraph:
            self._builder.paragraph(_markdown_inline(" ".join(self._paragraph)))
            self._paragraph = []

    def _content(self, line: str) -> None:
        """List items and table rows start their own block; other lines continue one."""
        stripped = line.strip().lstrip(">").strip()
        if stripped.startswith("|"):
            self.flush()
            if not _TABLE_RULE.match(stripped):
                cells = [cell.strip() for cell in stripped.strip("|").split("|")]
                self._builder.paragraph(_markdown_inline(" | ".join(cells)))
        elif _LIST_ITEM.match(line):
            self.flush()
            self._paragraph.append(_LIST_ITEM.sub("", line, count=1))
        else:
            self._paragraph.append(stripped)


def _markdown_inline(text: str) -> str:
    for pattern, replacement in _INLINE_RULES:
        text = pattern.sub(replacement, text)
    return text


# --- HTML ----------------------------------------------------------------------------------

_HTML_DROP = frozenset(
    [
        "script",
        "style",
        "nav",
        "noscript",
        "template",
        "svg",
        "iframe",
        "head",
        "title",
        "form",
        "button",
    ]
)
_HTML_HEADINGS = {"h1": 1, "h2": 2, "h3": 3, "h4": 4, "h5": 5, "h6": 6}
_HTML_BLOCKS = frozenset(
    [
        "p",
        "div",
        "section",
        "article",
        "main",
        "header",
        "footer",
        "aside",
        "ul",
        "ol",
        "li",
        "dl",
        "dt",
        "dd",
        "blockquote",
        "pre",
        "table",
        "thead",
        "tbody",
        "tfoot",
        "caption",
        "figure",
        "figcaption",
        "address",
        "details",
        "summary",
        "br",
        "hr",
    ]
)
_META_CHARSET = re.compile(rb"""<meta[^>]+charset=["']?([\w-]+)""", re.IGNORECASE)


def _parse_html(data: bytes, charset: str | None, builder: _SectionBuilder) -> str | None:
    if charset is None and (declared := _META_CHARSET.search(data[:4096])):
        charset = declared.group(1).decode("ascii")
    soup = BeautifulSoup(_decode_text(data, charset), "html.parser")
    title = _collapse_spaces(soup.title.get_text()) if soup.title else ""
    _HtmlWalker(builder).walk(soup.body or soup)
    return title or None


class _HtmlWalker:
    """Emits headings and paragraph blocks in document order; inline text is accumulated."""

    def __init__(self, builder: _SectionBuilder) -> None:
        self._builder = builder
        self._inline: list[str] = []

    def walk(self, node: Tag) -> None:
        self._inline_children(node)
        self._flush()

    def _element(self, tag: Tag) -> None:
        name = tag.name.lower()
        if name in _HTML_DROP:
            return
        if name in _HTML_HEADINGS:
            self._flush()
            self._builder.heading(_HTML_HEADINGS[name], tag.get_text(" "))
        elif name == "tr":
            self._flush()
            cells = [cell.get_text(" ", strip=True) for cell in tag.find_all(["th", "td"])]
            self._builder.paragraph(" | ".join(cell for cell in cells if cell))
        elif name in _HTML_BLOCKS:
            self._flush()
            self.walk(tag)
        else:
            self._inline_children(tag)

    def _inline_children(self, tag: Tag) -> None:
        for child in tag.children:
            if isinstance(child, Comment):
                continue
            if isinstance(child, NavigableString):
                self._inline.append(str(child))
            elif isinstance(child, Tag):
                self._element(child)

    def _flush(self) -> None:
        if self._inline:
            self._builder.paragraph("".join(self._inline))
            self._inline = []


_PARSERS = {
    "text": _parse_text,
    "markdown": _parse_markdown,
    "pdf": _parse_pdf,
    "html": _parse_html,
}


# --- chunking ------------------------------------------------------------------------------

# A sentence ends at . ! ? or … (plus closing quotes/brackets) followed by whitespace and a
# capital, digit or opening quote. Lower-case continuations ("e.g. the") do not end one.
_SENTENCE_END = re.compile(r"""[.!?…]+["'”’)\]]*(?=\s+["'“‘(\[]?[A-Z0-9$€£])""")


def chunk_document(
    parsed: ParsedDocument, *, max_chars: int = 800, overlap_chars: int = 120
) -> list[Chunk]:
    """Cut each section into chunks of whole sentences, at most `max_chars` long.

    A chunk never spans two sections. Consecutive chunks of one section share trailing
    sentences up to `overlap_chars`. Only a sentence longer than `max_chars` is cut, at word
    boundaries (inside a word only when one word is longer than `max_chars`).
    """
    if max_chars < 1 or not 0 <= overlap_chars < max_chars:
        raise ValueError("need max_chars >= 1 and 0 <= overlap_chars < max_chars")
    chunks: list[Chunk] = []
    for section in parsed.sections:
        heading = HEADING_SEPARATOR.join(section.heading)
        units = list(_sentence_spans(section.text, max_chars))
        for start, end in _pack(units, max_chars, overlap_chars):
            text = section.text[start:end]
            chunks.append(Chunk(text, len(chunks), heading, section.start_char + start))
    return chunks


def _sentence_spans(text: str, max_chars: int) -> Iterator[tuple[int, int]]:
    """(start, end) of each sentence; blocks (lines) always end a sentence."""
    for line in re.finditer(r"[^\n]+", text):
        start = line.start()
        for end_match in _SENTENCE_END.finditer(line.group()):
            yield from _fit(text, start, line.start() + end_match.end(), max_chars)
            start = line.start() + end_match.end()
        yield from _fit(text, start, line.end(), max_chars)


def _fit(text: str, start: int, end: int, max_chars: int) -> Iterator[tuple[int, int]]:
    """Trim whitespace; split a span longer than `max_chars` at word boundaries."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    if end - start <= max_chars:
        if end > start:
            yield start, end
        return
    piece_start = piece_end = start
    for word in re.finditer(r"\S+", text[start:end]):
        word_start, word_end = start + word.start(), start + word.end()
        if word_end - piece_start > max_chars and piece_end > piece_start:
            yield piece_start, piece_end
            piece_start = word_start
        while word_end - piece_start > max_chars:  # one word longer than max_chars
            yield piece_start, piece_start + max_chars
            piece_start += max_chars
        piece_end = word_end
    if piece_end > piece_start:
        yield piece_start, piece_end


def _pack(
    units: list[tuple[int, int]], max_chars: int, overlap_chars: int
) -> Iterator[tuple[int, int]]:
    """Group consecutive sentence spans greedily; step back over `overlap_chars` of them."""
    first = 0
    while first < len(units):
        last = first
        while last + 1 < len(units) and units[last + 1][1] - units[first][0] <= max_chars:
            last += 1
        yield units[first][0], units[last][1]
        if last + 1 == len(units):
            return
        first = _overlap_start(units, first, last, max_chars, overlap_chars)


def _overlap_start(
    units: list[tuple[int, int]], first: int, last: int, max_chars: int, overlap_chars: int
) -> int:
    """Index the next chunk starts at: after `first`, reaching back while the overlap fits."""
    nxt = last + 1
    while (
        nxt - 1 > first
        and units[last][1] - units[nxt - 1][0] <= overlap_chars
        and units[last + 1][1] - units[nxt - 1][0] <= max_chars
    ):
        nxt -= 1
    return nxt
