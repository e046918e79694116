"""Export and quantize: take a model or a tuned run anywhere (GGUF for llama.cpp / Ollama / LM Studio, a LoRA
GGUF, an HF folder), and choose a quantization by measurement (`ownllm quantize compare`).

    formats.py     the formats and quantizations, checked before any weights load
    source.py      what to export: a model, or a run merged first (prompt tuning refused)
    vocab.py       the tokenizer as GGUF metadata (tokens, merges, special ids, chat template)
    gguf_model.py  a whole model as GGUF (gguf's writer, name maps and quantizers; k-quants by llama.cpp)
    gguf_lora.py   a LoRA adapter alone as a GGUF adapter llama.cpp applies with --lora
    export.py      the one entry point: `export(spec, format, out, quant)`
    compare.py     `quantize compare`: size, RAM, speed, perplexity and QA per format, as deltas
"""
