"""What the console's pages draw, computed from stored rows: the call timeline (turns on a
time axis, heard and unheard parts, barge-ins, tool calls), per-turn latency bars by stage,
and the analytics charts. Plain numbers in SVG user units; the templates only place them,
so the pages need no charting library and no inline style (the CSP forbids it).

Must not import: twilio, deepgram, ollama, chromadb, fastapi, starlette, sqlalchemy,
adapters, pipeline, voice_pipeline, runtime.
Of ours, imports only: nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TIMELINE_WIDTH = 1000.0
LATENCY_STAGES = (
    ("stt_final_ms", "STT final"),
    ("retrieval_ms", "retrieval"),
    ("llm_first_token_ms", "LLM first token"),
    ("tts_first_audio_ms", "TTS first audio"),
    ("first_media_ms", "first media"),
)
"""Each is measured from the caller's end of speech, so they are points on one axis."""


@dataclass(slots=True)
class Span:
    x: float
    width: float
    role: str
    text: str
    seq: int
    interrupted: bool = False
    unheard: str = ""


@dataclass(slots=True)
class Marker:
    x: float
    kind: str
    label: str


@dataclass(slots=True)
class Timeline:
    duration_s: float
    spans: list[Span] = field(default_factory=list)
    markers: list[Marker] = field(default_factory=list)
    ticks: list[tuple[float, str]] = field(default_factory=list)


def _x(seconds: float, duration: float) -> float:
    return round(max(0.0, min(seconds, duration)) / duration * TIMELINE_WIDTH, 2)


def timeline(turns: list[Any], events: list[Any]) -> Timeline:
    """Turns on a time axis; an interrupted answer carries its unheard text (from the
    `interrupted` event that followed it); barge-ins, backchannels and tool calls as
    markers."""
    ends = [t.end_s for t in turns] + [e.call_time_s or 0.0 for e in events]
    duration = max([*ends, 1.0])
    unheard = _unheard_by_turn(turns, events)
    result = Timeline(duration_s=round(duration, 2))
    for turn in turns:
        x = _x(turn.start_s, duration)
        width = max(_x(turn.end_s, duration) - x, 2.0)
        result.spans.append(
            Span(
                x=x,
                width=width,
                role=turn.role,
                text=turn.text,
                seq=turn.seq,
                interrupted=bool(turn.interrupted),
                unheard=unheard.get(turn.seq, ""),
            )
        )
    labels = {
        "barge_in": "barge-in",
        "barge_in_resumed": "resumed (not a barge-in)",
        "backchannel": "backchannel",
        "tool_called": "tool call",
        "dtmf": "keypad",
        "silence_reprompt": "silence reprompt",
        "transfer": "transfer",
        "provider_error": "provider error",
    }
    for event in events:
        if event.type in labels and event.call_time_s is not None:
            label = labels[event.type]
            if event.type == "tool_called":
                label = f"tool call: {event.data.get('name', '?')}"
            result.markers.append(Marker(_x(event.call_time_s, duration), event.type, label))
    step = _tick_step(duration)
    result.ticks = [
        (_x(s * step, duration), f"{s * step:g}s") for s in range(int(duration // step) + 1)
    ]
    return result


def _tick_step(duration: float) -> float:
    for step in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600):
        if duration / step <= 10:
            return float(step)
    return 1200.0


def _unheard_by_turn(turns: list[Any], events: list[Any]) -> dict[int, str]:
    """The unheard text of each interrupted answer: the `interrupted` event recorded right
    after it (the k-th interrupted answer pairs with the k-th event)."""
    interrupted = [t.seq for t in turns if t.role == "assistant" and t.interrupted]
    texts = [str(e.data.get("unheard", "")) for e in events if e.type == "interrupted"]
    return dict(zip(interrupted, texts, strict=False))


@dataclass(slots=True)
class LatencyBar:
    seq: int
    total_ms: float
    segments: list[tuple[str, str, float, float, float]]
    """(stage key, label, x, width, at ms) in a 0..TIMELINE_WIDTH scale shared by all bars."""


def latency_bars(turns: list[Any]) -> tuple[list[LatencyBar], float]:
    """One bar per answer that measured its stages, segment by segment in time order, all on
    one scale (the slowest first media); returns the bars and that scale in ms."""
    measured = []
    for turn in turns:
        if turn.role != "assistant":
            continue
        points = [(key, label, getattr(turn, key)) for key, label in LATENCY_STAGES]
        points = [(k, label, v) for k, label, v in points if v is not None and v >= 0]
        if points:
            measured.append((turn.seq, sorted(points, key=lambda p: p[2])))
    scale = max([p[-1][2] for _, p in measured] + [1.0])
    bars = []
    for seq, points in measured:
        segments, previous = [], 0.0
        for key, label, at in points:
            x = previous / scale * TIMELINE_WIDTH
            width = max((at - previous) / scale * TIMELINE_WIDTH, 1.0)
            segments.append((key.removesuffix("_ms"), label, round(x, 2), round(width, 2), at))
            previous = at
        bars.append(LatencyBar(seq=seq, total_ms=points[-1][2], segments=segments))
    return bars, scale


@dataclass(slots=True)
class Chart:
    """A bar chart in a 1000 x 200 box: bars (x, width, y, height, label, value)."""

    title: str
    unit: str
    bars: list[tuple[float, float, float, float, str, str]]
    max_label: str


def bar_chart(title: str, unit: str, points: list[tuple[str, float | None]]) -> Chart:
    values = [v for _, v in points if v is not None]
    top = max([*values, 0.0]) or 1.0
    slot = TIMELINE_WIDTH / max(len(points), 1)
    bars = []
    for index, (label, value) in enumerate(points):
        height = (value or 0.0) / top * 180
        shown = "–" if value is None else f"{value:g}"
        bars.append(
            (
                round(index * slot + slot * 0.1, 2),
                round(slot * 0.8, 2),
                round(190 - height, 2),
                round(height, 2),
                label,
                shown,
            )
        )
    return Chart(title=title, unit=unit, bars=bars, max_label=f"{top:g}")
