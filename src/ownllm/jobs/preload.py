"""What the job workers' forkserver imports once (ownllm/jobs/spawn.py): torch, transformers and peft, which every
worker needs and no import of which starts a thread, with the garbage collector paused and what they create frozen
(ownllm/collector.py). Only the forkserver imports this module; each worker forked from it inherits the result."""

from ownllm.collector import import_at_start

import_at_start("torch", "transformers", "peft", "ownllm.jobs.worker")
