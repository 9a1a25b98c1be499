"""Models: loading from settings (demo names, folders, GGUF files, hub ids) and the demo zoo."""
