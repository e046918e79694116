"""Data: readers and checks for the files users bring (JSONL, text folders)."""
