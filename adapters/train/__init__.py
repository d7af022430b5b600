"""Offline QLoRA trainer producing servable PEFT adapters."""
