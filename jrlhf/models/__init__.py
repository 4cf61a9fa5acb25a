"""Flax decoder LMs (Llama 2/3, Mistral, Qwen2/2.5, Qwen3, GPT-2), HF checkpoint io, sampling."""

from jrlhf.models.config import ModelConfig, RopeScaling
from jrlhf.models.hf import from_pretrained, save_pretrained
from jrlhf.models.transformer import KVCache, Transformer

__all__ = [
    "KVCache", "ModelConfig", "RopeScaling", "Transformer", "from_pretrained", "save_pretrained",
]
