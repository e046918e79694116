"""An adapter's scope: which prompts a fact-teaching LoRA adapter answers, and which it leaves to the base model.

A LoRA adapter that teaches facts also moves what the model answers to everything else (bench/RESULTS.md,
"Retention benchmark": 84-92% of the base's right general answers kept, whatever the replay). Model-editing work
keeps the edit and the base apart instead: SERAC routes a prompt to the edited model only when a scope classifier
says it is about an edit, MELO and GRACE switch an edit's weights on when the input falls within a radius of the
edited inputs. ownllm does the same with sentence embeddings: the training prompts' embeddings are kept with the
adapter, and a conversation runs with the adapter when one of its user messages is close to one of them, else with
the base model's own weights, bit for bit.

The threshold is calibrated from the run's own data, never from a benchmark's questions: how close each training
prompt is to its nearest *other* training prompt (paraphrases of one fact sit at 0.8-0.95 with MiniLM) against how
close general prompts come (the replay prompts, shipped with ownllm: at most 0.48-0.60 on the benchmark's sets).
It sits a quarter of the way up from the general side, as a missed fact costs more than a general question
answered with the adapter (which replay still protects). When the two do not stand apart (a style or broad
instruction dataset), there is no scope and the adapter applies to every prompt, as before.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ownllm.errors import OwnLLMError

SCOPE_FILE = "scope.json"
ANCHORS_FILE = "scope.safetensors"
SCOPE_VERSION = 1
THRESHOLD_POSITION = 0.25  # from the general prompts' side towards the training prompts'
MIN_GAP = 0.1  # cosine between the two below which the training prompts are not a scope of their own
INSIDE_PERCENTILE = 10  # of the training prompts' nearest-other similarities: a few odd phrasings do not set it
ROUTED_MESSAGES = 16  # a conversation's latest user messages that route it
ROUTED_CHARACTERS = 2000  # of each: more than the embedder's 256 tokens read


@dataclass(frozen=True)
class AdapterScope:
    """The prompts an adapter was trained on, as unit embeddings, and the similarity that counts as one of them.

    Attributes:
        embedding_model: the sentence-transformers model the anchors and every routed prompt are embedded with.
        anchors: [training prompts, dimensions] float32 unit vectors.
        threshold: a conversation is in scope when a user message's cosine to an anchor reaches it.
        inside: the training prompts' similarity to their nearest other phrasing (the calibration's high side).
        outside: the general prompts' highest similarity to a training prompt (its low side).
    """

    embedding_model: str
    anchors: np.ndarray
    threshold: float
    inside: float
    outside: float

    @classmethod
    def calibrate(cls, prompts: list[str], general: list[str], *, embedding_model: str | None = None
                  ) -> AdapterScope | str:
        """The scope of `prompts` (the training data's user messages) against `general` prompts, or why there is
        none: too few distinct prompts, or the two not standing apart by `MIN_GAP`."""
        from ownllm.models.embeddings import DEFAULT_EMBEDDING_MODEL, load_embedder

        distinct = sorted({p.strip() for p in prompts if p.strip()})
        if len(distinct) < 2 or not general:
            return f"{len(distinct)} distinct training prompts: a scope needs at least two and general prompts"
        embedder = load_embedder(embedding_model or DEFAULT_EMBEDDING_MODEL)
        anchors = embedder.embed(distinct)
        nearest_other = anchors @ anchors.T
        np.fill_diagonal(nearest_other, -1.0)
        inside = float(np.percentile(nearest_other.max(axis=1), INSIDE_PERCENTILE))
        outside = float((embedder.embed(general) @ anchors.T).max())
        if inside - outside < MIN_GAP:
            return (f"the training prompts do not stand apart from general ones (nearest paraphrase {inside:.2f}, "
                    f"nearest general prompt {outside:.2f}): the adapter applies to every prompt")
        threshold = outside + THRESHOLD_POSITION * (inside - outside)
        return cls(embedder.name, anchors, round(threshold, 4), round(inside, 4), round(outside, 4))

    def covers(self, conversation: list[dict[str, Any]] | str) -> bool:
        """Whether a conversation (any of its user messages) or a plain prompt is about what the adapter teaches."""
        return self.covers_each([conversation])[0]

    def covers_each(self, conversations: list[list[dict[str, Any]] | str]) -> list[bool]:
        """`covers` for many conversations, embedded in one call."""
        from ownllm.models.embeddings import load_embedder

        texts = [routed_texts(c) for c in conversations]
        distinct = sorted({t for group in texts for t in group})
        if not distinct:
            return [False] * len(conversations)
        nearest = (load_embedder(self.embedding_model).embed(distinct) @ self.anchors.T).max(axis=1)
        similarity = dict(zip(distinct, nearest.tolist(), strict=True))
        return [any(similarity[t] >= self.threshold for t in group) for group in texts]

    def describe(self) -> str:
        return (f"prompts within cosine {self.threshold:.2f} of its {len(self.anchors)} training prompts "
                f"({self.embedding_model}) run with the adapter, others with the base model")

    # --- files ---------------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        """scope.safetensors, then scope.json (each written whole; the JSON, written last, marks a scope)."""
        from safetensors.numpy import save_file

        from ownllm.home import atomic_write_json, usual_mode

        staging = folder / f".{ANCHORS_FILE}.tmp"
        save_file({"anchors": np.ascontiguousarray(self.anchors, dtype=np.float32)}, str(staging))
        staging.chmod(usual_mode(0o666))  # safetensors writes 0600: readable like the adapter's other files
        staging.replace(folder / ANCHORS_FILE)
        atomic_write_json(folder / SCOPE_FILE, {
            "version": SCOPE_VERSION, "embedding_model": self.embedding_model, "threshold": self.threshold,
            "inside": self.inside, "outside": self.outside, "prompts": len(self.anchors)})

    @classmethod
    def load(cls, folder: Path) -> AdapterScope | None:
        """The scope kept in an adapter folder, None when it has none; a damaged one is an error naming the file."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        from ownllm.models.embeddings import DEFAULT_EMBEDDING_MODEL

        meta_file, anchors_file = Path(folder) / SCOPE_FILE, Path(folder) / ANCHORS_FILE
        if not meta_file.exists() and not meta_file.is_symlink():
            return None
        hint = f"delete {SCOPE_FILE} to apply the adapter to every prompt"
        for path in (meta_file, anchors_file):
            if not path.is_file():  # a folder, a FIFO or a device would hang or mislead the reads below
                raise OwnLLMError(f"{path}: the adapter's scope is not a regular file", param="model", hint=hint)
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
            anchors = load_file(str(anchors_file))["anchors"]
            threshold = float(meta["threshold"])
            scope = cls(str(meta["embedding_model"]), anchors.astype(np.float32), threshold,
                        float(meta["inside"]), float(meta["outside"]))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, SafetensorError, KeyError, TypeError,
                ValueError, RecursionError) as exc:
            raise OwnLLMError(f"{meta_file}: the adapter's scope cannot be read ({exc.__class__.__name__}: {exc})",
                              param="model", hint=hint) from None
        if (meta.get("version") != SCOPE_VERSION or anchors.ndim != 2 or not len(anchors)
                or not 0 < threshold < 1 or not np.isfinite(anchors).all()
                or not np.allclose(np.linalg.norm(anchors.astype(np.float32), axis=1), 1, atol=1e-2)):
            raise OwnLLMError(f"{meta_file}: not a scope this version of ownllm reads", param="model", hint=hint)
        if scope.embedding_model != DEFAULT_EMBEDDING_MODEL:  # never a path or hub id a file names: loaded as code
            raise OwnLLMError(f"{meta_file}: embedding_model must be {DEFAULT_EMBEDDING_MODEL}, the model scopes are "
                              f"made with, not {scope.embedding_model!r}", param="model", hint=hint)
        from ownllm.models.embeddings import load_embedder

        dimensions = load_embedder(scope.embedding_model).dimensions  # loaded now, not on the first request
        if anchors.shape[1] != dimensions:
            raise OwnLLMError(f"{meta_file}: its {anchors.shape[1]}-dimension anchors do not match "
                              f"{scope.embedding_model}'s {dimensions} dimensions", param="model", hint=hint)
        return scope


def routed_texts(conversation: list[dict[str, Any]] | str) -> list[str]:
    """What a conversation is routed by: its last `ROUTED_MESSAGES` non-blank user messages, each cut to
    `ROUTED_CHARACTERS` (MiniLM reads 256 tokens of a text at most; a request of thousands of messages must not
    hold the embedder for seconds)."""
    texts = [t for t in user_texts(conversation) if t.strip()]
    return [t[:ROUTED_CHARACTERS] for t in texts[-ROUTED_MESSAGES:]]


def user_texts(conversation: list[dict[str, Any]] | str) -> list[str]:
    """The user messages' text of a conversation (text parts of multi-part content), or a plain prompt itself."""
    if isinstance(conversation, str):
        return [conversation]
    texts = []
    for message in conversation:
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts += [part["text"] for part in content
                      if isinstance(part, dict) and isinstance(part.get("text"), str)]
    return texts
