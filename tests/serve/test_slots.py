"""The batched slot forward against transformers' own forward (and peft's, with an adapter)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


def test_slot_forward_matches_transformers(engine) -> None:
    from ownllm.generate.slots import SlotModel

    model, tokenizer = engine.model, engine.tokenizer
    slots = SlotModel(model, slots=4, max_len=256)
    a = tokenizer("The capital of France is").input_ids
    b = tokenizer("Once upon a time, in a small village by the sea, there lived").input_ids
    logits_a = slots.forward(torch.tensor([a]), torch.tensor([1]), torch.tensor([0]))[0]
    slots.forward(torch.tensor([b[:4]]), torch.tensor([3]), torch.tensor([0]))  # chunked prefill
    logits_b = slots.forward(torch.tensor([b[4:]]), torch.tensor([3]), torch.tensor([4]))[0]
    for _ in range(4):  # decode both sequences together, at different lengths
        a.append(int(logits_a.argmax()))
        b.append(int(logits_b.argmax()))
        out = slots.forward(torch.tensor([[a[-1]], [b[-1]]]), torch.tensor([1, 3]),
                            torch.tensor([len(a) - 1, len(b) - 1]))
        logits_a, logits_b = out[0], out[1]
    with torch.inference_mode():
        expected_a = model(torch.tensor([a])).logits[0, -1]
        expected_b = model(torch.tensor([b])).logits[0, -1]
    assert torch.allclose(logits_a, expected_a, atol=1e-3)
    assert torch.allclose(logits_b, expected_b, atol=1e-3)


def test_lora_rows_match_peft(engine, adapter_dir) -> None:
    from peft import PeftModel

    from ownllm.generate.slots import SlotModel

    ids = engine.tokenizer("Tell me about bicycles").input_ids
    slots = SlotModel(engine.model, slots=2, max_len=128)
    slots.load_adapter("tuned", adapter_dir)
    out = slots.forward(torch.tensor([ids]), torch.tensor([0]), torch.tensor([0]), ["tuned"])[0]
    base = slots.forward(torch.tensor([ids]), torch.tensor([1]), torch.tensor([0]), [None])[0]
    peft_model = PeftModel.from_pretrained(engine.model, adapter_dir)
    try:
        with torch.inference_mode():
            expected = peft_model(torch.tensor([ids])).logits[0, -1]
    finally:
        peft_model.unload()  # give the shared base model back without LoRA layers, whatever happened
    assert torch.allclose(out, expected, atol=1e-3)
    assert not torch.allclose(out, base, atol=1e-2)


def test_health_and_the_start_up_line_say_the_server_batches(strict_server) -> None:
    import httpx

    batching = httpx.get(f"{strict_server.url}/health").json()["batching"]
    from ownllm.generate.slots import rows_placed_alike, rows_round_alike
    from ownllm.models.dtype import slot_product_shapes

    narrow = batching["narrow_rows"]  # fp32 steps of a few rows as transposed products, where measured faster
    four_bit = batching["int4_rows"]  # the GGUF's 4-bit weights in steps of a few rows, where measured faster
    cpu = torch.device("cpu")
    invariant = rows_round_alike(torch.float32, cpu) and not narrow and not four_bit and rows_placed_alike(
        torch.float32, cpu, [*slot_product_shapes(576, 9, 3, 64, 1536), (49152, 576)])  # (false on MKL's AVX2 fp32)
    # the int4 steps' one-row ones compiled (loading, compiling in the background or compiled: test_compiled_decode);
    # else why the 4-bit weights are off
    int4 = {"compiled_steps": batching.get("compiled_steps")} if four_bit else {
        "int4_note": "GGUF 4-bit weights off: measured no faster than float32 on this CPU"}
    # (one sequence at a time never runs a decode step on the dense weights: they are not packed, no "packed_weights")
    assert batching == {"mode": "batched", "max_batch": 1, "kv_tokens": 2048, "kv_bytes": batching["kv_bytes"],
                        "prefix_caching": True, "int4_rows": four_bit, **int4,
                        "narrow_rows": narrow, "batch_invariant": invariant,
                        # a batch-invariant model's prefix cache reuses whole prefill chunks only
                        **({"prefix_exact_chunks": 256} if invariant else {})}
    assert not four_bit or "one-row steps" in batching["compiled_steps"]
    assert isinstance(narrow, int) and 0 <= narrow <= 16
    assert batching["kv_bytes"] == 2048 * 30 * 2 * 3 * 64 * 4  # 30 layers, k and v, 3 heads of 64, fp32
    log = strict_server.log.read_text()
    assert f"batched, up to 1 sequences, KV budget {batching['kv_bytes'] / 2**30:.2f} GiB = 2,048 tokens, " \
           "prefix cache on" in log
    warning = "a seeded request's tokens can vary with the requests beside it (OWNLLM_BATCH_INVARIANT=1"
    assert (warning in log) is not invariant
    assert (f"fp32 steps of up to {narrow} tokens as transposed products" in log) is bool(narrow)
    assert "oneDNN" not in log


def test_batch_invariance_gives_a_row_the_same_logits_alone_and_in_any_batch(engine, monkeypatch) -> None:
    """OWNLLM_BATCH_INVARIANT: a decoding row's logits are the same bits alone or beside up to 10 other rows, with
    one thread and with two, on every CPU (where the CPU's matmul rounds some widths differently, they are computed
    wider); a value that is not on or off is an error, not silently off."""
    from ownllm.errors import OwnLLMError
    from ownllm.generate.slots import SlotModel, _linear, invariant_widths

    x, w = torch.randn(1, 1, 16), torch.randn(8, 16)
    wide = torch.nn.functional.linear(torch.cat([x[0], torch.zeros(3, 16)]), w)[:1]
    assert torch.equal(_linear(x, w, padded_rows={1: 4}), wide[None])
    assert torch.equal(_linear(x, w, padded_rows={2: 4}), x @ w.T)
    monkeypatch.setenv("OWNLLM_BATCH_INVARIANT", "garbage")
    with pytest.raises(OwnLLMError, match="OWNLLM_BATCH_INVARIANT='garbage': use 1 or 0"):
        SlotModel(engine.model, slots=2, max_len=16)
    monkeypatch.setenv("OWNLLM_BATCH_INVARIANT", "1")
    texts = ["The sea is", "Hi", "Once upon a time", "2 + 2 =", "Paris is", "Why", "The quick brown fox", "A", "Bo",
             "It was a dark", "Rain"]
    prompts = [engine.tokenizer(text).input_ids for text in texts]
    threads = torch.get_num_threads()
    try:
        for count in sorted({1, 2}):
            torch.set_num_threads(count)
            slots = SlotModel(engine.model, slots=len(prompts), max_len=64)
            assert slots.invariant and slots.padded
            down = slots.layers[0].down  # padded by its own shape's probe
            assert slots._padding(down) == invariant_widths(torch.float32, torch.device("cpu"), tuple(down.shape))
            for slot, ids in enumerate(prompts):
                slots.forward(torch.tensor([ids]), torch.tensor([slot]), torch.tensor([0]))
            starts = [len(ids) for ids in prompts]
            first = [slots.forward(torch.tensor([[13]] * width), torch.tensor(list(range(width))),
                                   torch.tensor(starts[:width]))[0] for width in range(1, len(prompts) + 1)]
            assert all(torch.equal(first[0], other) for other in first[1:]), count
    finally:
        torch.set_num_threads(threads)


def test_a_model_that_cannot_batch_is_served_one_at_a_time_with_the_reason(engine, tmp_path) -> None:
    import transformers
    from fastapi.testclient import TestClient

    from ownllm.serve.app import create_app
    from ownllm.serve.run import build_state, startup_line

    config = transformers.GPT2Config(vocab_size=engine.vocab_size, n_embd=32, n_layer=1, n_head=2, n_positions=256)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)
    engine.tokenizer.save_pretrained(tmp_path)
    state = build_state(str(tmp_path), dtype="fp32")
    batching = TestClient(create_app(state)).get("/health").json()["batching"]
    assert batching["mode"] == "serial" and "gpt2" in batching["reason"]
    line = startup_line(state, "127.0.0.1", 8000)
    assert f"one request at a time: {batching['reason']}" in line and "context 256" in line


def test_a_bf16_server_runs_the_ggufs_4bit_weights_in_narrow_steps_and_says_so(default_model: str) -> None:
    from fastapi.testclient import TestClient

    from ownllm.serve.app import create_app
    from ownllm.serve.run import build_state, startup_line

    state = build_state(default_model, dtype="bf16", max_batch=2, max_model_len=256)
    limit = state.scheduler.model.four_bit_rows  # measured on this CPU: 0 where the int4 kernel is no faster
    line = startup_line(state, "127.0.0.1", 8000)
    if limit:
        assert (f"GGUF 4-bit weights as stored in decode steps of up to {limit} rows" if limit > 1 else
                "GGUF 4-bit weights as stored in one-row decode steps") in line
        assert "one-row steps" in line  # loading, compiling in the background or compiled (test_compiled_decode)
    else:
        assert "4-bit" not in line
    state.scheduler.start()
    try:
        client = TestClient(create_app(state))
        assert client.get("/health").json()["batching"]["int4_rows"] == limit
        reply = client.post("/v1/chat/completions", json={
            "model": state.model_name, "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        assert reply.status_code == 200 and "Paris" in reply.json()["choices"][0]["message"]["content"]
    finally:
        state.scheduler.stop(drain_seconds=1)
    off = build_state(default_model, dtype="bf16", max_batch=2, max_model_len=256, four_bit=False)
    assert off.scheduler.batching["int4_rows"] == 0 and "4-bit" not in startup_line(off, "127.0.0.1", 8000)
