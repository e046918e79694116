"""Vector + text stores behind one interface: an embedded SQLite file (sqlite-vec) by default,
Qdrant (qdrant-client; `qdrant://host:port/collection`, or `qdrant+local:FOLDER` in-process) to scale out.

A file's chunks are replaced in one transaction, so an interrupted index run leaves each file either as
it was or fully updated; the next run picks up where it stopped (unchanged files are skipped by hash).
"""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ownllm.data.files import check_output_file
from ownllm.errors import OwnLLMError
from ownllm.rag.chunking import Chunk


class Store(Protocol):
    location: str

    def exists(self) -> bool: ...
    def meta(self) -> dict[str, Any] | None: ...
    def create(self, meta: dict[str, Any]) -> None: ...
    def files(self) -> dict[str, str]: ...
    def replace_file(self, source: str, sha256: str, chunks: list[Chunk], vectors: np.ndarray) -> None: ...
    def delete_file(self, source: str) -> None: ...
    def dense(self, vector: np.ndarray, k: int) -> list[tuple[Chunk, float]]: ...
    def all_chunks(self) -> list[Chunk]: ...
    def close(self) -> None: ...


def open_store(location: str | Path) -> Store:
    text = str(location)
    if text.startswith("qdrant://"):
        rest = text.removeprefix("qdrant://")
        address, _, collection = rest.partition("/")
        host, _, port = address.partition(":")
        return QdrantStore(text, collection or "ownllm", host=host or "localhost", port=int(port or 6333))
    if text.startswith("qdrant+local:"):
        return QdrantStore(text, "ownllm", path=text.removeprefix("qdrant+local:"))
    return SqliteStore(Path(text))


def _locked(method: Any) -> Any:
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    wrapper.__name__, wrapper.__doc__ = method.__name__, method.__doc__
    return wrapper


def _chunk_from_row(row: Any) -> Chunk:
    source, position, text, tokens, page, heading = row
    return Chunk(source, position, text, tokens, page, heading)


class SqliteStore:
    """One SQLite file: chunks and files in tables, vectors in a sqlite-vec `vec0` table (cosine)."""

    def __init__(self, path: Path) -> None:
        if path.is_dir():
            raise OwnLLMError(f"{path} is a folder, not an index file", param="store",
                              hint=f"an index is one SQLite file: name one, e.g. {path / 'index.db'}")
        self.path = path
        self.location = str(path)
        self._db: Any = None
        self._lock = threading.RLock()

    def exists(self) -> bool:
        return self.path.is_file()

    def _connect(self) -> Any:
        if self._db is None:
            import pysqlite3 as sqlite3  # the stock sqlite3 here cannot load extensions
            import sqlite_vec

            # one connection, shared across threads (the server searches from a worker thread) under a lock
            try:
                self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            except sqlite3.Error as exc:  # e.g. a folder or unreadable file where the index should be
                raise OwnLLMError(f"cannot open the index {self.path}: {exc}", param="store") from None
            self._db.enable_load_extension(True)
            sqlite_vec.load(self._db)
            self._db.enable_load_extension(False)
            self._db.execute("PRAGMA journal_mode=WAL")
        return self._db

    @_locked
    def meta(self) -> dict[str, Any] | None:
        if not self.exists():
            return None
        try:
            row = self._connect().execute("SELECT value FROM meta WHERE key = 'index'").fetchone()
        except Exception as exc:  # a file that is not an index at all
            raise OwnLLMError(f"{self.path} is not an ownllm index ({exc.__class__.__name__})", param="store") from None
        return json.loads(row[0]) if row else None

    @_locked
    def create(self, meta: dict[str, Any]) -> None:
        check_output_file(self.path, param="store")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = self._connect()
        db.execute("BEGIN")
        db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute("CREATE TABLE IF NOT EXISTS files (source TEXT PRIMARY KEY, sha256 TEXT NOT NULL)")
        db.execute("CREATE TABLE IF NOT EXISTS chunks (id INTEGER PRIMARY KEY, source TEXT NOT NULL, "
                   "position INTEGER NOT NULL, text TEXT NOT NULL, tokens INTEGER NOT NULL, page INTEGER, "
                   "heading TEXT)")
        db.execute("CREATE INDEX IF NOT EXISTS chunks_source ON chunks (source)")
        db.execute(f"CREATE VIRTUAL TABLE IF NOT EXISTS vectors USING vec0("
                   f"embedding float[{int(meta['dimensions'])}] distance_metric=cosine)")
        db.execute("INSERT OR REPLACE INTO meta VALUES ('index', ?)", (json.dumps(meta),))
        db.execute("COMMIT")

    @_locked
    def files(self) -> dict[str, str]:
        return dict(self._connect().execute("SELECT source, sha256 FROM files").fetchall())

    @_locked
    def replace_file(self, source: str, sha256: str, chunks: list[Chunk], vectors: np.ndarray) -> None:
        db = self._connect()
        db.execute("BEGIN")
        try:
            self._delete(db, source)
            for chunk, vector in zip(chunks, vectors, strict=True):
                cursor = db.execute("INSERT INTO chunks (source, position, text, tokens, page, heading) "
                                    "VALUES (?, ?, ?, ?, ?, ?)",
                                    (chunk.source, chunk.position, chunk.text, chunk.tokens, chunk.page,
                                     chunk.heading))
                db.execute("INSERT INTO vectors (rowid, embedding) VALUES (?, ?)",
                           (cursor.lastrowid, np.asarray(vector, dtype=np.float32).tobytes()))
            db.execute("INSERT OR REPLACE INTO files VALUES (?, ?)", (source, sha256))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    @_locked
    def delete_file(self, source: str) -> None:
        db = self._connect()
        db.execute("BEGIN")
        self._delete(db, source)
        db.execute("DELETE FROM files WHERE source = ?", (source,))
        db.execute("COMMIT")

    @staticmethod
    def _delete(db: Any, source: str) -> None:
        db.execute("DELETE FROM vectors WHERE rowid IN (SELECT id FROM chunks WHERE source = ?)", (source,))
        db.execute("DELETE FROM chunks WHERE source = ?", (source,))

    @_locked
    def dense(self, vector: np.ndarray, k: int) -> list[tuple[Chunk, float]]:
        rows = self._connect().execute(
            "SELECT c.source, c.position, c.text, c.tokens, c.page, c.heading, v.distance "
            "FROM (SELECT rowid, distance FROM vectors WHERE embedding MATCH ? AND k = ?) v "
            "JOIN chunks c ON c.id = v.rowid ORDER BY v.distance",
            (np.asarray(vector, dtype=np.float32).tobytes(), k)).fetchall()
        return [(_chunk_from_row(row[:6]), 1.0 - float(row[6])) for row in rows]

    @_locked
    def all_chunks(self) -> list[Chunk]:
        rows = self._connect().execute(
            "SELECT source, position, text, tokens, page, heading FROM chunks ORDER BY source, position").fetchall()
        return [_chunk_from_row(row) for row in rows]

    @_locked
    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


class QdrantStore:
    """Chunks as Qdrant points (cosine), files and index settings in a small companion collection."""

    def __init__(self, location: str, collection: str, *, path: str | None = None, host: str | None = None,
                 port: int = 6333) -> None:
        from qdrant_client import QdrantClient

        self.location = location
        self.collection = collection
        self.files_collection = f"{collection}__files"
        self.client = QdrantClient(path=path) if path else QdrantClient(host=host, port=port, timeout=10)

    def exists(self) -> bool:
        return bool(self.client.collection_exists(self.files_collection))

    def meta(self) -> dict[str, Any] | None:
        if not self.exists():
            return None
        points = self.client.retrieve(self.files_collection, [_point_id("__meta__")], with_payload=True)
        return json.loads(points[0].payload["meta"]) if points else None

    def create(self, meta: dict[str, Any]) -> None:
        from qdrant_client import models

        if not self.client.collection_exists(self.collection):
            self.client.create_collection(self.collection, vectors_config=models.VectorParams(
                size=int(meta["dimensions"]), distance=models.Distance.COSINE))
        if not self.client.collection_exists(self.files_collection):
            self.client.create_collection(self.files_collection, vectors_config=models.VectorParams(
                size=1, distance=models.Distance.DOT))
        self.client.upsert(self.files_collection, [models.PointStruct(
            id=_point_id("__meta__"), vector=[1.0], payload={"meta": json.dumps(meta)})])

    def files(self) -> dict[str, str]:
        found, offset = {}, None
        while True:
            points, offset = self.client.scroll(self.files_collection, limit=256, offset=offset, with_payload=True)
            for point in points:
                if "source" in point.payload:
                    found[point.payload["source"]] = point.payload["sha256"]
            if offset is None:
                return found

    def replace_file(self, source: str, sha256: str, chunks: list[Chunk], vectors: np.ndarray) -> None:
        from qdrant_client import models

        # The file record is written last: until then the file counts as not indexed, and is redone.
        self.client.delete(self.files_collection, [_point_id(f"file:{source}")])
        self._delete_chunks(source)
        points = [models.PointStruct(id=_point_id(f"{source}#{c.position}"), vector=v.tolist(),
                                     payload={"source": c.source, "position": c.position, "text": c.text,
                                              "tokens": c.tokens, "page": c.page, "heading": c.heading})
                  for c, v in zip(chunks, vectors, strict=True)]
        for start in range(0, len(points), 256):
            self.client.upsert(self.collection, points[start : start + 256])
        self.client.upsert(self.files_collection, [models.PointStruct(
            id=_point_id(f"file:{source}"), vector=[1.0], payload={"source": source, "sha256": sha256})])

    def _delete_chunks(self, source: str) -> None:
        from qdrant_client import models

        self.client.delete(self.collection, models.FilterSelector(filter=models.Filter(must=[
            models.FieldCondition(key="source", match=models.MatchValue(value=source))])))

    def delete_file(self, source: str) -> None:
        self.client.delete(self.files_collection, [_point_id(f"file:{source}")])
        self._delete_chunks(source)

    def dense(self, vector: np.ndarray, k: int) -> list[tuple[Chunk, float]]:
        hits = self.client.query_points(self.collection, query=vector.tolist(), limit=k, with_payload=True).points
        return [(_chunk_from_payload(hit.payload), float(hit.score)) for hit in hits]

    def all_chunks(self) -> list[Chunk]:
        chunks, offset = [], None
        while True:
            points, offset = self.client.scroll(self.collection, limit=512, offset=offset, with_payload=True)
            chunks.extend(_chunk_from_payload(p.payload) for p in points)
            if offset is None:
                return sorted(chunks, key=lambda c: c.key)

    def close(self) -> None:
        self.client.close()


def _point_id(key: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, key))


def _chunk_from_payload(payload: dict[str, Any]) -> Chunk:
    return Chunk(payload["source"], payload["position"], payload["text"], payload["tokens"], payload.get("page"),
                 payload.get("heading"))
