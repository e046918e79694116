"""Turning one step's logits into a token — and, on request, the table that shows how.

Order (as in transformers): constraint mask → logit bias → penalties → temperature → top-k → top-p → min-p →
draw.
Every probability column of the explanation is a full, renormalised distribution; tokens a constraint does not
allow have logit -inf there, so probability 0 in every column.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ownllm.generate.params import SamplingParams


@dataclass(frozen=True)
class ExplainRow:
    token_id: int
    token: str
    logit: float
    prob: float  # softmax of the (penalised) logits at T=1
    prob_temperature: float
    prob_top_k: float
    prob_top_p: float
    prob_min_p: float  # the distribution actually drawn from
    chosen: bool


@dataclass(frozen=True)
class StepExplanation:
    rows: list[ExplainRow]
    chosen_id: int
    kept_top_k: int  # how many tokens survive top-k
    kept_top_p: int  # how many survive top-p
    kept_min_p: int  # how many survive min-p (the support of the final distribution)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    logits = logits.clone()
    picked = logits[seen]
    logits[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def mask_logits(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """A copy of (CPU, float32) `logits` with -inf wherever `allowed` is False, and past its end (padded vocabulary
    columns). In numpy: one pass on this thread, where torch's kernel waits on its OpenMP workers."""
    values = logits.detach().cpu().numpy()
    keep = allowed.numpy()
    if keep.size < values.size:
        keep = np.concatenate([keep, np.zeros(values.size - keep.size, dtype=bool)])
    return torch.from_numpy(np.where(keep[: values.size], values, np.float32(-np.inf)))


def _top_k_mask(probs: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= probs.numel():
        return torch.ones_like(probs, dtype=torch.bool)
    threshold = torch.topk(probs, k).values[-1]
    mask = probs >= threshold
    if int(mask.sum()) > k:  # ties at the threshold: keep exactly k, lowest ids first
        keep = torch.topk(probs, k).indices
        mask = torch.zeros_like(mask)
        mask[keep] = True
    return mask


def _top_p_mask(probs: torch.Tensor, p: float) -> torch.Tensor:
    if p >= 1.0:
        return probs > 0
    sorted_probs, order = torch.sort(probs, descending=True)
    cumulative = torch.cumsum(sorted_probs, dim=0)
    # keep a token if the mass before it is still short of p: the smallest set that reaches p
    keep_sorted = (cumulative - sorted_probs) < p
    keep_sorted[0] = True
    mask = torch.zeros_like(probs, dtype=torch.bool)
    mask[order[keep_sorted]] = True
    return mask & (probs > 0)


def _min_p_mask(probs: torch.Tensor, min_p: float) -> torch.Tensor:
    # relative to the most likely token, so the same whether `probs` is renormalised or not
    return (probs >= min_p * probs.max()) & (probs > 0) if min_p > 0 else probs > 0


def _renormalise(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    kept = torch.where(mask, probs, torch.zeros_like(probs))
    return kept / kept.sum()


def _candidates(logits: torch.Tensor, params: SamplingParams, temperature: float
                ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The tokens that may be drawn and their (unnormalised) probabilities after temperature, top-k, top-p and
    min-p.

    Only what the filters need is sorted: the k best with top-k, everything only when top-p alone is set.
    `ids` is None when no filter applies (the probabilities are then over the whole vocabulary).
    """
    scaled = logits / temperature
    ids = None
    if 0 < params.top_k < scaled.numel():
        scaled, ids = torch.topk(scaled, params.top_k)
        probs = torch.softmax(scaled, dim=-1)  # top-k renormalises before top-p, as in transformers
    elif params.top_p < 1.0:
        log_total = torch.logsumexp(scaled, dim=0)
        # The nucleus is usually small: look at the best 256 first, sort everything only if they fall short.
        head, head_ids = torch.topk(scaled, min(256, scaled.numel()))
        probs = torch.exp(head - log_total)
        if float(probs.sum()) >= params.top_p:
            ids = head_ids
        else:
            scaled, ids = torch.sort(scaled, descending=True)
            probs = torch.exp(scaled - log_total)
    else:
        probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1.0:
        keep = (torch.cumsum(probs, dim=0) - probs) < params.top_p
        keep[0] = True
        probs = probs * keep
    if params.min_p > 0:
        probs = probs * _min_p_mask(probs, params.min_p)
    return ids, probs


def _draw(ids: torch.Tensor | None, probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """Inverse-CDF sampling: one uniform number from the seeded generator."""
    cumulative = torch.cumsum(probs, dim=0)
    target = torch.rand((), generator=generator) * cumulative[-1]
    index = min(int(torch.searchsorted(cumulative, target, right=True)), probs.numel() - 1)
    while probs[index] == 0:  # rounding at the very top of the CDF: step back to a kept token
        index -= 1
    return int(ids[index]) if ids is not None else index


def pick_token(
    logits: torch.Tensor,
    params: SamplingParams,
    seen: torch.Tensor,
    generator: torch.Generator | None,
    decode: object = None,
    generated: torch.Tensor | None = None,
    allowed: torch.Tensor | None = None,
) -> tuple[int, StepExplanation | None]:
    """Choose the next token from one position's logits (shape [vocab], any float dtype).

    Args:
        logits: raw next-token logits.
        params: the sampling parameters.
        seen: ids already in the context (prompt + generated), for the repetition penalty.
        generator: the seeded RNG for sampling.
        decode: callable id -> text, needed only when params.explain > 0.
        generated: ids generated so far, for the presence and frequency penalties.
        allowed: bool per token, True where a constraint allows it (`GrammarState.allowed`); the rest get -inf
            before anything else, so no strategy, bias or filter can pick them.
    """
    logits = logits.float()
    if allowed is not None:
        logits = mask_logits(logits, allowed)
    if params.logit_bias:
        logits = logits.clone()
        ids = torch.tensor(list(params.logit_bias), dtype=torch.long)
        logits[ids] += torch.tensor(list(params.logit_bias.values()), dtype=logits.dtype)
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and generated is not None and generated.numel():
        counts = torch.bincount(generated, minlength=logits.numel())[: logits.numel()].float()
        logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).float()
    sampling = params.strategy == "sample"
    temperature = params.temperature if sampling and params.temperature > 0 else 1.0
    chosen = _draw(*_candidates(logits, params, temperature), generator) if sampling else int(torch.argmax(logits))
    if not params.explain:
        return chosen, None
    return chosen, _explain(logits, params, temperature, chosen, decode)


def _explain(logits: torch.Tensor, params: SamplingParams, temperature: float, chosen: int, decode: object
             ) -> StepExplanation:
    """Every column of the table, as full renormalised distributions over the vocabulary."""
    probs_t = torch.softmax(logits / temperature, dim=-1)
    mask_k = _top_k_mask(probs_t, params.top_k)
    probs_k = _renormalise(probs_t, mask_k)
    mask_p = _top_p_mask(probs_k, params.top_p)
    probs_p = _renormalise(probs_k, mask_p)
    mask_m = _min_p_mask(probs_p, params.min_p)
    probs_m = _renormalise(probs_p, mask_m)
    probs_1 = torch.softmax(logits, dim=-1)
    top = torch.topk(logits, min(params.explain, logits.numel())).indices.tolist()
    if chosen not in top:
        top.append(chosen)
    render = decode if callable(decode) else str
    rows = [
        ExplainRow(
            token_id=i,
            token=render(i),
            logit=float(logits[i]),
            prob=float(probs_1[i]),
            prob_temperature=float(probs_t[i]),
            prob_top_k=float(probs_k[i]),
            prob_top_p=float(probs_p[i]),
            prob_min_p=float(probs_m[i]),
            chosen=i == chosen,
        )
        for i in top
    ]
    return StepExplanation(rows=rows, chosen_id=chosen, kept_top_k=int(mask_k.sum()),
                           kept_top_p=int((probs_p > 0).sum()), kept_min_p=int(mask_m.sum()))


def top_logprobs(logprobs: torch.Tensor, n: int) -> list[tuple[int, float]]:
    if n <= 0:
        return []
    values, ids = torch.topk(logprobs, n)
    return list(zip(ids.tolist(), values.tolist(), strict=True))
