"""`hanlm export`: merged safetensors or GGUF for llama.cpp and Ollama, vocabulary pruning."""

from hanlm.stage import Command

COMMANDS = (
    Command(
        "export",
        "hanlm.export.export",
        "ExportConfig",
        "merge LoRA, prune the vocabulary, write safetensors or GGUF (llama.cpp), check parity",
        positional="model.path",
        usage="MODEL_DIR",
    ),
)
