"""python -m jrlhf.run experiment=llama3_8b/dpo_qlora_v5p8 run_dir=gs://BUCKET/runs/llama3-8b-dpo

Shows: DPO with QLoRA on Llama-3-8B-Instruct and UltraFeedback (binarized: the highest-rated
response against a lower-rated one), the Zephyr recipe's beta 0.01 and one epoch of
`train_prefs` (61k pairs, 64 per step), held out on `test_prefs`. The base is NF4 with LoRA
r=64 on every linear layer; the reference is that same 4-bit base without the adapter (no second
copy of the model). `rewards/accuracies` climbs from 0.5 towards ~0.7 and `rewards/margins`
grows while `eval/loss` falls below log 2 = 0.693. `algorithm.precompute_ref=true` runs the
reference once before training instead of in every step. `train.export=true` writes the
adapter in PEFT's format.
Hardware: a TPU v5p-8 slice (4 chips, one host, 95 GiB HBM each); the same run on one 80 GB GPU
is experiment=llama3_8b/dpo_qlora_gpu80. Check it fits first, on any machine with libtpu:
`python -m jrlhf.run experiment=llama3_8b/dpo_qlora_v5p8 plan=v5p:2x2x1`.
"""

CONFIG = {
    "algorithm": "dpo",
    "algorithm.beta": 0.01,
    "algorithm.loss": ("sigmoid",),
    "init_from": "meta-llama/Meta-Llama-3-8B-Instruct",
    "peft": "qlora",
    "peft.rank": 64,
    "peft.alpha": 16.0,
    "peft.dropout": 0.05,
    "data.source": "HuggingFaceH4/ultrafeedback_binarized",
    "data.split": "train_prefs",
    "data.eval_split": "test_prefs",
    "data.tokenizer": "meta-llama/Meta-Llama-3-8B-Instruct",
    "data.max_length": 1024,
    "data.batch_size": 16,  # pairs per micro-batch: 32 rows, 8 per chip
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
    "mesh.fsdp": 4,
    "mesh.tensor": 1,
    "steps": 955,
    "optim.lr": 5e-6,
    "optim.warmup_steps": 95,
    "optim.schedule": "cosine",
    "optim.grad_accum": 4,  # 64 pairs per optimizer step
    "train.eval_batches": 32,  # the first 512 held-out pairs per eval
    "train.eval_every": 100,
    "train.checkpoint_every": 100,
    "train.num_samples": 0,  # UltraFeedback has no exact answers to match
}
