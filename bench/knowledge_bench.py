"""What knowledge retrieval costs with a large collection. Prints figures; asserts nothing.

    .venv/bin/python -m bench.knowledge_bench [--chunks 10000] [--queries 200] [--batch 256]

1. Ingest: `--chunks` synthetic FAQ-like chunks (varied products, topics, numbers) added
   through `KnowledgeBase.add_document` as documents of `--batch` chunks, into embedded Chroma
   in a temporary directory. Prints chunks/s (embedding dominates).
2. Search: `--queries` caller-style questions through `KnowledgeBase.search` (top_k 3), one at
   a time as the pipeline does. Prints p50/p95/p99 of the whole call (thread hop, query
   embedding, HNSW search, metadata fetch) and of the query embedding alone.
3. The same searches while another document of `--batch` * 8 chunks is being ingested, as
   when an upload lands during live calls.

Must not import: fastapi, sqlalchemy, store, tools, postcall.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from pathlib import Path

from config import Settings
from knowledge.chroma import KnowledgeBase
from knowledge.documents import Chunk
from knowledge.embedding import embed

PRODUCTS = ["Acme Dialer", "Acme Inbox", "Acme Meet", "Acme Sign", "Acme Pay", "Acme Desk"]
TOPICS = {
    "pricing": "The {plan} plan of {product} costs ${price} per user per month, billed {cycle}.",
    "limits": "{product} {plan} includes {n} {unit} per user each month; extra {unit} cost "
    "{cents} cents each.",
    "security": "{product} encrypts data at rest with AES-256 and holds a {cert} report "
    "renewed every {months} months.",
    "retention": "{product} keeps {record} for {months} months by default; admins can shorten "
    "this to {days} days.",
    "support": "{product} support answers by {channel} from {start} am to {end} pm {zone}, "
    "{days_text}.",
    "integrations": "{product} syncs with {crm} within {n} seconds and posts alerts to {chat}.",
    "onboarding": "Teams on {product} {plan} go live in {days} business days with a "
    "{minutes}-minute kickoff call.",
    "languages": "The {product} voice agent speaks {lang_a}, {lang_b} and {lang_c}, switching "
    "automatically.",
    "cancellation": "{product} {cycle} plans can be cancelled from Settings; access continues "
    "until the end of the {period}.",
    "discounts": "{org} get {pct}% off {product} {plan}; annual billing saves a further {pct2}%.",
}
FILLERS = {
    "plan": ["Starter", "Team", "Pro", "Business", "Enterprise", "Growth"],
    "cycle": ["monthly", "annually", "quarterly"],
    "unit": ["minutes", "messages", "seats", "numbers", "recordings", "API calls"],
    "cert": ["SOC 2 Type II", "ISO 27001", "HIPAA attestation", "PCI DSS"],
    "record": ["call logs", "transcripts", "recordings", "voicemails", "chat history"],
    "channel": ["chat", "email", "phone", "chat and email"],
    "zone": ["Eastern Time", "Pacific Time", "CET", "GMT"],
    "days_text": ["Monday to Friday", "every day", "weekdays and Saturday mornings"],
    "crm": ["Salesforce", "HubSpot", "Pipedrive", "Zoho CRM", "Dynamics 365"],
    "chat": ["Slack", "Microsoft Teams", "Google Chat"],
    "lang_a": ["English", "Spanish", "French"],
    "lang_b": ["German", "Portuguese", "Italian"],
    "lang_c": ["Dutch", "Japanese", "Polish"],
    "period": ["billing month", "annual term", "quarter"],
    "org": ["Nonprofits", "Schools", "Startups", "Government agencies"],
}
QUESTIONS = [
    "How much does the {plan} plan of {product} cost?",
    "Is {product} {cert} certified?",
    "How long does {product} keep {record}?",
    "When can I reach {product} support by {channel}?",
    "Does {product} work with {crm}?",
    "How fast can we get started on {product}?",
    "Which languages does the {product} agent speak?",
    "How do I cancel {product}?",
    "Do {org} get a discount on {product}?",
    "What happens if we go over our {unit} on {product}?",
]


def _fill(template: str, rng: random.Random) -> str:
    values: dict[str, object] = {key: rng.choice(options) for key, options in FILLERS.items()}
    values |= {
        "product": rng.choice(PRODUCTS),
        "price": rng.randint(9, 299),
        "n": rng.choice([100, 500, 1000, 3000, 10000]),
        "cents": rng.randint(1, 15),
        "months": rng.choice([6, 12, 24, 36]),
        "days": rng.randint(2, 90),
        "start": rng.randint(6, 9),
        "end": rng.randint(5, 9),
        "minutes": rng.choice([30, 45, 60, 90]),
        "pct": rng.choice([10, 20, 30, 50]),
        "pct2": rng.choice([5, 10, 15, 20]),
    }
    return template.format(**values)


def _chunk(index: int, rng: random.Random) -> Chunk:
    topic = rng.choice(list(TOPICS))
    sentences = [_fill(TOPICS[topic], rng) for _ in range(rng.randint(2, 4))]
    heading = f"{rng.choice(PRODUCTS)} handbook > {topic.title()} > Section {index % 97}"
    return Chunk(" ".join(sentences), index, heading, 0)


def _percentiles(samples: list[float]) -> str:
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return (
        f"p50 {cuts[49] * 1e3:6.1f} ms   p95 {cuts[94] * 1e3:6.1f} ms   "
        f"p99 {cuts[98] * 1e3:6.1f} ms   max {max(samples) * 1e3:6.1f} ms"
    )


async def _ingest(
    kb: KnowledgeBase, total: int, batch: int, rng: random.Random, prefix: str = "doc"
) -> float:
    started = time.perf_counter()
    for document, start in enumerate(range(0, total, batch)):
        chunks = [_chunk(i, rng) for i in range(min(batch, total - start))]
        name = f"{prefix}{document}"
        await kb.add_document("bench", name, chunks, source=f"{name}.md")
    return time.perf_counter() - started


async def _search(kb: KnowledgeBase, questions: list[str]) -> tuple[list[float], list[float]]:
    whole, embedding = [], []
    for question in questions:
        started = time.perf_counter()
        await kb.search("bench", question, top_k=3, min_similarity=0.0)
        whole.append(time.perf_counter() - started)
        started = time.perf_counter()
        embed([question])
        embedding.append(time.perf_counter() - started)
    return whole, embedding


async def main(args: argparse.Namespace) -> None:
    rng = random.Random(7)
    with tempfile.TemporaryDirectory(prefix="kb-bench-") as directory:
        settings = Settings(_env_file=None, CHROMA_PATH=Path(directory), CHROMA_HOST="")  # type: ignore[call-arg]
        kb = KnowledgeBase(settings, write_batch_size=args.batch)
        started = time.perf_counter()
        await asyncio.to_thread(kb.warm_up)
        print(f"model load + warm-up: {time.perf_counter() - started:.1f} s")

        seconds = await _ingest(kb, args.chunks, args.batch, rng)
        count = await kb.count("bench")
        print(f"ingest: {count} chunks in {seconds:.1f} s = {count / seconds:.0f} chunks/s")

        questions = [_fill(rng.choice(QUESTIONS), rng) for _ in range(args.queries)]
        started = time.perf_counter()
        await kb.search("bench", questions[0])
        print(f"first search after ingest: {(time.perf_counter() - started) * 1e3:.1f} ms")
        whole, embedding = await _search(kb, questions)
        print(f"search ({len(questions)} queries, top_k 3): {_percentiles(whole)}")
        print(f"  query embedding alone:        {_percentiles(embedding)}")

        upload = asyncio.create_task(_ingest(kb, args.batch * 8, args.batch * 8, rng, "upload"))
        await asyncio.sleep(0.5)
        whole, _ = await _search(kb, questions[:100])
        print(f"search during an upload:          {_percentiles(whole)}")
        await upload
        kb.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--batch", type=int, default=256)
    asyncio.run(main(parser.parse_args()))
