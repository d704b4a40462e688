"""An OpenAI-compatible HTTP server for a model, with streaming and a chat page (docs/chat_and_serving.md)."""
