"""Fine-tuning jobs: the OpenAI-compatible jobs API, state transitions and submission."""
