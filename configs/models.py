"""Model shape presets. Weights come from a checkpoint (`jrlhf.models.from_pretrained`); these
shapes serve random-init runs, benchmarks and ahead-of-time memory plans.

Real shapes are transcribed from the families' published config.json files.
"""

from jrlhf.models import ModelConfig, RopeScaling

# The embedded default: trains and samples in seconds on a laptop CPU.
TINY = ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=16, mlp_dim=172, max_position_embeddings=512)
TINY_GPT2 = ModelConfig(family="gpt2", vocab_size=256, hidden_size=64, num_layers=2,
                        num_heads=4, num_kv_heads=4, head_dim=16, mlp_dim=256,
                        max_position_embeddings=512, norm_eps=1e-5, attention_bias=True,
                        attention_out_bias=True, mlp_bias=True, tie_embeddings=True)
# The benchmark workload of ../shared/PERF_NOTES.md (33.7M params).
SMALL = ModelConfig(vocab_size=8192, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=8,
                    head_dim=64, mlp_dim=1376, max_position_embeddings=2048)

GPT2_SMALL = ModelConfig(family="gpt2", vocab_size=50257, hidden_size=768, num_layers=12,
                         num_heads=12, num_kv_heads=12, head_dim=64, mlp_dim=3072,
                         max_position_embeddings=1024, norm_eps=1e-5, attention_bias=True,
                         attention_out_bias=True, mlp_bias=True, tie_embeddings=True,
                         bos_token_id=50256, eos_token_id=50256)
LLAMA2_7B = ModelConfig(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32,
                        num_kv_heads=32, head_dim=128, mlp_dim=11008,
                        max_position_embeddings=4096, norm_eps=1e-5, bos_token_id=1,
                        eos_token_id=2)
LLAMA2_70B = ModelConfig(vocab_size=32000, hidden_size=8192, num_layers=80, num_heads=64,
                         num_kv_heads=8, head_dim=128, mlp_dim=28672,
                         max_position_embeddings=4096, norm_eps=1e-5, bos_token_id=1,
                         eos_token_id=2)
LLAMA3_8B = ModelConfig(vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32,
                        num_kv_heads=8, head_dim=128, mlp_dim=14336,
                        max_position_embeddings=8192, norm_eps=1e-5, rope_theta=500000.0,
                        bos_token_id=128000, eos_token_id=128001)
LLAMA3_1_8B = ModelConfig(vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32,
                          num_kv_heads=8, head_dim=128, mlp_dim=14336,
                          max_position_embeddings=131072, norm_eps=1e-5, rope_theta=500000.0,
                          rope_scaling=RopeScaling(kind="llama3", factor=8.0,
                                                   original_max_position_embeddings=8192),
                          bos_token_id=128000, eos_token_id=128001)
LLAMA3_70B = ModelConfig(vocab_size=128256, hidden_size=8192, num_layers=80, num_heads=64,
                         num_kv_heads=8, head_dim=128, mlp_dim=28672,
                         max_position_embeddings=8192, norm_eps=1e-5, rope_theta=500000.0,
                         bos_token_id=128000, eos_token_id=128001)
MISTRAL_7B = ModelConfig(family="mistral", vocab_size=32768, hidden_size=4096, num_layers=32,
                         num_heads=32, num_kv_heads=8, head_dim=128, mlp_dim=14336,
                         max_position_embeddings=32768, norm_eps=1e-5, rope_theta=1e6,
                         bos_token_id=1, eos_token_id=2)
QWEN2_5_7B = ModelConfig(family="qwen2", vocab_size=152064, hidden_size=3584, num_layers=28,
                         num_heads=28, num_kv_heads=4, head_dim=128, mlp_dim=18944,
                         max_position_embeddings=32768, norm_eps=1e-6, rope_theta=1e6,
                         attention_bias=True, bos_token_id=151643, eos_token_id=151645)
QWEN3_8B = ModelConfig(family="qwen3", vocab_size=151936, hidden_size=4096, num_layers=36,
                       num_heads=32, num_kv_heads=8, head_dim=128, mlp_dim=12288,
                       max_position_embeddings=40960, norm_eps=1e-6, rope_theta=1e6,
                       qk_norm=True, bos_token_id=151643, eos_token_id=151645)

PRESETS = {
    "tiny": TINY, "tiny_gpt2": TINY_GPT2, "small": SMALL, "gpt2": GPT2_SMALL,
    "llama2_7b": LLAMA2_7B, "llama2_70b": LLAMA2_70B, "llama3_8b": LLAMA3_8B,
    "llama3_1_8b": LLAMA3_1_8B, "llama3_70b": LLAMA3_70B, "mistral_7b": MISTRAL_7B,
    "qwen2_5_7b": QWEN2_5_7B, "qwen3_8b": QWEN3_8B,
}
