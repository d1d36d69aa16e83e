"""Fine-tuning providers: the interface, OpenAI, local training and the OpenAI emulator."""
