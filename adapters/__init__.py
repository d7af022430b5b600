"""LoRA adapters: PEFT format, validation, registry, the multi-LoRA layer and the trainer."""
