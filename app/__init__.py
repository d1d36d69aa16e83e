"""tunegate: a self-hosted, OpenAI-compatible control plane for fine-tuning."""

__version__ = "0.1.0"
