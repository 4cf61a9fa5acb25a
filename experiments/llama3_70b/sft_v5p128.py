"""python -m jrlhf.run experiment=llama3_70b/sft_v5p128 run_dir=gs://BUCKET/runs/llama3-70b-sft

Shows: full fine-tuning SFT of Llama-3-70B (every weight trains, AdamW) on UltraChat, the
chat-tuning recipe at pod scale: params, gradients and optimizer state split over all 64 chips
(fsdp), one 2048-token packed row per chip, remat of every layer. The eval loss falls from the
base model's; `eval/perplexity` in metrics.jsonl tracks it.
Hardware: a v5p-128 slice (64 chips, 16 hosts, 95 GiB HBM each); launch on every worker with
tpu_scripts/launch.sh. Check it fits first, on any machine with libtpu:
`python -m jrlhf.run experiment=llama3_70b/sft_v5p128 plan=v5p:4x4x4`.
"""

CONFIG = {
    "algorithm": "sft",
    "init_from": "meta-llama/Meta-Llama-3-70B",
    "data.source": "HuggingFaceH4/ultrachat_200k",
    "data.split": "train_sft",
    "data.tokenizer": "meta-llama/Meta-Llama-3-70B-Instruct",
    "data.max_length": 2048,
    "data.packing": True,
    "data.batch_size": 64,
    # The shape (plans need it without the checkpoint; a run takes it from the checkpoint).
    "model.vocab_size": 128256,
    "model.hidden_size": 8192,
    "model.num_layers": 80,
    "model.num_heads": 64,
    "model.num_kv_heads": 8,
    "model.head_dim": 128,
    "model.mlp_dim": 28672,
    "model.max_position_embeddings": 8192,
    "model.norm_eps": 1e-5,
    "model.rope_theta": 500000.0,
    "model.param_dtype": "bfloat16",
    "model.dtype": "bfloat16",
    "model.remat": "full",
    "mesh.data": 1,
    "mesh.fsdp": 64,
    "mesh.tensor": 1,
    "steps": 2000,
    "optim.lr": 1e-5,
    "optim.warmup_steps": 100,
    "optim.schedule": "cosine",
    "train.eval_every": 200,
    "train.checkpoint_every": 200,
    "train.num_samples": 32,
}
