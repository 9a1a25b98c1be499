"""Files on disk: atomic writes, the streaming safetensors reader and writer, and the stage cache."""
