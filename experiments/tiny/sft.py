"""python -m jrlhf.run experiment=tiny/sft

Shows: full fine-tuning SFT of a tiny random-init Llama on the embedded instruction task
(small verifiable tasks in a chat format, built into jrlhf.data, no downloads). The loss falls,
and the exact-match accuracy of sampled answers to held-out prompts (`eval/accuracy` in
metrics.jsonl) ends far above chance. The last lines print where the metrics, samples and
checkpoint are.
Hardware: 2 CPU cores, about 3 minutes. Compare settings with e.g.
`python -m jrlhf.run -m experiment=tiny/sft optim.lr=1e-3,3e-3`, then
`python -m jrlhf.report runs/tiny-sft,optim.lr=*`.
"""

CONFIG = {
    "algorithm": "sft",
    "data.source": "tiny",
    "data.tokenizer": "tiny",
    # Packing ~5 short chats per 128-token row: ~80 examples per step, one compiled shape.
    "data.max_length": 128,
    "data.min_bucket": 128,
    "data.packing": True,
    "data.batch_size": 16,
    "model.hidden_size": 128,
    "model.num_layers": 2,
    "model.num_heads": 4,
    "model.num_kv_heads": 2,
    "model.head_dim": 32,
    "model.mlp_dim": 344,
    "model.max_position_embeddings": 256,
    "steps": 800,
    "optim.lr": 3e-3,
    "optim.warmup_steps": 50,
    "optim.schedule": "cosine",
    "optim.weight_decay": 0.0,
    "train.log_every": 20,
    "train.eval_every": 400,
    "train.checkpoint_every": 400,
    "train.num_samples": 256,
}
