"""One typed config per training run: code defaults, then a YAML file, then command-line overrides.

Unknown YAML keys are an error that names the closest valid key.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from ownllm.data.files import read_text_file
from ownllm.errors import OwnLLMError
from ownllm.finetune.rl_config import HEAD_METHODS, RL_METHODS, place_reward_files, rl_problems

Method = Literal["lora", "qlora", "full", "dpo", "cpt", "prompt-tuning", "grpo", "rloo", "reward"]
METHODS = ("lora", "qlora", "full", "dpo", "cpt", "prompt-tuning", *RL_METHODS, *HEAD_METHODS)
REPLAY_LOSSES = ("kl", "answers")
PRECISIONS = ("auto", "fp32", "bf16")
SEED_MAX = 2**32 - 1  # transformers' set_seed seeds numpy, which takes no more


@dataclass
class LoraSettings:
    r: int = 16  # rank of the update matrices
    alpha: int = 32  # scale: alpha / r
    # 0, as peft's own default: 0.05 kept no more facts or general answers (bench/RESULTS.md), and the masks
    # (random numbers for every input of every adapted layer) cost time: a quarter of LoRA training with torch's
    # dropout on a CPU, ~6% with ownllm's (finetune.lora_dropout)
    dropout: float = 0.0
    targets: str = "all-linear"  # all-linear, or comma-separated module names (q_proj,v_proj)

    def __post_init__(self) -> None:
        problems = _check_types(self, "lora.")
        if not problems:
            if self.r < 1 or self.alpha < 1:
                problems.append("lora.r and lora.alpha must be at least 1")
            if not 0 <= self.dropout < 1:
                problems.append("lora.dropout must be in [0, 1)")
        if problems:
            raise OwnLLMError("; ".join(problems), param="lora")


@dataclass
class FinetuneConfig:
    model: str = "smollm2-135m-instruct"  # base model: alias, folder, .gguf or hub id
    data: str = ""  # training file (any format the data doctor reads)
    validation: str | None = None  # validation file; default: `val_ratio` of `data`, split after dedup
    out: str = "runs/finetune"  # run folder
    method: Method = "lora"  # lora | qlora (4-bit base) | full | dpo (preference pairs, LoRA) | cpt (raw text)
    from_scratch: bool = False  # cpt only: a small randomly initialised model of the base's architecture
    packing: bool = False  # concatenate examples into full max_length rows (no padding waste)
    dpo_beta: float = 0.1
    virtual_tokens: int = 16  # prompt-tuning: learned embeddings put before every prompt
    epochs: float = 3.0
    max_steps: int = -1  # > 0 overrides epochs (0 or less: train by epochs)
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    scheduler: str = "cosine"
    warmup_ratio: float = 0.05
    max_length: int = 512  # longer examples are truncated
    eval_every: int = 20  # steps between validation losses
    save_every: int = 20  # steps between checkpoints
    val_ratio: float = 0.1
    seed: int = 0
    replay: int | None = None  # replay the base's own answers to this many general prompts (0: off) ...
    replay_ratio: float = 2.5  # ... or, with no count given, to this many per training example, at most as many
    # as there are prompts (against forgetting)
    replay_prompts: str | None = None  # one prompt per line; default: general questions shipped with ownllm
    replay_loss: str = "kl"  # kl: match the base's next-token distribution on its answers; answers: its greedy text
    replay_weight: float = 1.0  # the KL replay term's weight against the training data's (kl only)
    replay_passes: float = 0.0  # times each replay row is seen over the whole run (0: once per epoch, like the data)
    replay_tokens: int = 0  # longest replay answer (0: 32 for kl, whose first tokens matter most; 160 for answers)
    precision: str = "auto"  # auto: bf16 mixed precision where this machine measures it faster, else fp32; fp32; bf16
    early_stopping: int = 0  # stop after this many validations without a better loss, keep the best (0: off)
    checks: dict[str, str] = field(default_factory=dict)  # name -> QA JSONL, scored before and after training
    # auto: a LoRA run on fact-style chat data keeps its prompts' embeddings with the adapter, which then answers
    # only prompts close to them, the base model the rest (ownllm.models.scope); off: the adapter answers all
    scope: str = "auto"
    # auto: fact-style chat data is seen under the data's other system messages, or none, every other epoch, so its
    # facts hold under a system message they were not written with; off: as written
    system_variants: str = "auto"
    # auto: a scope keeps the training examples, and an in-scope question gets the nearest of them as earlier turns
    # (ownllm.models.scope, "recall"); off: the scope keeps only the prompts' embeddings
    recall: str = "auto"
    lora: LoraSettings = field(default_factory=LoraSettings)
    # online RL (grpo, rloo; checked in rl_config.py)
    reward_fn: list[str] = field(default_factory=list)  # exact | contains | regex:P | json-valid | json-schema:FILE
    # | sql-exec:DB.sqlite | file.py:function; several are summed
    reward_model: str | None = None  # a reward-model run folder scoring each completion (RLHF)
    rl_beta: float = 0.04  # weight of the KL penalty to the reference model (the model before RL; 0: none)
    num_generations: int = 4  # completions sampled per prompt (the group GRPO/RLOO compares)
    max_completion_length: int = 64  # most tokens per sampled completion
    temperature: float = 1.0  # sampling temperature of the completions
    rollouts: str = "auto"  # who samples them: auto (ownllm's batched engine where it covers the model), ownllm, trl
    reference_guidance: bool = False  # a group none of whose completions earns its reference answer's reward gets
    # the reference in place of one (guidance.py): a gradient where the policy never samples the right answer
    task: str = "generate"  # generate | classify: a classification head + LoRA on {"text", "label"} lines

    def __post_init__(self) -> None:
        problems = _check_types(self)
        if problems:  # the checks below compare numbers
            raise OwnLLMError("; ".join(problems), param="config")
        if self.method not in METHODS:
            problems.append(f"method must be one of {', '.join(METHODS)}, got '{self.method}'")
        if self.from_scratch and self.method != "cpt":
            problems.append("from_scratch goes with method cpt")
        for name in ("batch_size", "grad_accum", "max_length", "eval_every", "save_every"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        if self.lr <= 0 or self.epochs <= 0 or self.dpo_beta <= 0:
            problems.append("lr, epochs and dpo_beta must be positive")
        if self.virtual_tokens < 1:
            problems.append("virtual_tokens must be at least 1")
        if min(self.replay or 0, self.replay_ratio, self.replay_weight, self.replay_passes, self.replay_tokens,
               self.early_stopping) < 0:
            problems.append("replay, replay_ratio, replay_weight, replay_passes, replay_tokens and early_stopping "
                            "must be 0 or more")
        if self.replay_tokens > 1024:
            problems.append(f"replay_tokens must be at most 1024, got {self.replay_tokens}")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {', '.join(PRECISIONS)}, got '{self.precision}'")
        for name in AUTO_OFF:
            if getattr(self, name) not in ("auto", "off"):
                problems.append(f"{name} must be auto or off, got '{getattr(self, name)}'")
        if self.replay_loss not in REPLAY_LOSSES:
            problems.append(f"replay_loss must be one of {', '.join(REPLAY_LOSSES)}, got '{self.replay_loss}'")
        if not isinstance(self.checks, dict) or not all(isinstance(f, str) and f for f in self.checks.values()):
            problems.append("checks must map a name to a question file")
        if not 0 <= self.val_ratio < 1:
            problems.append("val_ratio must be in [0, 1)")
        if self.warmup_ratio < 0:  # below 1: a share of the steps; from 1: a number of steps (transformers)
            problems.append("warmup_ratio must be 0 or more")
        if not 0 <= self.seed <= SEED_MAX:
            problems.append(f"seed must be from 0 to {SEED_MAX}, got {self.seed}")
        if not self.out:
            problems.append("out must name a run folder")
        problems += rl_problems(self)
        if not isinstance(self.lora, LoraSettings):
            problems.append("lora must be a mapping of LoRA settings (r, alpha, dropout, targets)")
        if problems:
            raise OwnLLMError("; ".join(problems), param="config")

    @property
    def replaying(self) -> bool:
        """Replay applies to supervised chat data (not preference pairs, not raw text)."""
        count = self.replay if self.replay is not None else self.replay_ratio
        return bool(count) and self.method not in ("dpo", "cpt", *RL_METHODS, *HEAD_METHODS) and self.task == "generate"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_types(config: Any, prefix: str = "") -> list[str]:
    """Each plain setting has its annotated type (a YAML file can hold anything); floats may be given as whole
    numbers, or as text YAML does not read as a number (2e-4: converted in place), and must be finite."""
    problems = []
    for spec in fields(config):
        name, value = spec.name, getattr(config, spec.name)
        kind = spec.type if isinstance(spec.type, str) else getattr(spec.type, "__name__", "")
        if kind == "float" and not isinstance(value, bool) and isinstance(value, int | float | str):
            try:
                number = float(value)
            except ValueError:
                pass
            else:
                if isinstance(value, str):
                    setattr(config, name, number)
                if not math.isfinite(number):
                    problems.append(f"{prefix}{name} must be a finite number, got {value}")
                continue
        expected = {"int": int, "float": float, "bool": bool, "str": str, "Method": str,
                    "str | None": (str, type(None)), "int | None": (int, type(None))}.get(kind)
        if expected is None:
            continue
        if (isinstance(value, bool) and expected is not bool) or not isinstance(value, expected):
            what = {"int": "a whole number", "int | None": "a whole number", "float": "a number",
                    "bool": "true or false"}.get(kind, "text")
            problems.append(f"{prefix}{name} must be {what}, got {value!r}")
    return problems


def _merge(target: type, values: Any, where: str) -> dict[str, Any]:
    if not isinstance(values, dict):
        raise OwnLLMError(f"{where}: expected a mapping of settings (key: value), got {type(values).__name__}",
                          param="config")
    known = {f.name: f for f in fields(target)}
    merged: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            key = str(key)
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.4)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise OwnLLMError(f"{where}: unknown key '{key}'{hint}", param=key)
        merged[key] = LoraSettings(**_merge(LoraSettings, value, f"{where}.lora")) if key == "lora" else value
    return merged


def _relative_to(folder: Path, values: dict[str, Any]) -> dict[str, Any]:
    """Input files named in a config file are found next to it (the run folder, `out`, is where you are)."""

    def place(name: str) -> str:
        return name if Path(name).is_absolute() else str((folder / name).resolve())

    for key in ("data", "validation", "replay_prompts"):
        if isinstance(values.get(key), str) and values[key]:
            values[key] = place(values[key])
    if isinstance(values.get("checks"), dict):
        values["checks"] = {name: place(str(file)) for name, file in values["checks"].items()}
    return place_reward_files(folder, values)


AUTO_OFF = ("scope", "system_variants", "recall")  # settings that are auto or off


def load_config(path: Path | None = None, **overrides: Any) -> FinetuneConfig:
    """Defaults, then `path` (YAML; input files in it are relative to it), then `overrides` (None values are
    ignored; `lora_r` sets lora.r)."""
    values: dict[str, Any] = {}
    if path is not None:
        if not path.is_file():
            raise OwnLLMError(f"no such config file: {path}", kind="not_found", param="config")
        try:
            loaded = yaml.safe_load(read_text_file(path, param="config"))
        except yaml.YAMLError as exc:
            raise OwnLLMError(f"{path}: not valid YAML ({exc.__class__.__name__})", param="config") from None
        if isinstance(loaded, dict):  # YAML 1.1 reads an unquoted off/on as a boolean
            loaded |= {name: "auto" if loaded[name] else "off" for name in AUTO_OFF
                       if isinstance(loaded.get(name), bool)}
        values = _relative_to(path.parent, _merge(FinetuneConfig, {} if loaded is None else loaded, str(path)))
    lora = values.get("lora", LoraSettings())
    for key, value in overrides.items():
        if value is None:
            continue
        if key.startswith("lora_"):
            lora = LoraSettings(**{**asdict(lora), key.removeprefix("lora_"): value})
        else:
            values.update(_merge(FinetuneConfig, {key: value}, "option"))
    values["lora"] = lora
    return FinetuneConfig(**values)
