"""Reference guidance for online RL (`reference_guidance: true`): where none of a prompt's sampled completions
earns the reward its reference answer earns, the reference takes the place of one of them.

GRPO and RLOO learn only from the differences inside a group: a prompt whose completions all fail gives every
one of them the same advantage, so no gradient, and a small model that never samples the right answer to a kind
of question never learns it. Mixing the reference in as one member of such a group (off-policy guidance, as in
LUFFY, Yan et al. 2025, without its policy shaping) gives the group a winner: the policy is pushed towards the
reference and away from its own failures, through the same objective and KL penalty as every other completion
(with one optimisation pass per batch, TRL's importance ratio is 1, so nothing is clipped). Groups where some
completion already earns the reference's reward are left as sampled, so the rest of the run stays on-policy.
"""

from __future__ import annotations

from typing import Any

from ownllm.finetune.rewards import REFERENCE


def reference_ids(tokenizer: Any, reference: str, eos_token_id: int | None, max_tokens: int) -> list[int]:
    """The reference answer as a completion: its tokens and the end-of-sequence token, as a sampled completion that
    stopped ends, cut to `max_tokens` like one."""
    ids = tokenizer(reference, add_special_tokens=False)["input_ids"]
    if eos_token_id is not None:
        ids = [*ids, eos_token_id]
    return ids[:max_tokens]


def guided_completions(trainer: Any, inputs: list[dict[str, Any]], completion_ids: list[list[int]],
                       group_size: int) -> tuple[list[list[int]], list[int]]:
    """`completion_ids` (one per row of `inputs`, groups of `group_size` rows of one prompt in a row) with the
    last completion of each group that no completion earns the reference's reward in replaced by the reference.
    Returns the completions and the index of each row replaced. Rows without a reference are left alone.

    The rewards are `trainer`'s own (TRL's `_calculate_rewards` with its reward weights), so a reward model, a
    Python function and the built-ins decide alike. That call gathers across training processes, so every
    process makes it, with the same number of rows (each has the same batch), and reads its own slice back."""
    import torch

    tokenizer = trainer.processing_class
    groups = [range(start, start + group_size) for start in range(0, len(inputs), group_size)]
    stops = list(trainer.eos_token_ids)  # the generation config's: what ends a sampled completion
    stop = tokenizer.eos_token_id if tokenizer.eos_token_id in stops else (stops[0] if stops else None)
    references: list[list[int] | None] = []
    for group in groups:
        reference = inputs[group[0]].get(REFERENCE)
        usable = isinstance(reference, str) and reference.strip()
        references.append(reference_ids(tokenizer, reference, stop, trainer.max_completion_length) if usable
                          else None)
    # a group without a reference is scored on its first completion in the reference's place, and never guided
    scored_ids = list(completion_ids) + [ids if ids is not None else completion_ids[g[0]]
                                         for ids, g in zip(references, groups, strict=True)]
    scored_inputs = list(inputs) + [inputs[g[0]] for g in groups]
    prompts = [x["prompt"] for x in scored_inputs]
    texts = tokenizer.batch_decode(scored_ids, skip_special_tokens=True)
    conversational = isinstance(prompts[0], list)
    completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
    gathered = trainer._calculate_rewards(scored_inputs, prompts, completions, scored_ids).cpu()
    mine = trainer.accelerator.process_index * len(scored_ids)
    per_function = gathered[mine:mine + len(scored_ids)]
    rewards = (per_function * trainer.reward_weights.unsqueeze(0)).nansum(dim=1)
    sampled = rewards[:len(inputs)].view(len(groups), group_size)
    replaced, guided_ids = [], list(completion_ids)
    for index, group in enumerate(groups):
        reference_row = len(inputs) + index
        if references[index] is None or bool(torch.isnan(per_function[reference_row]).all()):
            continue  # no reference, or no reward function scored it
        if bool((sampled[index] < rewards[reference_row]).all()):
            guided_ids[group[-1]] = references[index]  # type: ignore[assignment]
            replaced.append(group[-1])
    return guided_ids, replaced
