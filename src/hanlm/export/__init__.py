"""`hanlm export`: merged safetensors or GGUF for llama.cpp and Ollama, vocabulary pruning."""
