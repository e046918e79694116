"""Clients of a running server, over HTTP: the jobs API (`ownllm jobs`) and a load test (`ownllm bench serve`).

They import nothing server-side (no fastapi, no torch, no ownllm.serve or ownllm.jobs): a client starts fast and
runs on a machine without the model stack's weight.
"""
