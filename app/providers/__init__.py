"""Fine-tuning providers: the interface, OpenAI and the OpenAI emulator."""
