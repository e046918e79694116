"""`ownllm finetune` and `ownllm merge`: train on your data, fold a LoRA adapter into its base."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ownllm.cli.options import quiet_model_libraries


def finetune(
    model: Annotated[str | None, typer.Argument(help="base model (alias, folder, .gguf, hub id); default: the "
                                                     "config's")] = None,
    data: Annotated[str | None, typer.Option("--data", help="training file (chat, ShareGPT, Alpaca, "
                                                            "prompt/completion, text)")] = None,
    out: Annotated[str | None, typer.Option("--out", help="run folder (default runs/finetune)")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML config (options below override it)")] = None,
    method: Annotated[str | None, typer.Option(help="lora | qlora | full | dpo | cpt | prompt-tuning | grpo | rloo "
                                                    "| reward")] = None,
    from_scratch: Annotated[bool, typer.Option("--from-scratch", help="cpt: pretrain a small fresh model")] = False,
    packing: Annotated[bool, typer.Option("--packing", help="pack examples into full-length rows")] = False,
    validation: Annotated[str | None, typer.Option(help="validation file (default: split from --data)")] = None,
    val_ratio: Annotated[float | None, typer.Option(help="share of --data held out when no --validation")] = None,
    epochs: Annotated[float | None, typer.Option()] = None,
    max_steps: Annotated[int | None, typer.Option(help="> 0 overrides epochs (0: by epochs)")] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    grad_accum: Annotated[int | None, typer.Option()] = None,
    lr: Annotated[float | None, typer.Option()] = None,
    max_length: Annotated[int | None, typer.Option()] = None,
    eval_every: Annotated[int | None, typer.Option()] = None,
    save_every: Annotated[int | None, typer.Option()] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    lora_r: Annotated[int | None, typer.Option("--lora-r")] = None,
    lora_alpha: Annotated[int | None, typer.Option("--lora-alpha")] = None,
    replay: Annotated[int | None, typer.Option(help="mix in the base's answers to N general prompts (less "
                                                    "forgetting)")] = None,
    replay_ratio: Annotated[float | None, typer.Option(help="... or to R prompts per training example")] = None,
    replay_loss: Annotated[str | None, typer.Option(help="kl: match the base's next-token distribution on its "
                                                         "replay answers; answers: learn their text")] = None,
    scope: Annotated[str | None, typer.Option(help="auto: a LoRA run on fact-style data answers only prompts near "
                                                   "its training prompts, the base the rest | off")] = None,
    system_variants: Annotated[str | None, typer.Option(help="auto: fact-style data with system messages is seen "
                                                             "under the data's others, or none, every other epoch "
                                                             "| off")] = None,
    recall: Annotated[str | None, typer.Option(help="auto: the scope keeps the training examples, and an in-scope "
                                                    "question gets the nearest ones before it | off")] = None,
    precision: Annotated[str | None, typer.Option(help="auto (bf16 mixed precision where measured faster) | "
                                                       "fp32 | bf16")] = None,
    early_stopping: Annotated[int | None, typer.Option(help="stop after N validations without improvement")
                              ] = None,
    reward_fn: Annotated[list[str] | None, typer.Option("--reward-fn", help="grpo/rloo: exact | contains | "
                                                    "regex:PATTERN | json-valid | json-schema:FILE | "
                                                    "sql-exec:DB.sqlite | openai-grader:FILE.json | file.py:function "
                                                    "(repeatable)")] = None,
    reward: Annotated[str | None, typer.Option("--reward", help="grpo/rloo: a reward-model run folder (RLHF)")] = None,
    beta: Annotated[float | None, typer.Option("--beta", help="grpo/rloo: KL penalty weight")] = None,
    num_generations: Annotated[int | None, typer.Option(help="grpo/rloo: completions per prompt")] = None,
    max_completion_length: Annotated[int | None, typer.Option(help="grpo/rloo: most tokens per completion")] = None,
    temperature: Annotated[float | None, typer.Option(help="grpo/rloo: sampling temperature")] = None,
    rollouts: Annotated[str | None, typer.Option(help="grpo/rloo: who samples the completions: auto (ownllm's "
                                                      "batched engine where it covers the model) | ownllm | trl")
                        ] = None,
    reference_guidance: Annotated[bool | None, typer.Option(
        "--reference-guidance/--no-reference-guidance",
        help="grpo/rloo: a prompt none of whose completions earns its reference's reward gets the reference as "
             "one of them")] = None,
    task: Annotated[str | None, typer.Option(help="generate | classify (a classification head on "
                                                  "{text, label} lines)")] = None,
    nproc: Annotated[int, typer.Option("--nproc", min=1, help="training processes (DDP through torchrun)")] = 1,
    resume: Annotated[bool, typer.Option("--resume", help="continue the run folder from its latest checkpoint")
                      ] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an earlier run in --out")] = False,
) -> None:
    """Fine-tune on your data (loss on assistant tokens only), with checkpoints, resume, metrics and a loss plot."""
    from ownllm.finetune.config import load_config

    cfg = load_config(config, model=model, data=data, out=out, method=method, validation=validation,
                      val_ratio=val_ratio, epochs=epochs,
                      max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr, max_length=max_length,
                      eval_every=eval_every, save_every=save_every, seed=seed, lora_r=lora_r, lora_alpha=lora_alpha,
                      from_scratch=from_scratch or None, packing=packing or None, replay=replay,
                      replay_ratio=replay_ratio, replay_loss=replay_loss, precision=precision, scope=scope,
                      system_variants=system_variants, recall=recall,
                      early_stopping=early_stopping, reward_fn=reward_fn or None, reward_model=reward,
                      rl_beta=beta, num_generations=num_generations, max_completion_length=max_completion_length,
                      temperature=temperature, rollouts=rollouts,
                      reference_guidance=reference_guidance, task=task)
    if cfg.method in ("grpo", "rloo") and cfg.data and Path(cfg.data).is_file():
        from ownllm.finetune.grpo import check_rl

        check_rl(cfg, Path(cfg.data))  # a broken reward function or prompt file: exit 2 before a model loads
    elif cfg.task == "classify" and cfg.data and Path(cfg.data).is_file():
        from ownllm.finetune.classify import read_labelled

        read_labelled(Path(cfg.data))  # a line without a label: named before a model loads
    quiet_model_libraries()
    from ownllm.cli.render import checks_table
    from ownllm.cli.render import out as console
    from ownllm.finetune.run import run as run_training  # after the config: its errors come without the wait

    result = run_training(cfg, resume=resume, overwrite=overwrite, processes=nproc)
    evaluation = f", validation loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""
    use = {"reward": "ownllm score", "classify": "ownllm classify"}.get("classify" if cfg.task == "classify"
                                                                       else cfg.method, "ownllm chat")
    console.print(f"{result.steps} steps in {result.seconds:.0f} s, train loss {result.train_loss:.4f}{evaluation}; "
                  f"run folder {result.run_dir} (use it: {use} {result.run_dir})")
    for note in result.notes:  # how it trained where the config left a choice, and the adapter's scope
        console.print(f"[dim]{escape(note)}[/dim]")
    if result.checks:
        console.print(checks_table(result.checks))


def merge(
    run: Annotated[str, typer.Argument(help="a LoRA run folder (or its final/ adapter)")],
    out: Annotated[Path, typer.Option("--out", help="folder for the merged model")],
) -> None:
    """Fold a LoRA adapter into its base model: a standalone model folder with the same outputs."""
    quiet_model_libraries()
    from ownllm.cli.render import out as console
    from ownllm.finetune.merge import merge as merge_run

    console.print(f"merged model: {merge_run(run, out)}")
