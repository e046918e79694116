"""Fine-tune: LoRA and full fine-tuning on your data, with checkpoints, resume, metrics, plots and merge."""
