"""Evaluate: perplexity, reference-based QA metrics, LLM-as-judge, harness tasks, base vs tuned reports."""
