"""Service settings, read from the environment and `.env` with pydantic-settings.

Role: one `Settings` class; no instance is built at import time (tests build their own
with a temporary database).

Every field here has a line in `.env.example`; `tests/test_config.py` checks they agree.

Of ours, imports only: nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PLACEHOLDER_SECRETS = {"", "changeme", "change-me", "secret", "dev-secret"}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    # --- service -----------------------------------------------------------------------
    ENVIRONMENT: Literal["development", "test", "production"] = "development"
    LOG_LEVEL: str = "INFO"
    DATA_DIR: Path = Path("./data")
    DATABASE_URL: str = "sqlite+aiosqlite:///./data/ai_sdr.db"
    DB_COMMIT_WINDOW_MS: int = Field(default=100, ge=0, le=2000)
    PUBLIC_BASE_URL: str = "http://localhost:8000"
    API_KEYS: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["dev-key"])
    MAX_REQUEST_BYTES: int = Field(default=1024 * 1024, gt=0)
    MAX_CONCURRENT_CALLS: int = Field(default=100, ge=0)
    OPERATOR_ENDPOINTS: Literal["open", "api_key"] = "open"

    # --- console ------------------------------------------------------------------------
    CONSOLE_SECRET: str = "dev-console-secret"
    CONSOLE_SESSION_HOURS: float = Field(default=12.0, gt=0, le=24 * 30)

    # --- Twilio --------------------------------------------------------------------------
    TWILIO_ACCOUNT_SID: str = ""
    TWILIO_AUTH_TOKEN: str = ""
    TWILIO_API_BASE_URL: str = "https://api.twilio.com"
    TWILIO_DEFAULT_FROM: str = ""
    STREAM_TOKEN_SECRET: str = ""
    STREAM_TOKEN_TTL_S: float = Field(default=60.0, gt=0)

    # --- Deepgram -----------------------------------------------------------------------
    DEEPGRAM_API_KEY: str = ""
    DEEPGRAM_BASE_URL: str = "https://api.deepgram.com"
    DEEPGRAM_STT_MODEL: str = "nova-3"
    DEEPGRAM_ENDPOINTING_MS: int = 300
    EARLY_FINALIZE_MS: int = 96
    EARLY_ANSWERS: bool = True
    DEEPGRAM_UTTERANCE_END_MS: int = 1000
    DEEPGRAM_TTS_VOICE: str = "aura-2-thalia-en"
    DEEPGRAM_TTS_TRANSPORT: Literal["websocket", "rest"] = "websocket"
    DEEPGRAM_TTS_SOCKETS: int = Field(default=64, ge=1)
    DEEPGRAM_TTS_SPARE_SOCKETS: int = Field(default=1, ge=0)

    # --- Ollama -------------------------------------------------------------------------
    OLLAMA_HOST: str = "http://127.0.0.1:11434"
    OLLAMA_MODEL: str = "llama3.2"
    OLLAMA_CONNECT_TIMEOUT_S: float = 2.0
    OLLAMA_FIRST_TOKEN_TIMEOUT_S: float = 4.0
    LLM_FALLBACK_LINE: str = "Sorry, I'm having trouble right now. Could you say that again?"

    # --- knowledge ----------------------------------------------------------------------
    CHROMA_PATH: Path = Path("./data/chroma")
    CHROMA_HOST: str = ""
    CHROMA_PORT: int = 8000
    EMBEDDING_MODEL_PATH: str = ""
    KNOWLEDGE_TOP_K: int = 3
    KNOWLEDGE_MIN_SIMILARITY: float = 0.25
    MAX_DOCUMENT_BYTES: int = 10 * 1024 * 1024
    MAX_DOCUMENT_PAGES: int = Field(default=500, ge=1)
    MAX_DOCUMENT_TEXT_CHARS: int = Field(default=2_000_000, ge=1000)
    DOCUMENT_PARSE_TIMEOUT_S: float = Field(default=20.0, gt=0)
    KNOWLEDGE_RETRIEVAL_BUDGET_MS: int = Field(default=300, ge=1)
    KNOWLEDGE_WRITE_BATCH: int = Field(default=256, ge=1)

    # --- webhooks and tools -------------------------------------------------------------
    WEBHOOK_SIGNING_SECRET: str = "dev-webhook-secret"
    DEFAULT_WEBHOOK_URL: str = ""
    WEBHOOK_RETRY_PERIOD_S: float = 24 * 3600
    WEBHOOK_TIMEOUT_S: float = 10.0
    ALLOW_PRIVATE_URLS: bool = False
    WEBHOOK_BACKOFF_BASE_S: float = Field(default=5.0, gt=0)
    ANALYSIS_WAIT_S: float = Field(default=5.0, ge=0)
    ANALYSIS_MAX_ATTEMPTS: int = Field(default=10, ge=1)
    ANALYSIS_RETRY_BASE_S: float = Field(default=30.0, gt=0)

    # --- outbound campaigns -------------------------------------------------------------
    CAMPAIGN_INBOUND_RESERVE: int = Field(default=10, ge=0)
    CAMPAIGN_TICK_MS: int = Field(default=200, ge=10, le=5000)
    CAMPAIGN_LEASE_S: float = Field(default=60.0, gt=0)
    DEFAULT_PHONE_REGION: str = Field(default="US", pattern=r"^[A-Z]{2}$")

    # --- voice pipeline -----------------------------------------------------------------
    VAD_THRESHOLD: float = 0.5
    DEFAULT_MIN_INTERRUPT_SPEECH_MS: int = 60

    @field_validator("API_KEYS", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @field_validator("PUBLIC_BASE_URL", "TWILIO_API_BASE_URL", "DEEPGRAM_BASE_URL", "OLLAMA_HOST")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @model_validator(mode="after")
    def _refuse_placeholder_secrets(self) -> Settings:
        if self.ENVIRONMENT != "production":
            return self
        if self.WEBHOOK_SIGNING_SECRET.lower() in PLACEHOLDER_SECRETS | {"dev-webhook-secret"}:
            raise ValueError("WEBHOOK_SIGNING_SECRET must be set to a real secret in production")
        if self.CONSOLE_SECRET.lower() in PLACEHOLDER_SECRETS | {"dev-console-secret"}:
            raise ValueError("CONSOLE_SECRET must be set to a real secret in production")
        if not self.API_KEYS or "dev-key" in self.API_KEYS:
            raise ValueError("API_KEYS must be set (and not 'dev-key') in production")
        if not self.TWILIO_AUTH_TOKEN:
            raise ValueError("TWILIO_AUTH_TOKEN is required in production")
        return self

    @property
    def media_stream_url(self) -> str:
        """The `wss://` URL Twilio opens for the Media Stream, derived from PUBLIC_BASE_URL."""
        base = self.PUBLIC_BASE_URL
        for http, ws in (("https://", "wss://"), ("http://", "ws://")):
            if base.startswith(http):
                return ws + base[len(http) :] + "/twilio/media"
        return base + "/twilio/media"

    def public_url(self, path: str) -> str:
        return self.PUBLIC_BASE_URL + path

    @property
    def deepgram_ws_base(self) -> str:
        base = self.DEEPGRAM_BASE_URL
        for http, ws in (("https://", "wss://"), ("http://", "ws://")):
            if base.startswith(http):
                return ws + base[len(http) :]
        return base
