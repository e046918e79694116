"""lm-evaluation-harness on a local model, through ownllm's engine, on task YAMLs with local data.

Task YAMLs may name data files relative to themselves (`dataset_kwargs.data_files`); they are rewritten
to absolute paths in a temporary include folder, so no dataset is ever fetched.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from ownllm.errors import OwnLLMError
from ownllm.generate.engine import Engine
from ownllm.generate.params import SamplingParams


def _harness_lm(engine: Engine) -> Any:
    from lm_eval.api.model import LM

    class OwnLLMHarnessLM(LM):
        """lm-eval's model interface over an ownllm engine (transformers backend)."""

        def __init__(self) -> None:
            super().__init__()
            self.engine = engine
            self.model = getattr(engine, "model", None)
            if self.model is None:
                raise OwnLLMError("harness tasks need the transformers backend", kind="unsupported")

        def _score(self, context_ids: list[int], continuation_ids: list[int]) -> tuple[float, bool]:
            ids = (context_ids + continuation_ids)[-engine.context_length:]
            n = len(continuation_ids)
            with torch.inference_mode(), engine.scoring(context_ids):
                logits = self.model(input_ids=torch.tensor([ids], device=engine.device)).logits[0].float().cpu()
            logprobs = torch.log_softmax(logits[-n - 1 : -1], dim=-1)
            targets = torch.tensor(ids[-n:])
            total = float(logprobs.gather(1, targets[:, None]).sum())
            return total, bool((logprobs.argmax(-1) == targets).all())

        def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
            out = []
            for request in requests:
                context, continuation = request.args
                whole = engine.tokenizer(context + continuation).input_ids
                context_ids = engine.tokenizer(context).input_ids if context else whole[:1]
                out.append(self._score(context_ids, whole[len(context_ids):] or whole[-1:]))
            return out

        def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
            from ownllm.evaluate.perplexity import Document, _document_nll

            out = []
            for request in requests:
                ids = engine.tokenizer(request.args[0]).input_ids
                nll, _ = _document_nll(self.model, engine.device, Document(ids, [True] * len(ids)),
                                       min(engine.context_length, 1024), 512, None)
                out.append(-nll)
            return out

        def generate_until(self, requests: list[Any]) -> list[str]:
            out = []
            for request in requests:
                context, kwargs = request.args
                until = kwargs.get("until") or []
                params = SamplingParams(max_new_tokens=int(kwargs.get("max_gen_toks", 64)),
                                        stop=[until] if isinstance(until, str) else list(until))
                out.append(engine.generate(context, params).text)
            return out

    return OwnLLMHarnessLM()


def _localise(task_files: list[Path], folder: Path) -> list[str]:
    """Copy task YAMLs into `folder` with their data files made absolute; return the task names."""
    names = []
    for path in task_files:
        try:
            config = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise OwnLLMError(f"{path}: not valid YAML ({exc.__class__.__name__})", param="tasks") from None
        if not isinstance(config, dict) or "task" not in config:
            raise OwnLLMError(f"{path}: a task YAML needs a 'task' name", param="tasks")
        files = (config.get("dataset_kwargs") or {}).get("data_files")
        if isinstance(files, dict):
            for split, name in files.items():
                resolved = (path.parent / name).resolve()
                if not resolved.is_file():
                    raise OwnLLMError(f"{path}: data file {name} for split '{split}' not found", param="tasks")
                files[split] = str(resolved)
        (folder / path.name).write_text(yaml.safe_dump(config), encoding="utf-8")
        names.append(config["task"])
    return names


def run_harness(engine: Engine, tasks: list[str], *, limit: int | None = None) -> dict[str, Any]:
    """Run harness tasks: paths to task YAMLs (local data) or task names already known to lm-eval
    whose data is cached locally. Returns lm-eval's `results` per task."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    yaml_files = [Path(t) for t in tasks if t.endswith((".yaml", ".yml"))]
    for path in yaml_files:
        if not path.is_file():
            raise OwnLLMError(f"no such task file: {path}", kind="not_found", param="tasks")
    with tempfile.TemporaryDirectory(prefix="ownllm-tasks-") as folder:
        names = _localise(yaml_files, Path(folder)) + [t for t in tasks if not t.endswith((".yaml", ".yml"))]
        manager = TaskManager(include_path=folder)
        unknown = [n for n in names if n not in manager.all_tasks]
        if unknown:
            raise OwnLLMError(f"unknown harness task(s): {', '.join(unknown)}", param="tasks",
                              hint="pass a task YAML whose data files are local (see examples/eval/)")
        results = lm_eval.simple_evaluate(model=_harness_lm(engine), tasks=names, task_manager=manager,
                                          limit=limit, log_samples=False)
    return results["results"]
