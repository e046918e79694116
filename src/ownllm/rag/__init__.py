"""Retrieve: load documents, chunk, embed, store, search (dense, BM25, hybrid), answer with citations."""

from ownllm.rag.context import RagContext
from ownllm.rag.index import Index

__all__ = ["Index", "RagContext"]
