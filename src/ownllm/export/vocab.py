"""The tokenizer as GGUF metadata, the way llama.cpp's convert_hf_to_gguf.py writes it for byte-level BPE
tokenizers (GPT-2 style: SmolLM, Llama 3, Qwen2, ...): every token with its type, the merges, the special token
ids, add_bos/add_eos, and the chat template in `tokenizer.chat_template`.

llama.cpp picks its pre-tokenizer (how text is split before BPE) by the name in `tokenizer.ggml.pre`;
convert_hf_to_gguf.py finds that name by encoding one fixed text and hashing the ids. The same text and the
hashes of the families ownllm exports are kept here: a tokenizer that hashes to none of them is refused, since
llama.cpp would tokenize it wrongly without a word.
"""

from __future__ import annotations

import tempfile
from hashlib import sha256
from pathlib import Path
from typing import Any

from ownllm.errors import OwnLLMError

# convert_hf_to_gguf.py's get_vocab_base_pre: this text, encoded, hashed (sha256 of str(ids))
_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / Qwen2 / Qwen2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}


def pre_tokenizer_name(tokenizer: Any) -> str:
    """llama.cpp's name for this tokenizer's pre-tokenizer (`tokenizer.ggml.pre`)."""
    digest = sha256(str(tokenizer.encode(_CHECK_TEXT)).encode()).hexdigest()
    name = PRE_TOKENIZERS.get(digest)
    if name is None:
        raise OwnLLMError(f"this tokenizer's pre-tokenizer is not one llama.cpp is known to share (hash {digest})",
                          kind="unsupported", param="model",
                          hint="export it as an HF folder (--format hf) and convert it with llama.cpp's "
                               "convert_hf_to_gguf.py, which knows more tokenizers")
    return name


def _looks_special(token: str) -> bool:
    """Added tokens some models forget to mark special (convert_hf_to_gguf.py's does_token_look_special)."""
    return (token.startswith("<|") and token.endswith("|>")) or token in ("<pad>", "<mask>")


def token_table(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Every id below `vocab_size` as (token text, GGUF token type): CONTROL for special added tokens,
    USER_DEFINED for other added ones, UNUSED padding for ids the tokenizer has no token for."""
    import gguf

    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise OwnLLMError(f"the tokenizer has ids up to {max(vocab.values())}, past the model's vocabulary of "
                          f"{vocab_size}", param="model")
    reverse = {index: token for token, index in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = getattr(tokenizer, "added_tokens_decoder", {})
    tokens, types = [], []
    for index in range(vocab_size):
        token = reverse.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        if token in added:
            special = getattr(decoder.get(index), "special", False) or _looks_special(token)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


def is_byte_level_bpe(tokenizer: Any) -> bool:
    """A byte-level BPE tokenizer (GPT-2 style); SentencePiece-style ones (byte fallback, ▁) are not."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        return False
    import json

    model = json.loads(backend.to_str()).get("model", {})
    return model.get("type") == "BPE" and not model.get("byte_fallback", False)


def add_vocab(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    """Write the tokenizer into `writer` (a gguf.GGUFWriter): tokens, types, merges, special ids, chat template.

    Raises:
        OwnLLMError: a tokenizer that is not byte-level BPE, or whose pre-tokenizer llama.cpp does not know
            (kind unsupported).
    """
    import gguf

    if not is_byte_level_bpe(tokenizer):
        raise OwnLLMError("export to GGUF supports byte-level BPE tokenizers (SmolLM, Llama 3, Qwen2, ...); this "
                          "model's is not one", kind="unsupported", param="model",
                          hint="export it as an HF folder (--format hf) and convert it with llama.cpp's "
                               "convert_hf_to_gguf.py")
    tokens, types = token_table(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # gguf's SpecialVocab reads merges, special ids, add_bos/add_eos and the chat template from the files
    # transformers saves (tokenizer.json, tokenizer_config.json, chat_template.jinja): the same reader
    # convert_hf_to_gguf.py uses, so the keys come out as llama.cpp expects
    with tempfile.TemporaryDirectory(prefix="ownllm-export-tokenizer-") as folder:
        tokenizer.save_pretrained(folder)
        special = gguf.SpecialVocab(Path(folder), load_merges=True, n_vocab=len(tokens))
        if not special.merges:
            raise OwnLLMError("the tokenizer has no BPE merges to write", kind="unsupported", param="model")
        special.add_to_gguf(writer, quiet=True)
