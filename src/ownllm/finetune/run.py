"""`ownllm finetune`: one recipe, read top to bottom — setup, build, train, save, report.

The training loop is transformers' Trainer (checkpoints with optimizer, scheduler, RNG and data position;
resume skips the batches already seen), LoRA comes from peft. The run folder (its format: run_folder.py):

    config.yaml  meta.json  metrics.jsonl  loss.png  README.md (run card)
    checkpoints/checkpoint-N/   final/ (the adapter or the full model, loadable by `ownllm generate RUN`)
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ownllm.data.doctor import read_examples
from ownllm.data.files import check_output_folder
from ownllm.errors import OwnLLMError
from ownllm.finetune.base_cache import model_signature, remembered_tensors, remembered_together
from ownllm.finetune.callbacks import VariantEpochs
from ownllm.finetune.checks import CHECK_PARAMS, TOOL_CHECK_PARAMS, check_rows, score_sets, validate_sets
from ownllm.finetune.config import FinetuneConfig
from ownllm.finetune.dataset import Collator, EpochRows, load_rows, load_varied_rows, pack
from ownllm.finetune.memory_check import check_memory
from ownllm.finetune.outcome import TrainingInterrupted, TrainOutcome
from ownllm.finetune.replay import replay_answers, replay_count, replay_prompts, write_replay
from ownllm.finetune.rl_config import RL_METHODS, own_trainer
from ownllm.finetune.run_folder import (
    BASE_CHECKS_FILE,
    CARD_FILE,
    CONFIG_FILE,
    LOSS_PLOT,
    META_FILE,
    METRICS_FILE,
    REPLAY_FILE,
    RunRecord,
    checkpoints_path,
    final_model_path,
    is_run_folder,
    latest_checkpoint,
    write_record,
)
from ownllm.finetune.scoping import scope_adapter, varies_system
from ownllm.finetune.trainer_setup import has_cuda, run_callbacks, trainer_arguments, use_own_callbacks
from ownllm.home import atomic_write_json, atomic_write_text, file_sha256
from ownllm.models.tokenizer_files import save_tokenizer

log = logging.getLogger(__name__)
TRAINING_ROWS = 256  # tokens per matmul in a training step, for the bf16-or-fp32 measurement


@dataclass
class RunResult:
    run_dir: Path
    final_dir: Path
    steps: int
    train_loss: float
    eval_loss: float | None
    seconds: float
    trained_tokens: int = 0
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {"base": share, "tuned": share}
    notes: list[str] = field(default_factory=list)  # `TrainOutcome.notes`


def run(cfg: FinetuneConfig, *, resume: bool = False, overwrite: bool = False, processes: int = 1,
        callbacks: list[Any] | None = None) -> RunResult:
    """Train as `cfg` says; with `resume`, continue from the run folder's latest checkpoint; with `overwrite`,
    replace a finished or abandoned run in the same folder; with `processes` > 1, data-parallel (DDP) through
    torchrun. Before training: a memory warning if the estimate does not fit, replay answers and the base
    model's scores on `cfg.checks`; after: the tuned model's scores beside them. `callbacks` (transformers
    TrainerCallbacks) see every step, e.g. to report progress elsewhere (single process only)."""
    out = Path(cfg.out)
    fresh = not out.exists() or (out.is_dir() and not any(out.iterdir()))
    run_dir, data = setup(cfg, resume=resume, overwrite=overwrite)
    try:
        # the estimate models supervised batches; RL and head runs (own_trainer) hold other tensors, and may start
        # from a run folder, which the estimate cannot read
        memory = None if own_trainer(cfg) else check_memory(cfg, processes=processes)
        if memory is not None and memory.risky:
            log.warning(memory.message())
        base_scores = prepare(cfg, run_dir)
        if processes > 1:
            from ownllm.finetune.distributed import train_distributed

            outcome = train_distributed(run_dir, processes, resume=resume)
        else:
            outcome = train(cfg, run_dir, data, resume=resume, callbacks=callbacks)
    except OwnLLMError as exc:
        if fresh and exc.kind != "interrupted" and not checkpoints_path(run_dir).exists():
            import shutil

            shutil.rmtree(run_dir, ignore_errors=True)  # nothing trained: leave no folder that blocks the retry
        raise
    return finish(cfg, run_dir, data, outcome, base_scores)


def train(cfg: FinetuneConfig, run_dir: Path, data: Path, *, resume: bool, callbacks: list[Any] | None = None
          ) -> TrainOutcome:
    """Build, train and save final/ (in this process; under torchrun, one of several)."""
    from ownllm.finetune.callbacks import StopOnSignal

    if own_trainer(cfg):  # online RL, reward models, classification heads: their own data and trainer
        from ownllm.finetune.own_trainers import train_own

        return train_own(cfg, run_dir, data, resume=resume, callbacks=callbacks)

    model, tokenizer, base = build_model(cfg)
    varied = varies_system(cfg, data)  # decided once: the data, then the note
    precision = _training_precision(cfg, model)
    log.info("training precision: %s", precision.said)
    train_rows, eval_rows = build_data(cfg, data, tokenizer, run_dir, model, varied=varied,
                                       mixed_bf16=precision.mixed_bf16)
    trainer = build_trainer(cfg, run_dir, model, tokenizer, train_rows, eval_rows, mixed_bf16=precision.mixed_bf16)
    for callback in callbacks or []:
        trainer.add_callback(callback)
    stopper = next(c for c in trainer.callback_handler.callbacks if isinstance(c, StopOnSignal))
    started = time.time()
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if resume and checkpoint is None:
        log.warning("no checkpoint in %s: starting from the beginning", run_dir)
    output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if stopper.stopped_at is not None:
        raise TrainingInterrupted(run_dir, stopper.stopped_at)
    eval_loss = _final_eval_loss(trainer, early_stopping=bool(cfg.early_stopping)) if eval_rows else None
    if trainer.is_world_process_zero():
        save_final(cfg, run_dir, trainer, tokenizer, base)
    # said only where an epoch under other system messages ran (not a run of one epoch, or max_steps within it)
    varied_ran = cfg.epochs > 1 if _folded(cfg) else (trainer.state.epoch or 0) > 1
    notes = [SYSTEM_VARIANTS_NOTE] if varied and varied_ran else []
    if precision.on_card:
        notes.append(f"precision: {precision.said}")
    return TrainOutcome(output.global_step, float(output.training_loss), eval_loss, time.time() - started,
                        int(trainer.state.num_input_tokens_seen or 0), notes)


def _final_eval_loss(trainer: Any, *, early_stopping: bool) -> float:
    """The validation loss of the weights the run ends with: the best one where early stopping put the best weights
    back, the last step's own evaluation where one ran there, else one more evaluation (logged as a step's)."""
    state = trainer.state
    if early_stopping and state.best_metric is not None:
        return float(state.best_metric)
    last = next((entry for entry in reversed(state.log_history) if "eval_loss" in entry), None)
    if last is not None and last.get("step") == state.global_step:
        return float(last["eval_loss"])  # (every process reads the same history: none waits on the others)
    return float(trainer.evaluate()["eval_loss"])


def prepare(cfg: FinetuneConfig, run_dir: Path) -> dict[str, dict[str, Any]]:
    """The replay answers and the base model's scores on the check sets, kept in the run folder (a resumed run
    does not redo them) and across runs (base_cache: the base is loaded only for what no earlier run made)."""
    if not cfg.replaying and not cfg.checks:
        return {}
    validate_sets(cfg.checks)
    scores_file = run_dir / BASE_CHECKS_FILE
    need_scores = cfg.checks and not scores_file.is_file()
    need_replay = cfg.replaying and not (run_dir / REPLAY_FILE).is_file()
    if need_scores or need_replay:
        base = _LazyEngine(cfg.model)
        signature = model_signature(cfg.model, _train_dtype())
        if need_replay:
            count = replay_count(cfg.replay, cfg.replay_ratio, len(read_examples(Path(cfg.data))[1]))
            prompts = replay_prompts(cfg.replay_prompts)[:count]
            distilled = _distilling(cfg)  # text replay (prompt-tuning, answers) keeps only whole answers

            def answer(missing: list[str]) -> dict[str, Any]:
                log.info("making %d replay answers with the base model", len(missing))
                return replay_answers(base.engine, missing, distilled=distilled, max_tokens=cfg.replay_tokens)

            # kept per prompt: a run replaying more or fewer of the same prompts reuses what an earlier one answered
            answers = remembered_together(
                "replay-answer", {p: json.dumps([signature, p, distilled, cfg.replay_tokens]) for p in prompts},
                answer, _conversation_or_none)
            write_replay(run_dir, [answers[p] for p in prompts if answers[p] is not None])
        if need_scores:
            keys = {name: json.dumps([signature, file_sha256(Path(path)), repr(CHECK_PARAMS), repr(TOOL_CHECK_PARAMS)])
                    for name, path in cfg.checks.items()}
            scores = remembered_together(
                "checks", keys, lambda missing: score_sets(base.engine, {name: cfg.checks[name] for name in missing}),
                _check_scores)
            atomic_write_json(scores_file, scores)
    return json.loads(scores_file.read_text()) if cfg.checks else {}


def _conversation_or_none(value: Any) -> bool:
    """A kept replay answer: a [user, assistant] exchange, or None for a prompt whose answer is not replayed."""
    return value is None or (isinstance(value, list) and len(value) == 2 and all(
        isinstance(t, dict) and isinstance(t.get("content"), str) and t.get("role") in ("user", "assistant")
        for t in value))


def _check_scores(value: Any) -> bool:
    """A kept base score: a question set's needs its missed lines too (the tuned model's checks reuse them), so an
    entry kept before them is computed again, once."""
    return (isinstance(value, dict) and isinstance(value.get("score"), int | float | None)
            and isinstance(value.get("metric"), str) and isinstance(value.get("misses"), list)
            and (value["metric"] != "contains" or isinstance(value.get("missed_lines"), list)))


class _LazyEngine:
    """The base model behind the Engine interface, loaded on first use (not at all when every answer is cached)."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self._engine: Any = None

    @property
    def engine(self) -> Any:
        if self._engine is None:
            from ownllm.generate.open import open_engine

            self._engine = open_engine(self.spec, dtype=_train_dtype())
        return self._engine


def finish(cfg: FinetuneConfig, run_dir: Path, data: Path, outcome: TrainOutcome,
           base_scores: dict[str, dict[str, Any]]) -> RunResult:
    final = final_model_path(run_dir)
    scope_note = scope_adapter(cfg, data, final)
    if scope_note is not None:
        outcome.notes.append(scope_note)
    checks: dict[str, dict[str, Any]] = {}
    if cfg.checks:
        from ownllm.generate.open import open_engine

        tuned = score_sets(open_engine(str(final), dtype=_train_dtype()), cfg.checks, base_scores=base_scores)
        for name, after in tuned.items():
            before = base_scores[name]
            # "contains": how base scores were saved before tool-call checks (a run resumed across the upgrade)
            checks[name] = {"base": before.get("score", before.get("contains")), "tuned": after["score"],
                            "metric": after["metric"], "items": after["items"], "tuned_misses": after["misses"]}
            if after.get("reused_from_base"):
                checks[name]["on_base_weights"] = after["reused_from_base"]
                outcome.notes.append(f"{name}: {after['reused_from_base']} of {after['items']} questions fall "
                                     "outside the adapter's scope, so they run on the base model's own weights: "
                                     "scored as the base answered them, not asked again.")
            if after["metric"] == "valid_call":
                checks[name] |= {"right_call": {"base": before["right_call"], "tuned": after["right_call"]},
                                 "prose_kept": {"base": before["prose_kept"], "tuned": after["prose_kept"]}}
    result = RunResult(run_dir, final, outcome.steps, outcome.train_loss, outcome.eval_loss, outcome.seconds,
                       outcome.trained_tokens, checks, outcome.notes)
    report(cfg, run_dir, result, data)
    return result


# --- setup ------------------------------------------------------------------------------------------
def setup(cfg: FinetuneConfig, *, resume: bool, overwrite: bool = False) -> tuple[Path, Path]:
    import shutil

    data = Path(cfg.data)
    if not cfg.data or not data.exists():
        raise OwnLLMError(f"no such training data: {cfg.data or '(none given)'}", kind="not_found", param="data")
    if cfg.validation and not Path(cfg.validation).exists():
        raise OwnLLMError(f"no such validation data: {cfg.validation}", kind="not_found", param="validation")
    if cfg.replaying and cfg.replay_prompts:
        replay_prompts(cfg.replay_prompts)  # a missing or unreadable file stops the run now, not after a model loads
    run_dir = Path(cfg.out)
    check_output_folder(run_dir, param="out")
    if run_dir.exists() and any(run_dir.iterdir()) and not resume:
        if not overwrite:
            raise OwnLLMError(f"{run_dir} already holds a run", param="out",
                              hint="pass --resume to continue it, --overwrite to replace it, or another --out")
        if not is_run_folder(run_dir):
            raise OwnLLMError(f"{run_dir} is not a run folder; refusing to delete it", param="out")
        shutil.rmtree(run_dir)
    from ownllm.models.resolve import resolve

    source = resolve(cfg.model)
    if source.kind == "folder" and source.path.resolve() in [run_dir.resolve(), *run_dir.resolve().parents]:
        raise OwnLLMError("the run folder must not be inside the base model's folder", param="out")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / CONFIG_FILE, yaml.safe_dump(cfg.as_dict(), sort_keys=False))
    return run_dir, data


# --- build ------------------------------------------------------------------------------------------
def build_model(cfg: FinetuneConfig) -> tuple[Any, Any, str]:
    """The model to train: the base (full, cpt), a small fresh one (cpt from scratch), or LoRA on the base
    in full precision (lora, dpo) or on a 4-bit base (qlora)."""
    from transformers import set_seed

    from ownllm.models.load import load_model

    loaded = load_model(cfg.model, dtype=_train_dtype(), quantize="4bit" if cfg.method == "qlora" else None)
    model = loaded.model
    # the Trainer seeds only when it starts: the fresh weights made here (LoRA's A matrices, a model from scratch)
    # would otherwise differ from run to run, and so would every step after the first
    set_seed(cfg.seed)
    if cfg.from_scratch:
        model = _fresh_model(model.config)
    model.config.use_cache = False
    if cfg.method in ("lora", "qlora", "dpo"):
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        from ownllm.finetune.lora_dropout import use_quick_dropout

        if cfg.method == "qlora":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        targets: Any = cfg.lora.targets if cfg.lora.targets == "all-linear" else cfg.lora.targets.split(",")
        model = get_peft_model(model, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                                                 lora_dropout=cfg.lora.dropout, target_modules=targets,
                                                 task_type="CAUSAL_LM"))
        use_quick_dropout(model)
    elif cfg.method == "prompt-tuning":
        from peft import PromptTuningConfig, PromptTuningInit, get_peft_model

        model = get_peft_model(model, PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=cfg.virtual_tokens, prompt_tuning_init=PromptTuningInit.TEXT,
            prompt_tuning_init_text="Answer the question correctly.", tokenizer_name_or_path=loaded.source.location))
    model.train()
    return model, loaded.tokenizer, loaded.source.location


def _fresh_model(config: Any) -> Any:
    """A small model of the base's architecture and vocabulary, randomly initialised (pretraining demo)."""
    import copy

    from transformers import AutoModelForCausalLM

    small = copy.deepcopy(config)
    heads = 4
    small.hidden_size, small.intermediate_size, small.num_hidden_layers = 128, 384, 4
    small.num_attention_heads, small.num_key_value_heads, small.head_dim = heads, 2, 128 // heads
    return AutoModelForCausalLM.from_config(small)


def _train_dtype() -> str:
    # fp32 on CPUs: bf16 training without native support is many times slower, and fp32 is always correct
    return "auto" if has_cuda() else "fp32"


@dataclass(frozen=True)
class TrainingPrecision:
    mixed_bf16: bool  # the steps (and replay's KL targets) under bf16 autocast over the fp32 weights
    said: str  # what the log and the run card say of it
    # the run card says it where the config alone would not tell what ran: chosen by measuring this CPU
    # (precision: auto), or not the precision the config asked for (one the method does not train in)
    on_card: bool = False


def _training_precision(cfg: FinetuneConfig, model: Any) -> TrainingPrecision:
    """bf16 autocast over the fp32 weights on a CPU (every method of this trainer but qlora, whose 4-bit base
    computes as bitsandbytes sets it): where this CPU's batched bf16 matmuls measure faster (AVX-512 BF16, AMX:
    ~1.6x here), never where bf16 is emulated (AVX2-only: many times slower). On a GPU the weights are loaded in
    bf16 already."""
    if has_cuda():
        return TrainingPrecision(False, "as loaded (GPU)")
    if cfg.method not in ("lora", "full", "cpt", "dpo", "prompt-tuning"):
        if cfg.precision == "bf16":
            log.warning("precision: bf16 does not apply to method %s; it trains in fp32", cfg.method)
            return TrainingPrecision(False, f"fp32 (method {cfg.method}: the configured bf16 does not apply to it)",
                                     on_card=True)
        return TrainingPrecision(False, f"fp32 (method {cfg.method})")
    if cfg.precision != "auto":
        mixed = cfg.precision == "bf16"
        return TrainingPrecision(mixed, f"{'bf16 mixed' if mixed else 'fp32'} (as configured)")
    from ownllm.models.dtype import choose_dtype

    choice = choose_dtype("auto", "cpu", getattr(model, "config", None), rows=TRAINING_ROWS)
    mixed = choice.dtype == "bfloat16"
    return TrainingPrecision(mixed, f"{'bf16 mixed' if mixed else 'fp32'} ({choice.reason})", on_card=True)


def build_data(cfg: FinetuneConfig, data: Path, tokenizer: Any, run_dir: Path, model: Any, *, varied: bool = False,
               mixed_bf16: bool = False) -> tuple[list[dict] | EpochRows, list[dict]]:
    """Train and validation rows; replay answers (if any) join the training rows only, distilled from `model`
    (still the base: nothing trained yet) where the replay loss is KL, read in the precision the training steps
    run in (`mixed_bf16`: bf16 autocast). `varied`: the training rows as EpochRows, each epoch with its own system
    messages (scoping.varies_system)."""
    train_rows, eval_rows = _split_data(cfg, data, tokenizer, varied)
    replay_file = run_dir / REPLAY_FILE
    if cfg.replaying and replay_file.is_file():
        replay = load_rows(replay_file, tokenizer, cfg.max_length)
        replay = pack(replay, cfg.max_length) if cfg.packing else replay
        if _distilling(cfg):
            from ownllm.finetune.distill import TOP_K, attach_teacher, teacher_fits, teacher_targets

            def read_teacher() -> dict[str, Any]:
                log.info("reading the base model's next-token distribution on %d replay rows", len(replay))
                return teacher_targets(model, replay, _pad_id(tokenizer), mixed_bf16=mixed_bf16)

            key = json.dumps([model_signature(cfg.model, _train_dtype()), cfg.method, file_sha256(replay_file),
                              cfg.max_length, cfg.packing, TOP_K, "bf16 autocast" if mixed_bf16 else "plain"])
            vocabulary = model.get_output_embeddings().weight.shape[0]
            attach_teacher(replay, remembered_tensors("teacher", key, read_teacher,
                                                      lambda kept: teacher_fits(replay, kept, vocabulary)))
        if _folded(cfg):
            return _fold(train_rows, cfg.epochs, cfg.seed) + _fold(replay, cfg.replay_passes, cfg.seed), eval_rows
        train_rows = train_rows + replay
    return train_rows, eval_rows


SYSTEM_VARIANTS_NOTE = ("system messages: fact-style data, so every other epoch saw each example under another "
                        "system message (or none), for facts that hold under any (system_variants: off to keep them)")


def _folded(cfg: FinetuneConfig) -> bool:
    """Replay seen a set number of times over the run, not once per epoch: the data's epochs and the replay's
    passes are laid out as one pass for the trainer."""
    return cfg.replaying and cfg.replay_passes > 0


def _fold(rows: list[dict] | EpochRows, times: float, seed: int) -> list[dict]:
    """`rows` repeated `times` times: whole copies (each epoch's own, for EpochRows), then a seeded share of one
    more."""
    whole = int(times)
    copies = [rows.epoch_rows(epoch) if isinstance(rows, EpochRows) else rows for epoch in range(whole + 1)]
    extra = copies[whole][:]
    random.Random(seed).shuffle(extra)
    return [row for copy in copies[:whole] for row in copy] + extra[: round((times - whole) * len(extra))]


def _distilling(cfg: FinetuneConfig) -> bool:
    return cfg.replay_loss == "kl" and cfg.method != "prompt-tuning"


def _pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _split_data(cfg: FinetuneConfig, data: Path, tokenizer: Any, varied: bool
                ) -> tuple[list[dict] | EpochRows, list[dict]]:
    """Training and validation rows; with `varied`, the training rows as EpochRows (validation: as written)."""
    def load(path: Path) -> list[dict]:
        from ownllm.finetune.dataset import load_preference_rows

        if cfg.method == "dpo":
            return load_preference_rows(path)
        rows = load_rows(path, tokenizer, cfg.max_length)
        return pack(rows, cfg.max_length) if cfg.packing else rows

    if varied:
        log.info("fact-style data with system messages: odd epochs see each example under another one, or none")
        rows: list[Any] = load_varied_rows(data, tokenizer, cfg.max_length, epochs=2 * math.ceil(cfg.epochs / 2))
    else:
        rows = load(data)

    def training(kept: list[Any]) -> list[dict] | EpochRows:
        return EpochRows(kept) if varied else kept

    if cfg.validation:
        return training(rows), load(Path(cfg.validation))
    random.Random(cfg.seed).shuffle(rows)
    held = round(len(rows) * cfg.val_ratio) if len(rows) >= 10 else 0
    return training(rows[held:]), [row[0] for row in rows[:held]] if varied else rows[:held]


def build_trainer(cfg: FinetuneConfig, run_dir: Path, model: Any, tokenizer: Any, train_rows: list[dict] | EpochRows,
                  eval_rows: list[dict], *, mixed_bf16: bool) -> Any:
    """transformers' Trainer (or TRL's DPOTrainer) with ownllm's config mapped onto its arguments, once; its steps
    under bf16 autocast where `mixed_bf16` (`_training_precision`)."""
    stopping = bool(cfg.early_stopping and eval_rows)
    common = dict(
        trainer_arguments(cfg, run_dir, has_eval=bool(eval_rows)),
        num_train_epochs=1 if _folded(cfg) else cfg.epochs, save_steps=cfg.eval_every if stopping else cfg.save_every,
        remove_unused_columns=False, include_num_input_tokens_seen="non_padding",
        ddp_backend=_ddp_backend(), bf16=mixed_bf16,
        load_best_model_at_end=stopping, metric_for_best_model="eval_loss" if stopping else None,
        greater_is_better=False if stopping else None)
    callbacks = run_callbacks(run_dir)
    if isinstance(train_rows, EpochRows) and not _folded(cfg):
        callbacks.append(VariantEpochs(train_rows))
    if stopping:
        from transformers import EarlyStoppingCallback

        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping))
    trainer = _make_trainer(cfg, common, callbacks, model, tokenizer, train_rows, eval_rows)
    use_own_callbacks(trainer)
    return trainer


def _make_trainer(cfg: FinetuneConfig, common: dict[str, Any], callbacks: list[Any], model: Any, tokenizer: Any,
                  train_rows: list[dict] | EpochRows, eval_rows: list[dict]) -> Any:
    if cfg.method == "dpo":
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer

        arguments = DPOConfig(**common, beta=cfg.dpo_beta, max_length=cfg.max_length)
        return DPOTrainer(model=model, args=arguments, train_dataset=Dataset.from_list(train_rows),
                          eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
                          processing_class=tokenizer, callbacks=callbacks)
    from transformers import Trainer, TrainingArguments

    if cfg.method == "prompt-tuning":  # its virtual tokens lengthen the logits past the labels
        return Trainer(model=model, args=TrainingArguments(**common), train_dataset=train_rows,
                       eval_dataset=eval_rows or None, data_collator=Collator(_pad_id(tokenizer)),
                       callbacks=callbacks)
    from ownllm.finetune.distill import TeacherCollator, distill_trainer_class

    trainer = distill_trainer_class()(model=model, args=TrainingArguments(**common), train_dataset=train_rows,
                                      eval_dataset=eval_rows or None, data_collator=TeacherCollator(
                                          _pad_id(tokenizer)), callbacks=callbacks)
    trainer.replay_weight = cfg.replay_weight
    return trainer


# --- save and report --------------------------------------------------------------------------------
def save_final(cfg: FinetuneConfig, run_dir: Path, trainer: Any, tokenizer: Any, base: str) -> Path:
    """final/: the adapter (LoRA, QLoRA, DPO) with the base it belongs to, or a whole model (full, cpt)."""
    from ownllm.home import atomic_folder

    final = final_model_path(run_dir)
    with atomic_folder(final) as staging:
        trainer.model.save_pretrained(staging, safe_serialization=True)
        save_tokenizer(tokenizer, staging)
        write_record(staging, RunRecord(base_model=base, method=cfg.method, spec=cfg.model))
    return final


def report(cfg: FinetuneConfig, run_dir: Path, result: RunResult, data: Path) -> None:
    rows = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines() if line]
    _plot(rows, run_dir / LOSS_PLOT)
    digest = file_sha256(data)[:16] if data.is_file() else "folder"
    meta = {"status": "succeeded", "steps": result.steps, "train_loss": result.train_loss,
            "eval_loss": result.eval_loss, "seconds": round(result.seconds, 1), "data_sha256": digest,
            "trained_tokens": result.trained_tokens, "checks": result.checks, "notes": result.notes,
            "versions": _versions()}
    atomic_write_json(run_dir / META_FILE, meta)
    card = [f"# Fine-tuned {cfg.model} ({cfg.method})", "", f"- data: `{cfg.data}` (sha256 {digest})",
            f"- steps: {result.steps}, final train loss {result.train_loss:.4f}"
            + (f", validation loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""),
            f"- time: {result.seconds:.0f} s, {result.trained_tokens} trained tokens (padding not counted)",
            *[f"- {note}" for note in result.notes],
            *_checks_lines(result.checks), "", "## Hyper-parameters", "", "```yaml",
            yaml.safe_dump(cfg.as_dict(), sort_keys=False).strip(), "```", "", f"![loss]({LOSS_PLOT})", "",
            *_rl_lines(cfg),
            f"Use it: `ownllm chat {run_dir}` or `ownllm merge {run_dir} --out merged/`."]
    atomic_write_text(run_dir / CARD_FILE, "\n".join(card) + "\n")


def _rl_lines(cfg: FinetuneConfig) -> list[str]:
    """Online RL runs: their rewards and the reward/KL/length plot."""
    if cfg.method not in RL_METHODS:
        return []
    from ownllm.finetune.grpo import REWARD_PLOT

    rewards = [f"`{r}`" for r in cfg.reward_fn] + ([f"reward model `{cfg.reward_model}`"] if cfg.reward_model else [])
    return [f"Rewards: {', '.join(rewards)}.", "", f"![reward, KL, completion length]({REWARD_PLOT})", ""]


def _checks_lines(checks: dict[str, dict[str, Any]]) -> list[str]:
    if not checks:
        return []
    lines = ["", "## Before and after (greedy replies)", "",
             "| set | measured | items | base | tuned |", "|---|---|---:|---:|---:|"]
    lines += [f"| {name} | {measured} | {'' if items is None else items} | {base:.0%} | {tuned:.0%} |"
              for name, measured, items, base, tuned in check_rows(checks)]
    return lines


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, axis = plt.subplots(figsize=(7, 4))
    if train:
        axis.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        axis.plot(*zip(*evals, strict=True), "o-", label="validation loss")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "transformers", "peft")}


def _ddp_backend() -> str | None:
    """gloo for CPU processes under torchrun (NCCL, the default, needs GPUs); nothing when alone."""
    import os

    return "gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not has_cuda() else None
