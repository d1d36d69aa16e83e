"""The local fine-tuning provider: LoRA training and inference on CPU with torch + PEFT."""
