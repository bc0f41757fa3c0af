"""Hydra Sweeper plugin for lora_sweep (thin; logic in lora_sweep.sweep)."""
