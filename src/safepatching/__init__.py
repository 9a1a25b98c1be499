"""SafePatching: post safety alignment of chat LLMs."""

__version__ = "0.1.0"
