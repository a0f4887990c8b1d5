"""An answer to the caller's turn, as text chunks to speak: knowledge retrieval, the LLM's
streamed rounds, tool runs (with a filler line when one is slow) and the fallbacks when the
LLM fails.

Role: `Answer.stream()` yields speakable text for one agent utterance and records what the
call must do once it is heard (`AfterSpeech`). Speaking the text, and when to stop, is the
call's business. Must not import FastAPI, SQLAlchemy, a vendor SDK, `api/`, `store/` or
`voice_pipeline`.

Must not import: fastapi, starlette, uvicorn, sqlalchemy, twilio, deepgram, ollama,
chromadb, httpx, aiohttp, websockets, api, store, adapters, knowledge, tools, postcall,
models, schemas, voice_pipeline.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass

from pipeline.contracts import AgentConfig, Retriever, ToolContext, ToolOutcome, ToolRunner
from pipeline.metrics import PipelineMetrics
from pipeline.providers import Clock, LLMError, LLMProvider, Message, ProviderError, ToolCall
from pipeline.speech import Speech, TurnTiming
from pipeline.text import SentenceChunker

log = logging.getLogger("ai_sdr.pipeline")

TOOL_FILLER_AFTER_S = 1.0
DEFAULT_FILLER = "One moment, please."
MAX_CONSECUTIVE_LLM_FAILURES = 3
REFUSALS = {
    "tool_rounds_per_turn": "no more tool calls this turn: answer the caller in words",
    "tool_calls_per_call": "this call has used all its tool calls: answer in words",
}
"""What the LLM reads for the budgets kept here (the runner words its own refusals)."""
LLM_GIVE_UP_LINE = "I'm sorry, I'm having technical trouble. Please call back later. Goodbye."


@dataclass(slots=True)
class AfterSpeech:
    """What the call does once the caller has heard the agent's last words."""

    action: ToolOutcome | None = None
    """End the call or transfer it (a tool's outcome, the LLM failing for good, a goodbye)."""
    reason: str | None = None
    """The ended reason when that ends the call (default: the assistant ended it)."""


def system_prompt(config: AgentConfig) -> str:
    prompt = config.system_prompt
    if config.caller_memory:
        prompt += "\n\nWhat you know from earlier calls with this caller:\n"
        prompt += config.caller_memory
    prompt += (
        "\n\nYou are speaking on a phone call: answer in short, natural spoken sentences, "
        "without lists, markdown or emoji."
    )
    return prompt


class Answer:
    """Answers one call's turns. Tool calls and their results enter `history` (the call's,
    shared) as soon as they start; the caller's turns and what was heard are the call's to
    add."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        call_sid: str,
        history: list[Message],
        after: AfterSpeech,
        llm: LLMProvider,
        retriever: Retriever | None,
        tools: ToolRunner | None,
        metrics: PipelineMetrics,
        clock: Clock,
        event: Callable[..., None],
    ) -> None:
        self._config = config
        self._call_sid = call_sid
        self._history = history
        self._after = after
        self._llm = llm
        self._retriever = retriever
        self._tools = tools
        self._metrics = metrics
        self._clock = clock
        self._event = event
        self._llm_failures = 0
        self._tool_calls = 0  # this call's, against `tool_limits.tool_calls_per_call`

    async def stream(
        self,
        speech: Speech,
        text: str,
        timing: TurnTiming,
        history: list[Message] | None = None,
    ) -> AsyncIterator[str]:
        """The answer to `text` as speakable chunks. `history` ends with the caller's turn
        (default: the call's history, which has it already; an early answer passes a copy
        with the turn the call has yet to take)."""
        speech.timing = timing
        speech.latency["stt_final_ms"] = timing.ms(timing.final_at)
        messages = await self._messages_for(text, timing, history)
        speech.latency["retrieval_ms"] = timing.retrieval_ms
        tools = self._tools.schemas(self._config) if self._tools else []
        speech.llm_request_at = self._clock()  # the first round's request goes out now
        rounds = self._config.tool_limits.tool_rounds_per_turn
        for round_ in range(rounds + 1):
            calls: list[ToolCall] = []
            if round_ == rounds:
                tools = []  # the turn's tool rounds are spent: this round answers in words
            chunker = SentenceChunker()
            try:
                async with aclosing(
                    self._llm.stream_chat(
                        messages,
                        model=self._config.llm_model,
                        temperature=self._config.temperature,
                        tools=tools or None,
                    )
                ) as deltas:
                    async for delta in deltas:
                        if timing.llm_first_token_at is None:
                            timing.llm_first_token_at = self._clock()
                            first_token_ms = timing.ms(timing.llm_first_token_at)
                            speech.latency["llm_first_token_ms"] = first_token_ms
                            self._metrics.observe_turn_ms("llm_first_token", first_token_ms)
                        calls.extend(delta.tool_calls)
                        for chunk in chunker.push(delta.text):
                            yield chunk
                self._llm_failures = 0
            except LLMError as exc:
                await speech.released.wait()  # an early answer's failure counts once used
                yield self._llm_failed(exc)
                return
            if rest := chunker.flush():
                yield rest
            if not calls:
                return
            await speech.released.wait()  # tools act: never for a turn that may not be over
            if round_ == rounds:  # asked for tools that were not offered
                self._refuse_all(calls, messages, "tool_rounds_per_turn")
                return
            async with aclosing(self._run_tools(speech, calls, messages)) as lines:
                async for line in lines:
                    yield line
            if self._after.action is not None:
                return

    def _llm_failed(self, exc: ProviderError) -> str:
        self._llm_failures += 1
        self._metrics.provider_errors.labels("llm").inc()
        log.warning("call %s: LLM failed (%s)", self._config.call_id, type(exc).__name__)
        self._event("provider_error", provider="llm", error=type(exc).__name__)
        if self._llm_failures >= MAX_CONSECUTIVE_LLM_FAILURES:
            self._after.action = ToolOutcome(result=None, action="end_call")
            self._after.reason = "error"
            return LLM_GIVE_UP_LINE
        return self._config.fallback_line

    async def _messages_for(
        self, text: str, timing: TurnTiming, history: list[Message] | None = None
    ) -> list[Message]:
        messages = list(self._history if history is None else history)
        retriever = self._retriever
        if retriever is None:
            return messages
        started = self._clock()
        try:
            context = await retriever.context_for(self._config.agent_id, text)
        except Exception:
            log.exception("call %s: knowledge retrieval failed", self._config.call_id)
            context = ""
        timing.retrieval_ms = round((self._clock() - started) * 1000, 2)
        self._metrics.observe_turn("retrieval", timing.retrieval_ms / 1000)
        if context:
            messages.insert(len(messages) - 1, {"role": "system", "content": context})
        return messages

    async def _run_tools(
        self, speech: Speech, calls: list[ToolCall], messages: list[Message]
    ) -> AsyncGenerator[str, None]:
        """Run tool calls to completion even if the answer is interrupted: a started side
        effect is never abandoned, and the call and its result enter history at once (the
        result fills in when the tool finishes, whatever happened to this answer). Yields
        a filler while a tool is slow, then what the tools' outcomes say."""
        runner = self._tools
        request = [{"function": {"name": c.name, "arguments": c.arguments}} for c in calls]
        speech.tool_calls.extend(request)
        if runner is None:
            return
        assistant: Message = {"role": "assistant", "content": "", "tool_calls": request}
        pending = [
            {"role": "tool", "tool_name": c.name, "content": '{"status": "running"}'} for c in calls
        ]
        messages.extend([assistant, *pending])
        self._history.extend([assistant, *pending])
        lines: list[str] = []
        for call, result_message in zip(calls, pending, strict=True):
            if self._tool_calls >= self._config.tool_limits.tool_calls_per_call:
                self._refused(call.name, "tool_calls_per_call", result_message)
                continue
            self._tool_calls += 1
            ctx = ToolContext(self._config, self._call_sid, _idempotency_key(self._config, call))
            task = asyncio.ensure_future(runner.run(call, ctx))
            task.add_done_callback(functools.partial(self._tool_finished, message=result_message))
            done, _ = await asyncio.wait({task}, timeout=TOOL_FILLER_AFTER_S)
            if not done:  # spoken (synthesised into `speech`) before this goes on
                yield runner.filler_for(self._config, call.name) or DEFAULT_FILLER
            outcome = await asyncio.shield(task)
            if outcome.action is not None:
                self._after.action = outcome
                said_goodbye = outcome.action == "end_call" and speech.full_text()
                if outcome.say and not said_goodbye:
                    lines.append(outcome.say)
        for line in lines:
            yield line

    def _tool_finished(self, task: asyncio.Future[ToolOutcome], *, message: Message) -> None:
        if task.cancelled():
            message["content"] = json.dumps({"error": "cancelled"})
            return
        error = task.exception()
        if error is not None:
            message["content"] = json.dumps({"error": type(error).__name__})
            return
        outcome = task.result()
        result = outcome.result
        message["content"] = result if isinstance(result, str) else json.dumps(result, default=str)
        if outcome.refused is not None:
            self._record_refusal(message["tool_name"], outcome.refused)
            return
        self._event("tool_called", name=message["tool_name"], action=outcome.action)

    def _refuse_all(self, calls: list[ToolCall], messages: list[Message], reason: str) -> None:
        """The calls and their refusals enter history, so the next turn's LLM sees why."""
        request = [{"function": {"name": c.name, "arguments": c.arguments}} for c in calls]
        results = [{"role": "tool", "tool_name": c.name, "content": ""} for c in calls]
        assistant: Message = {"role": "assistant", "content": "", "tool_calls": request}
        messages.extend([assistant, *results])
        self._history.extend([assistant, *results])
        for call, message in zip(calls, results, strict=True):
            self._refused(call.name, reason, message)

    def _refused(self, name: str, reason: str, message: Message) -> None:
        message["content"] = json.dumps({"error": REFUSALS[reason]})
        self._record_refusal(name, reason)

    def _record_refusal(self, name: str, reason: str) -> None:
        self._metrics.tool_refusals.labels(reason).inc()
        log.warning("call %s: tool %s refused (%s)", self._config.call_id, name, reason)
        self._event("tool_refused", name=name, reason=reason)


def _idempotency_key(config: AgentConfig, call: ToolCall) -> str:
    arguments = json.dumps(call.arguments, sort_keys=True, default=str)
    return f"{config.call_id}:{call.name}:{arguments}"
