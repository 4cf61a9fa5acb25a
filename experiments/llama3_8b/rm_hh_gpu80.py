"""python -m jrlhf.run experiment=llama3_8b/rm_hh_gpu80

Shows: a Bradley-Terry reward model on Anthropic's HH-RLHF (`train` 161k pairs, held out on
`test`) from Llama-3-8B-Instruct on one GPU: LoRA r=16 on every linear layer plus the scalar
head (the head always trains), TRL's LoRA reward-model lr 1e-4, reward centering 0.01, one epoch
at 64 pairs per step. Pairs longer than 1024 tokens are dropped and counted. Held-out
`eval/accuracy` rises from 0.5 to roughly 0.65 (HH's labels are noisy). `train.export=true`
writes the adapter and a merged LlamaForSequenceClassification checkpoint for PPO
(`peft.export=both`).
Hardware: one 80 GB GPU (A100/H100): the bf16 base (16 GB) stays frozen, 8 pairs per micro-batch
and 8 micro-batches per step. Full fine-tuning (AdamW state for 8B weights) needs the TPU v5p-8
of experiment=llama3_8b/rm_hh_v5p8. Check it fits first (no GPU needed):
`python -m jrlhf.run experiment=llama3_8b/rm_hh_gpu80 plan=gpu:80GB`.
"""

CONFIG = {
    "algorithm": "rm",
    "algorithm.center_rewards_coefficient": 0.01,
    "init_from": "meta-llama/Meta-Llama-3-8B-Instruct",
    "peft": "lora",
    "peft.rank": 16,
    "peft.alpha": 32.0,
    "peft.dropout": 0.05,
    "peft.export": "both",
    "data.source": "Anthropic/hh-rlhf",
    "data.split": "train",
    "data.eval_split": "test",
    "data.tokenizer": "meta-llama/Meta-Llama-3-8B-Instruct",
    "data.max_length": 1024,
    "data.batch_size": 8,  # pairs per micro-batch: 16 rows
    # The shape (plans need it without the checkpoint; a run takes it from the checkpoint).
    "model.vocab_size": 128256,
    "model.hidden_size": 4096,
    "model.num_layers": 32,
    "model.num_heads": 32,
    "model.num_kv_heads": 8,
    "model.head_dim": 128,
    "model.mlp_dim": 14336,
    "model.max_position_embeddings": 8192,
    "model.norm_eps": 1e-5,
    "model.rope_theta": 500000.0,
    "model.param_dtype": "bfloat16",
    "model.dtype": "bfloat16",
    "model.remat": "full",
    "mesh.data": 1,
    "mesh.fsdp": 1,
    "mesh.tensor": 1,
    "steps": 2500,
    "optim.lr": 1e-4,
    "optim.warmup_steps": 100,
    "optim.schedule": "cosine",
    "optim.grad_accum": 8,  # 64 pairs per optimizer step
    "train.eval_batches": 128,  # the first 1024 held-out pairs per eval
    "train.eval_every": 250,
    "train.checkpoint_every": 250,
    "train.num_samples": 0,  # a reward model is judged by eval/accuracy, not by sampling
}
