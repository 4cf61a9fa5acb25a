"""Flax decoder LMs (Llama 2/3, Mistral, Qwen2/2.5, Qwen3, GPT-2), HF checkpoint io, sampling."""

from jrlhf.models.config import ModelConfig, RopeScaling
from jrlhf.models.transformer import KVCache, Transformer

__all__ = ["KVCache", "ModelConfig", "RopeScaling", "Transformer"]
