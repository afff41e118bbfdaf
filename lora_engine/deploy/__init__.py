"""Deployment: the model as files other runtimes serve (GGUF for llama.cpp and Ollama), and QLoRA merges."""
