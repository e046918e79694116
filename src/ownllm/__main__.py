from ownllm.cli import run

run()
