"""Writers of artifacts: GGUF for llama.cpp."""
