"""OpenAI-compatible inference: chat completions for base and fine-tuned models."""
