"""Talk to a model: the chat template, chat fine-tuning data, the terminal chat (docs/chat_and_serving.md)."""
