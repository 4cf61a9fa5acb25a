"""python -m jrlhf.run experiment=llama2_7b/qlora_sft_gpu16

Shows: QLoRA SFT of Llama-2-7B on the OpenAssistant Guanaco data with the QLoRA paper's
recipe (NF4 base with double-quantized scales, LoRA r=64 alpha=16 dropout 0.1 on every linear
layer, lr 2e-4 constant, 16 sequences per step by gradient accumulation). The eval loss falls
within a few hundred steps; `train.export=true` writes the adapter in PEFT's format.
Hardware: one 16 GB GPU. Check it fits first (no GPU needed):
`python -m jrlhf.run experiment=llama2_7b/qlora_sft_gpu16 plan=gpu:16GB`.
"""

CONFIG = {
    "algorithm": "sft",
    "init_from": "meta-llama/Llama-2-7b-hf",
    "peft": "qlora",
    "peft.rank": 64,
    "peft.alpha": 16.0,
    "peft.dropout": 0.1,
    "data.source": "timdettmers/openassistant-guanaco",
    "data.tokenizer": "meta-llama/Llama-2-7b-hf",
    "data.max_length": 1024,
    "data.batch_size": 1,
    # The shape (plans need it without the checkpoint; a run takes it from the checkpoint).
    "model.vocab_size": 32000,
    "model.hidden_size": 4096,
    "model.num_layers": 32,
    "model.num_heads": 32,
    "model.num_kv_heads": 32,
    "model.head_dim": 128,
    "model.mlp_dim": 11008,
    "model.max_position_embeddings": 4096,
    "model.norm_eps": 1e-5,
    "model.param_dtype": "bfloat16",
    "model.dtype": "bfloat16",
    "model.remat": "full",
    "steps": 1875,
    "optim.lr": 2e-4,
    "optim.schedule": "constant",
    "optim.warmup_steps": 0,
    "optim.grad_accum": 16,
    "optim.max_grad_norm": 0.3,
    "train.eval_every": 200,
    "train.checkpoint_every": 200,
    "train.num_samples": 16,
}
