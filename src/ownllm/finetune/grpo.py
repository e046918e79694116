"""Online RL (`--method grpo` or `rloo`): sample several completions per prompt, score them with reward functions
and/or a reward model, and push the policy (LoRA on the base) towards the better ones, held near the model it
started from by a KL penalty. TRL's GRPOTrainer / RLOOTrainer do the work; this module maps ownllm's config,
data and run folder onto them, so a run has the same checkpoints, resume, metrics.jsonl and run card as SFT.

Data: JSONL, one prompt per line — `messages` (chat; a final assistant reply becomes the `reference` column the
built-in rewards compare with) or `prompt` (text or messages) with an optional `reference`; every other field is
handed to the reward functions as a column. Logged per step (metrics.jsonl, plotted in reward.png): the mean
reward (and per function), the KL to the starting model, the completion length, the loss.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from ownllm.data.jsonl import fail_if_any, read_jsonl
from ownllm.errors import OwnLLMError
from ownllm.finetune.config import FinetuneConfig
from ownllm.finetune.outcome import TrainingInterrupted, TrainOutcome
from ownllm.finetune.rewards import REFERENCE, RewardFailed, load_reward, validate_rewards
from ownllm.finetune.run_folder import (
    METRICS_FILE,
    RunRecord,
    checkpoints_path,
    final_model_path,
    latest_checkpoint,
    write_record,
)
from ownllm.finetune.trainer_setup import has_cuda, run_callbacks, trainer_arguments, use_own_callbacks
from ownllm.models.tokenizer_files import save_tokenizer

log = logging.getLogger(__name__)
REWARD_PLOT = "reward.png"


def load_prompts(path: Path, places: list[str] | None = None) -> list[dict[str, Any]]:
    """The prompt rows of an RL data file (see the module docstring); problems are named with file and line (each
    row's "FILE line N" is appended to `places` when given)."""
    rows, problems = [], []
    kinds: dict[str, tuple[str, int]] = {}  # column: (JSON type, the line it was first seen on)
    for record in read_jsonl(path):
        data, where = dict(record.data), f"{path.name} line {record.line}"
        messages, field = data.pop("messages", None), "messages"
        if messages is None and isinstance(data.get("prompt"), list):  # a conversation given as the prompt
            messages, field = data.pop("prompt"), "prompt"
        if messages is not None:
            if not (isinstance(messages, list) and messages and all(
                    isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in (
                        "system", "user", "assistant") for m in messages)):
                problems.append(f"{where}: '{field}' must be a list of {{role, content}} messages (role system, "
                                "user or assistant; content text)")
                continue
            turns = [{"role": m["role"], "content": m["content"]} for m in messages]
            if turns[-1]["role"] == "assistant":
                data.setdefault(REFERENCE, turns.pop()["content"])
            if not turns or turns[-1]["role"] != "user":
                problems.append(f"{where}: the prompt must end with a user message")
                continue
            data["prompt"] = turns
        elif isinstance(data.get("prompt"), str) and data["prompt"].strip():
            data["prompt"] = [{"role": "user", "content": data["prompt"]}]
        else:
            problems.append(f"{where}: needs 'messages' or 'prompt'")
            continue
        if REFERENCE in data and not isinstance(data[REFERENCE], str):
            problems.append(f"{where}: '{REFERENCE}' must be text")
            continue
        problems += _type_changes(data, kinds, where, record.line)
        rows.append(data)
        if places is not None:
            places.append(where)
    fail_if_any(problems)
    if not rows:
        raise OwnLLMError(f"{path}: no prompts", param="data")
    return rows


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "text"
    return "a list" if isinstance(value, list) else "an object" if isinstance(value, dict) else "null"


def _type_changes(row: dict[str, Any], kinds: dict[str, tuple[str, int]], where: str, line: int) -> list[str]:
    """A column whose JSON type differs from an earlier line's (the rows become one table for the trainer, and
    reward functions get one column per field): named with both lines. null fits any column."""
    problems = []
    for key, value in row.items():
        if key == "prompt" or value is None:
            continue
        kind = _json_kind(value)
        first_kind, first_line = kinds.setdefault(key, (kind, line))
        if first_kind != kind:
            problems.append(f"{where}: '{key}' is {kind}, but {first_kind} on line {first_line}: give it one type "
                            "on every line")
    return problems


def as_table(rows: list[dict[str, Any]], path: Path) -> Any:
    """The rows as the trainer's dataset, or an error naming the file when their fields do not form one table
    (types that differ inside nested fields: the line-by-line check names the plain cases)."""
    import pyarrow
    from datasets import Dataset

    try:
        return Dataset.from_list(rows)
    except (pyarrow.ArrowException, TypeError, ValueError) as exc:
        raise OwnLLMError(f"{path.name}: its fields do not form one table ({exc}): give each field the same type "
                          "(and nested fields the same shape) on every line", param="data") from None


def read_rl_data(path: Path, rewards: list[Any], places: list[str] | None = None) -> Any:
    """The prompt file as the trainer's dataset, every line checked (and each reward function tried on the first
    rows, its fields present on every line): what `ownllm finetune --method grpo` and a reinforcement job both
    check before any model loads. Each row's "FILE line N" is appended to `places` when given."""
    where: list[str] = [] if places is None else places
    rows = load_prompts(path, where)
    table = as_table(rows, path)
    validate_rewards(rewards, rows, where)
    return table


def check_rl(cfg: FinetuneConfig, data: Path, places: list[str] | None = None) -> tuple[Any, list[Any]]:
    """Data (as the trainer's dataset) and reward functions, read and tried before any model loads: a bad file or
    function stops here. Each row's "FILE line N" is appended to `places` when given."""
    rewards = [load_reward(spec) for spec in cfg.reward_fn]
    table = read_rl_data(data, rewards, places)
    per_step = cfg.batch_size * cfg.grad_accum
    if len(table) < per_step:  # TRL's sampler then yields no batch at all, and no step ever runs
        raise OwnLLMError(f"{data.name}: {len(table)} prompt(s), but a step takes batch_size x grad_accum = "
                          f"{per_step}", param="data", hint="add prompts or lower --batch-size or --grad-accum")
    if cfg.reference_guidance and not (REFERENCE in table.column_names and any(
            isinstance(r, str) and r.strip() for r in table[REFERENCE])):
        raise OwnLLMError(f"{data.name}: reference_guidance needs a '{REFERENCE}' on some lines (the answer to put "
                          "in a group that all fails; or a chat's final assistant message), and no line has one",
                          param="reference_guidance", hint="add references or drop --reference-guidance")
    if cfg.reward_model:
        from ownllm.finetune.reward_model import check_reward_run

        check_reward_run(Path(cfg.reward_model))
    return table, rewards


def check_prompt_room(prompts: list[list[dict[str, str]]], places: list[str], tokenizer: Any,
                      max_completion_length: int, context: int) -> None:
    """Every prompt, rendered as the trainer renders it, leaves room for a whole completion in the model's
    context; else an error naming the longest prompt's line (every step holding it would run past the context)."""
    if max_completion_length >= context:
        raise OwnLLMError(f"max_completion_length {max_completion_length} leaves no room for a prompt in the "
                          f"model's context of {context} tokens", param="max_completion_length")
    lengths = [len(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=False))
               for prompt in prompts]
    longest = max(range(len(lengths)), key=lengths.__getitem__)
    if lengths[longest] >= context:
        raise OwnLLMError(f"{places[longest]}: a prompt of {lengths[longest]} tokens leaves no room for a completion "
                          f"in the model's context of {context} tokens", param="data", hint="shorten the prompt")
    if lengths[longest] + max_completion_length > context:
        raise OwnLLMError(f"{places[longest]}: a prompt of {lengths[longest]} tokens + max_completion_length "
                          f"{max_completion_length} is past the model's context of {context} tokens",
                          param="max_completion_length",
                          hint=f"lower max_completion_length to {context - lengths[longest]} or shorten the prompt")


def build_rl_trainer(cfg: FinetuneConfig, run_dir: Path, data: Path) -> tuple[Any, Any]:
    """TRL's trainer for `cfg` (GRPO or RLOO on a fresh LoRA over the model, its rewards, ownllm's rollouts where
    `cfg.rollouts` allows) and the model as loaded; nothing trained yet."""
    from peft import LoraConfig

    from ownllm.finetune.lora_dropout import use_quick_dropout
    from ownllm.models.load import load_model

    places: list[str] = []
    table, rewards = check_rl(cfg, data, places)
    cuda = has_cuda()
    loaded = load_model(cfg.model, dtype="auto" if cuda else "fp32")  # fp32 on a CPU, as run.py trains
    check_prompt_room(table["prompt"], places, loaded.tokenizer, cfg.max_completion_length, loaded.context_length)
    model, tokenizer = loaded.model, loaded.tokenizer
    model.config.use_cache = True  # sampling the completions is most of the time
    reward_funcs: list[Any] = list(rewards)
    reward_tokenizers: list[Any] = [None] * len(rewards)
    if cfg.reward_model:
        from ownllm.finetune.reward_model import load_reward_model

        scorer, scorer_tokenizer = load_reward_model(Path(cfg.reward_model))
        reward_funcs.append(scorer)
        reward_tokenizers.append(scorer_tokenizer)
    targets: Any = cfg.lora.targets if cfg.lora.targets == "all-linear" else cfg.lora.targets.split(",")
    peft_config = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                             target_modules=targets, task_type="CAUSAL_LM")
    common = dict(
        trainer_arguments(cfg, run_dir, has_eval=False),
        per_device_train_batch_size=cfg.batch_size * cfg.num_generations,  # a group of completions per prompt
        bf16=cuda,
        num_generations=cfg.num_generations, max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature, beta=cfg.rl_beta, log_completions=False)
    if cfg.method == "rloo":
        from trl import RLOOConfig as ArgsClass
        from trl import RLOOTrainer as TrainerClass
    else:
        from trl import GRPOConfig as ArgsClass
        from trl import GRPOTrainer as TrainerClass
    trainer = with_own_rollouts(TrainerClass)(
        model=model, reward_funcs=reward_funcs, args=ArgsClass(**common), train_dataset=table,
        processing_class=tokenizer, reward_processing_classes=reward_tokenizers if cfg.reward_model else None,
        callbacks=run_callbacks(run_dir), peft_config=peft_config)
    use_quick_dropout(trainer.model)  # TRL put the LoRA (and its dropouts) on
    trainer.rollouts_note = use_rollouts(trainer, loaded, cfg.rollouts)
    trainer.reference_guidance = cfg.reference_guidance
    return trainer, loaded


def train_rl(cfg: FinetuneConfig, run_dir: Path, data: Path, *, resume: bool, callbacks: list[Any] | None = None
             ) -> TrainOutcome:
    """Build the policy, the rewards and TRL's trainer; train (resuming from the latest checkpoint); save final/."""
    trainer, loaded = build_rl_trainer(cfg, run_dir, data)
    tokenizer = loaded.tokenizer
    stopper = use_own_callbacks(trainer, callbacks)
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if resume and checkpoint is None:
        log.warning("no checkpoint in %s: starting from the beginning", run_dir)
    started = time.time()
    try:
        output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except RewardFailed as exc:
        # the steps done so far are kept: fix the function, then --resume
        trainer._save_checkpoint(trainer.model, trial=None)
        raise OwnLLMError(f"{exc.message} at step {trainer.state.global_step + 1}; checkpoint saved in "
                          f"{checkpoints_path(run_dir)}", kind="training_failed", param="reward_fn",
                          hint="fix it, then run the same command with --resume") from None
    if stopper.stopped_at is not None:
        raise TrainingInterrupted(run_dir, stopper.stopped_at)
    if trainer.is_world_process_zero():  # once, not once per training process (--nproc)
        save_final(run_dir, trainer, tokenizer, RunRecord(base_model=loaded.source.location, method=cfg.method,
                                                          spec=cfg.model))
        plot_rewards(run_dir)
    return TrainOutcome(output.global_step, float(output.training_loss), None, time.time() - started,
                        int(trainer.state.num_input_tokens_seen or 0), [rollouts_card_note(trainer)])


def with_own_rollouts(trainer_class: type) -> type:
    """`trainer_class` (TRL's GRPOTrainer or RLOOTrainer) sampling its completions with `own_rollouts`
    (a `PolicyRollouts`) when set; TRL's own generation otherwise, and for what ours does not take (images, a
    prompt past the context, min-p or repetition-penalty sampling)."""

    class OwnRollouts(trainer_class):  # type: ignore[misc, valid-type]
        own_rollouts: Any = None
        rollouts_required = False  # rollouts: ownllm (a call it cannot take is an error, not a fallback)
        rollout_fallbacks = 0  # calls TRL's generation sampled although ours was chosen (the card says)
        reference_guidance = False  # the reference in place of one completion of a group that all fail (guidance.py)
        _rollout_calls: tuple[int, int] = (-1, 0)  # (step, rollouts sampled in it): each call its own seeds

        def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> Any:
            self._step_inputs = inputs  # the rows behind this call's prompts, for reference guidance
            try:
                return super()._generate_and_score_completions(inputs)
            finally:
                self._step_inputs = None

        def _generate_single_turn(self, prompt_ids: list[list[int]], images: Any, multimodal_fields: Any,
                                  *args: Any, **kwargs: Any) -> Any:
            sampled = self._sampled(prompt_ids, images, multimodal_fields, *args, **kwargs)
            inputs = getattr(self, "_step_inputs", None)
            # GRPO passes the completions per prompt: 1 for a tool call's follow-up turn, whose rows are no group
            per_prompt = args[0] if args else kwargs.get("num_generations", self.num_generations)
            if not (self.reference_guidance and self.model.training and inputs and len(inputs) == len(prompt_ids)
                    and per_prompt == self.num_generations):
                return sampled
            from ownllm.finetune.guidance import guided_completions

            pair = isinstance(sampled, tuple)
            completion_ids, replaced = guided_completions(self, inputs, sampled[0] if pair else sampled,
                                                          self.num_generations)
            import torch

            # every process's groups, as TRL gathers its own metrics (each process holds the same number)
            counts = self.accelerator.gather(torch.tensor([len(replaced), len(prompt_ids) // self.num_generations],
                                                          device=self.accelerator.device)).view(-1, 2).sum(dim=0)
            self._metrics["train"]["guidance/groups_guided"].append(counts[0].item() / counts[1].item())
            if not pair:
                return completion_ids
            # the sampler's own log-probs: none exist for a reference put in
            return completion_ids, None if replaced else sampled[1]

        def _sampled(self, prompt_ids: list[list[int]], images: Any, multimodal_fields: Any,
                     *args: Any, **kwargs: Any) -> Any:
            rollouts = self.own_rollouts
            if rollouts is None:
                return super()._generate_single_turn(prompt_ids, images, multimodal_fields, *args, **kwargs)
            reason = self._not_ours(rollouts, prompt_ids, images, multimodal_fields)
            if reason is not None:
                if self.rollouts_required:
                    raise OwnLLMError(f"rollouts: ownllm cannot sample this step ({reason})", kind="unsupported",
                                      param="rollouts", hint="use rollouts: auto or trl")
                self.rollout_fallbacks += 1
                return super()._generate_single_turn(prompt_ids, images, multimodal_fields, *args, **kwargs)
            step, calls = self._rollout_calls
            calls = calls + 1 if step == self.state.global_step else 0
            self._rollout_calls = (self.state.global_step, calls)
            completion_ids = rollouts.sample(
                prompt_ids, max_new_tokens=self.max_completion_length, temperature=self.temperature,
                top_p=self.top_p, top_k=self.top_k or 0,
                seed=self.args.seed * 1_000_003 + self.state.global_step * 1_009 + calls)
            return (completion_ids, None) if trainer_class.__name__ == "GRPOTrainer" else completion_ids

        def _not_ours(self, rollouts: Any, prompt_ids: list[list[int]], images: Any, multimodal_fields: Any
                      ) -> str | None:
            """Why ownllm's engine cannot sample this call (TRL's generation then does), or None."""
            if images is not None or multimodal_fields:
                return "images: TRL's generation takes those"
            if self.min_p or self.repetition_penalty != 1.0 or self.args.generation_kwargs:
                return "min-p, a repetition penalty or generation_kwargs: TRL's generation takes those"
            if not rollouts.fits(prompt_ids, self.max_completion_length):
                return (f"a prompt of {max(map(len, prompt_ids))} tokens + max_completion_length "
                        f"{self.max_completion_length} is past the model's context of "
                        f"{rollouts.engine.context_length}")
            return None

    OwnRollouts.__name__ = OwnRollouts.__qualname__ = trainer_class.__name__
    return OwnRollouts


def use_rollouts(trainer: Any, loaded: Any, choice: str) -> str:
    """Sample with ownllm's engine (`choice` auto where it covers the policy, or ownllm: an error where it does
    not), or leave TRL's generation (trl). Returns what was chosen and why, for the log and the run card."""
    from ownllm.finetune.rollouts import PolicyRollouts, rollout_support

    if choice == "trl":
        note = "rollouts: TRL's generation (rollouts: trl)"
    elif (reason := rollout_support(trainer.model)) is not None:
        if choice == "ownllm":
            raise OwnLLMError(f"rollouts: ownllm cannot sample this policy: {reason}", kind="unsupported",
                              param="rollouts", hint="use rollouts: auto or trl")
        note = f"rollouts: TRL's generation ({reason})"
    else:
        trainer.own_rollouts = PolicyRollouts(loaded, trainer.model)
        trainer.rollouts_required = choice == "ownllm"
        note = "rollouts: ownllm's batched engine (continuous batching, a prompt's group sharing its prefill)"
    log.info(note)
    return note


def rollouts_card_note(trainer: Any) -> str:
    """The run card's line on who sampled the rollouts, with the calls that fell back to TRL's generation."""
    fallbacks = trainer.rollout_fallbacks
    if not fallbacks:
        return trainer.rollouts_note
    return (f"{trainer.rollouts_note}; {fallbacks} sampling call(s) fell back to TRL's generation (a prompt past the "
            "context, or sampling settings ours does not take)")


def save_final(run_dir: Path, trainer: Any, tokenizer: Any, record: RunRecord) -> Path:
    """final/ (the adapter, its tokenizer and the run record), whole or not at all."""
    from ownllm.home import atomic_folder

    final = final_model_path(run_dir)
    with atomic_folder(final) as staging:
        trainer.model.save_pretrained(staging, safe_serialization=True)
        save_tokenizer(tokenizer, staging)
        write_record(staging, record)
    return final


def plot_rewards(run_dir: Path) -> Path:
    """reward.png: mean reward, KL and completion length per step, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines() if line]
    series = [("reward", "mean reward"), ("kl", "KL to the start"), ("completions/mean_length", "completion tokens")]
    fig, axes = plt.subplots(1, len(series), figsize=(12, 3.5))
    for axis, (key, label) in zip(axes, series, strict=True):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            axis.plot(*zip(*points, strict=True))
        axis.set_xlabel("step")
        axis.set_title(label)
    fig.tight_layout()
    path = run_dir / REWARD_PLOT
    staging = run_dir / f".{REWARD_PLOT}.tmp.png"
    fig.savefig(staging, dpi=100)
    plt.close(fig)
    staging.replace(path)  # whole or not at all
    return path
