"""QuickDropout: nn.Dropout's distribution and gradient from a cheaper mask, reproducible from torch's seed, and put in
place of peft's LoRA dropouts."""

from __future__ import annotations

import pytest
import torch

from ownllm.finetune.lora_dropout import QuickDropout, use_quick_dropout


def test_it_drops_a_share_p_and_scales_the_rest() -> None:
    torch.manual_seed(0)
    x = torch.ones(4, 300, 576)
    out = QuickDropout(0.05).train()(x)
    dropped = (out == 0).float().mean().item()
    assert dropped == pytest.approx(0.05, abs=0.002)  # 691,200 draws: the share within 0.2 points
    assert torch.allclose(out[out != 0], torch.tensor(1 / 0.95))
    assert out.dtype == x.dtype and out.shape == x.shape
    assert QuickDropout(0.05).train()(x.bfloat16()).dtype == torch.bfloat16  # autocast's dtype is kept


def test_the_gradient_is_the_mask_and_eval_is_the_identity() -> None:
    x = torch.randn(2, 7, 33, requires_grad=True)
    dropout = QuickDropout(0.3).train()
    out = dropout(x)
    out.sum().backward()
    kept = out.detach() != 0
    assert torch.allclose(x.grad[kept], torch.tensor(1 / 0.7)) and (x.grad[~kept] == 0).all()
    assert dropout.eval()(x) is x
    assert QuickDropout(0.0).train()(x) is x


def test_torchs_seed_gives_the_same_masks_and_moves_on() -> None:
    dropout = QuickDropout(0.5).train()
    x = torch.ones(3, 1001)  # not a multiple of the four draws per 64-bit word
    torch.manual_seed(7)
    first, second = dropout(x), dropout(x)
    torch.manual_seed(7)
    assert torch.equal(dropout(x), first) and torch.equal(dropout(x), second)
    assert not torch.equal(first, second)


def test_probabilities_near_the_ends_stay_unbiased() -> None:
    """p rounds to 1/65,536: what is kept is scaled by the inverse of the rate the mask keeps (p = 0.99999 keeps 1
    in 65,536: x 65,536, not 1 / (1 - p) = 100,000); where rounding would drop nothing or everything, torch's own
    dropout runs."""
    torch.manual_seed(1)
    x = torch.ones(2_000_000)
    kept = QuickDropout(0.99999).train()(x)
    assert kept.count_nonzero() > 0 and (kept[kept != 0] == 65536).all()
    assert QuickDropout(0.999).train()(x).mean().item() == pytest.approx(1.0, rel=0.1)
    assert QuickDropout(1e-7).train()(x).count_nonzero() >= 2_000_000 - 5
    for p in (1e-7, 0.9999999):
        assert torch.isfinite(QuickDropout(p).train()(x)).all()


def test_bad_probabilities_are_refused() -> None:
    for p in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="dropout probability"):
            QuickDropout(p)


def test_it_replaces_peft_lora_dropouts_only_where_they_drop() -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)

    def peft_model(dropout: float):
        torch.manual_seed(0)
        return get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                                    target_modules="all-linear"))

    model = peft_model(0.1)
    assert use_quick_dropout(model) == 2 * 7  # q, k, v, o, gate, up, down in each of the two layers
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.modules())
    model.train()
    ids = torch.randint(0, 64, (2, 9))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert use_quick_dropout(peft_model(0.0)) == 0  # peft has no dropout there to replace
