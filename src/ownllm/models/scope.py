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

SERAC's other half is recall: its edited model answers with the edit it retrieved in its context. A scope may keep
the training examples themselves (`recall`), and a conversation whose latest user message is within the scope
then gets the `RECALLED` training examples nearest to that message as turns just before it:
a paraphrase the adapter alone answers with a neighbouring fact finds its own fact written out just before it
(bench/RESULTS.md, "Recall"). Plain-text prompts (completions) are the caller's own text and get none.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
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
RECALLED = 3  # training examples put before an in-scope question (bench/RESULTS.md, "Recall": 1 left misses)
SIMILARITY_CACHE = 256  # texts whose similarities are kept: routing and recall of one request embed each once


@dataclass(frozen=True)
class AdapterScope:
    """The prompts an adapter was trained on, as unit embeddings, and the similarity that counts as one of them.

    Attributes:
        embedding_model: the sentence-transformers model the anchors and every routed prompt are embedded with.
        anchors: [training prompts, dimensions] float32 unit vectors.
        threshold: a conversation is in scope when a user message's cosine to an anchor reaches it.
        inside: the training prompts' similarity to their nearest other phrasing (the calibration's high side).
        outside: the general prompts' highest similarity to a training prompt (its low side).
        recall: per anchor, its training prompt and the answer the data gives it, put before in-scope questions
            (`recalled`); empty when the scope keeps no examples.
    """

    embedding_model: str
    anchors: np.ndarray
    threshold: float
    inside: float
    outside: float
    recall: tuple[tuple[str, str], ...] = ()
    _similarities: OrderedDict[str, np.ndarray] = field(default_factory=OrderedDict, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @classmethod
    def calibrate(cls, prompts: list[str], general: list[str], *, answers: dict[str, str] | None = None,
                  embedding_model: str | None = None) -> AdapterScope | str:
        """The scope of `prompts` (the training data's user messages) against `general` prompts, or why there is
        none: too few distinct prompts, or the two not standing apart by `MIN_GAP`. With `answers` (a training
        prompt's answer in the data, by the prompt stripped), the scope keeps them to recall."""
        from ownllm.models.embeddings import DEFAULT_EMBEDDING_MODEL, canonical_name, embed_remembered

        distinct = sorted({p.strip() for p in prompts if p.strip()})
        if len(distinct) < 2 or not general:
            return f"{len(distinct)} distinct training prompts: a scope needs at least two and general prompts"
        model = canonical_name(embedding_model or DEFAULT_EMBEDDING_MODEL)
        anchors = embed_remembered(model, distinct)
        general_vectors = embed_remembered(model, general, width=anchors.shape[1])
        if general_vectors.shape[1] != anchors.shape[1]:  # the kept anchors were not this model's: embed them
            anchors = embed_remembered(model, distinct, width=general_vectors.shape[1])
        nearest_other = anchors @ anchors.T
        np.fill_diagonal(nearest_other, -1.0)
        inside = float(np.percentile(nearest_other.max(axis=1), INSIDE_PERCENTILE))
        outside = float((general_vectors @ anchors.T).max())
        if inside - outside < MIN_GAP:
            return (f"the training prompts do not stand apart from general ones (nearest paraphrase {inside:.2f}, "
                    f"nearest general prompt {outside:.2f}): the adapter applies to every prompt")
        threshold = outside + THRESHOLD_POSITION * (inside - outside)
        recall = tuple((prompt, answers.get(prompt, "")) for prompt in distinct) if answers else ()
        return cls(model, anchors, round(threshold, 4), round(inside, 4), round(outside, 4), recall)

    def without_recall(self) -> AdapterScope:
        """The same scope keeping no training examples."""
        return replace(self, recall=())

    def covers(self, conversation: list[dict[str, Any]] | str) -> bool:
        """Whether a conversation (any of its user messages) or a plain prompt is about what the adapter teaches."""
        return self.covers_each([conversation])[0]

    def covers_each(self, conversations: list[list[dict[str, Any]] | str]) -> list[bool]:
        """`covers` for many conversations, embedded in one call."""
        texts = [routed_texts(c) for c in conversations]
        similarity = self.similarities([t for group in texts for t in group])
        return [any(similarity[t].max() >= self.threshold for t in group) for group in texts]

    def recalled(self, conversation: list[dict[str, Any]] | str) -> list[dict[str, str]]:
        """The training examples to put before a conversation's latest user message, as user and assistant turns
        (the nearest last): the `RECALLED` nearest to that message when it is within the scope; none for a plain
        prompt, a latest user message outside the scope or blank, or a scope that keeps no examples."""
        if not self.recall or isinstance(conversation, str):
            return []
        latest = latest_user_message(conversation)
        text = message_text(conversation[latest])[:ROUTED_CHARACTERS] if latest is not None else ""
        if not text.strip():
            return []
        similarity = self.similarities([text])[text]
        if similarity.max() < self.threshold:
            return []
        answered = [i for i in np.argsort(-similarity, kind="stable").tolist() if self.recall[i][1]][:RECALLED]
        return [turn for i in reversed(answered)
                for turn in ({"role": "user", "content": self.recall[i][0]},
                             {"role": "assistant", "content": self.recall[i][1]})]

    def similarities(self, texts: list[str]) -> dict[str, np.ndarray]:
        """Each text's cosine to every anchor, embedding only texts not seen lately (a request's routing and
        its recall ask about the same messages)."""
        from ownllm.models.embeddings import load_embedder

        with self._lock:
            known = {t: self._similarities[t] for t in texts if t in self._similarities}
            for text in known:
                self._similarities.move_to_end(text)  # least recently used goes first
        missing = sorted(set(texts) - set(known))
        if missing:
            rows = load_embedder(self.embedding_model).embed(missing) @ self.anchors.T
            with self._lock:
                for text, row in zip(missing, rows, strict=True):
                    known[text] = self._similarities[text] = row
                    self._similarities.move_to_end(text)
                while len(self._similarities) > SIMILARITY_CACHE:
                    self._similarities.popitem(last=False)
        return known

    def describe(self) -> str:
        kept = f"; the {RECALLED} nearest of its training examples go before an in-scope question" \
            if self.recall else ""
        return (f"prompts within cosine {self.threshold:.2f} of its {len(self.anchors)} training prompts "
                f"({self.embedding_model}) run with the adapter, others with the base model{kept}")

    # --- files ---------------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        """scope.safetensors, then scope.json (each written whole; the JSON, written last, marks a scope)."""
        from safetensors.numpy import save_file

        from ownllm.home import atomic_write_json, usual_mode

        staging = folder / f".{ANCHORS_FILE}.tmp"
        save_file({"anchors": np.ascontiguousarray(self.anchors, dtype=np.float32)}, str(staging))
        staging.chmod(usual_mode(0o666))  # safetensors writes 0600: readable like the adapter's other files
        staging.replace(folder / ANCHORS_FILE)
        meta: dict[str, Any] = {
            "version": SCOPE_VERSION, "embedding_model": self.embedding_model, "threshold": self.threshold,
            "inside": self.inside, "outside": self.outside, "prompts": len(self.anchors)}
        if self.recall:  # the training examples, in the anchors' order
            meta["recall"] = [list(example) for example in self.recall]
        atomic_write_json(folder / SCOPE_FILE, meta)

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
            recall = meta.get("recall", [])
            if not isinstance(recall, list) or any(
                    not isinstance(e, list) or len(e) != 2 or not all(isinstance(t, str) for t in e) for e in recall):
                raise ValueError("recall must be a list of [prompt, answer] pairs")
            scope = cls(str(meta["embedding_model"]), anchors.astype(np.float32), threshold,
                        float(meta["inside"]), float(meta["outside"]), tuple((p, a) for p, a in recall))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, SafetensorError, KeyError, TypeError,
                ValueError, RecursionError) as exc:
            raise OwnLLMError(f"{meta_file}: the adapter's scope cannot be read ({exc.__class__.__name__}: {exc})",
                              param="model", hint=hint) from None
        if (meta.get("version") != SCOPE_VERSION or anchors.ndim != 2 or not len(anchors)
                or not 0 < threshold < 1 or not np.isfinite(anchors).all()
                or not np.allclose(np.linalg.norm(anchors.astype(np.float32), axis=1), 1, atol=1e-2)
                or (scope.recall and len(scope.recall) != len(anchors))):
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


def with_recalled(messages: list[dict[str, Any]], recalled: list[dict[str, str]]) -> list[dict[str, Any]]:
    """A conversation with recalled turns (`AdapterScope.recalled`) just before its latest user message: the
    turns before that are the previous request's prompt, so a server's prefix cache still holds them."""
    latest = latest_user_message(messages)
    if not recalled or latest is None:
        return messages
    return [*messages[:latest], *recalled, *messages[latest:]]


def latest_user_message(messages: list[dict[str, Any]]) -> int | None:
    """The index of a conversation's latest user message (what recall reads, and where it goes), if any."""
    return next((i for i in range(len(messages) - 1, -1, -1) if messages[i].get("role") == "user"), None)


def message_text(message: dict[str, Any]) -> str:
    """A message's text: its content, or its text parts joined (as the server reads multi-part content)."""
    return "".join(text_parts(message))


def text_parts(message: dict[str, Any]) -> list[str]:
    """A message's content as a list of texts: itself, or the text parts of multi-part content."""
    content = message.get("content")
    if isinstance(content, list):
        return [part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)]
    return [content] if isinstance(content, str) else []


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
    return [text for message in conversation if message.get("role") == "user" for text in text_parts(message)]
