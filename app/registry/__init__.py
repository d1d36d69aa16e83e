"""The models registry: base models per provider and the fine-tuned models jobs made."""
