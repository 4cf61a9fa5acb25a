"""python -m jrlhf.run experiment=llama3_8b/rm_hh_v5p8 run_dir=gs://BUCKET/runs/llama3-8b-rm-hh

Shows: a Bradley-Terry reward model on Anthropic's HH-RLHF (helpful and harmless transcripts,
`train` 161k pairs, held out on `test`), full fine-tuning of Llama-3-8B-Instruct with a zero
scalar head on the last real token, one epoch at 64 pairs per step, reward centering 0.01.
The transcripts become chat messages (the shared turns are the prompt); pairs longer than 1024
tokens are dropped and counted, never cut. Held-out `eval/accuracy` (chosen scored above
rejected) rises from 0.5 to roughly 0.65-0.70, the range published 7-8B HH RMs reach (the
labels are noisy). `train.export=true` writes a LlamaForSequenceClassification checkpoint that
PPO loads as its reward model.
Hardware: a TPU v5p-8 slice (4 chips, one host, 95 GiB HBM each): weights, gradients and AdamW
state split over the 4 chips (fsdp). On one 80 GB GPU full fine-tuning does not fit; see
experiment=llama3_8b/rm_hh_gpu80 (LoRA). Check it fits first, on any machine with libtpu:
`python -m jrlhf.run experiment=llama3_8b/rm_hh_v5p8 plan=v5p:2x2x1`.
"""

CONFIG = {
    "algorithm": "rm",
    "algorithm.center_rewards_coefficient": 0.01,
    "init_from": "meta-llama/Meta-Llama-3-8B-Instruct",
    "data.source": "Anthropic/hh-rlhf",
    "data.split": "train",
    "data.eval_split": "test",
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
    "steps": 2500,
    "optim.lr": 1e-5,
    "optim.warmup_steps": 100,
    "optim.schedule": "cosine",
    "optim.grad_accum": 4,  # 64 pairs per optimizer step
    "train.eval_batches": 64,  # the first 1024 held-out pairs per eval
    "train.eval_every": 250,
    "train.checkpoint_every": 250,
    "train.num_samples": 0,  # a reward model is judged by eval/accuracy, not by sampling
}
