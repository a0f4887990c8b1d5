"""Names that vulture (`.venv/bin/vulture`, configured in pyproject.toml) reports unused but
that something reads by name: a framework, a serializer, a command line, a test that
inspects a record. Never imported or collected; vulture reads it as a use of each name.
Excluded from ruff: these are bare names on purpose.
"""

# fmt: off

# Command-line entry points given as strings: `uvicorn --ws api.media_ws:MediaStreamProtocol`,
# `uvicorn bench.floor:asgi_app` / `:direct_app`; asyncio calls `connection_made` itself.
MediaStreamProtocol
HeadTimeoutProtocol  # uvicorn --http api.http_protocol:HeadTimeoutProtocol (run.sh, Dockerfile)
asgi_app
direct_app
connection_made

# SQLAlchemy hooks and mapped columns, read by the ORM, the migrations check
# (tests/test_db.py) and the API's `from_attributes` models.
impl
cache_ok
process_bind_param
process_result_value
type_annotation_map
updated_at
recording_sid
llm_request_ms
llm_first_token_ms
tts_request_ms
tts_first_audio_ms
size_bytes
chunk_count
chunk_index
finished_at  # ToolInvocation.finished_at: a column nothing sets yet
last_status_code
last_error
delivered_at

# pydantic response fields, serialized by name.
attempt_log
delay_seconds  # campaigns.schemas.RetryRule: stored in the retry policy, read by campaigns.policy
caller_sentiment
lead_score
lead_score_reasons
success
success_reason

# pydantic response fields of `GET /v1/analytics` (api/analytics.py `Figures`), serialized
# by name; set by `_Tally.finish()` and read by CRMs and the console's charts.
connect_rate
meetings_booked
average_lead_score
voice_to_voice_p50_ms
voice_to_voice_p95_ms
barge_ins_per_call
webhook_failures

# Attributes the console's Jinja2 templates read by name (console/views.py): the call
# timeline's axis ticks and each latency bar's total (call_detail.html), each chart's top
# value (analytics.html).
ticks
total_ms
max_label

# Library protocols: Chroma's EmbeddingFunction, onnxruntime's SessionOptions, uvicorn's
# Server, the context manager protocol.
supported_spaces
validate_config
validate_config_update
intra_op_num_threads
inter_op_num_threads
execution_mode
should_exit
exc_info

# Recorded state that tests and the benchmark may read: the emulators' per-connection and
# per-request records, VAD events.
opened_at
closed_at
http_status
frames_sent
detected_at

# A fixture requested for its side effect (the embedding model loaded once).
embedding_model

# Unused, in modules others are rewriting (issue 17): to be removed there.
DEEPGRAM_TTS_VOICE  # config.py: a setting nothing reads (agents carry their own voice)
DEFAULT_MIN_INTERRUPT_SPEECH_MS  # config.py: likewise (agents carry their own)
default_clock  # pipeline/providers.py
tts_first_audio_at  # pipeline/speech.py
frames_dropped  # voice_pipeline.py: counted, never read (the metric carries it)
