"""Host-side data: formats, tokenization, chat-template masks, packing and batching (numpy only)."""

from jrlhf.data.config import DataConfig

__all__ = ["DataConfig"]
