"""python -m jrlhf.run experiment=tiny/ppo init_from=runs/tiny-sft,train.export=true/export

Shows: PPO on the embedded task from the tiny SFT model (run `python -m jrlhf.run
experiment=tiny/sft train.export=true` first). Rewards are the task's exact-match scores (give
`algorithm.reward_model=<a tiny/rm run's export>` to score with a reward model instead) minus
the per-token KL to the frozen start; a separate critic starts from the SFT model with a zero
value head. `objective/scores` is the sampled (T = 0.7) accuracy, `objective/kl` the summed KL
to the start per response, `val/ratio` stays near 1, `eval/accuracy` is greedy exact match on
256 held-out prompts. Measured (this file as is): KL to the start 0.1-0.45, val/ratio 0.98-0.99,
value loss 0.18 -> 0.03, but eval/accuracy 0.703 (the SFT start) -> 0.691 (step 30) -> 0.688
(step 60): these settings do not yet improve on the SFT model (GRPO does: tiny/grpo).
Hardware: 2 CPU cores, about 6 minutes.
"""

CONFIG = {
    "algorithm": "ppo",
    "algorithm.prompts_per_step": 32,
    "algorithm.max_new_tokens": 16,
    "algorithm.temperature": 0.7,
    "algorithm.num_ppo_epochs": 4,
    "algorithm.num_mini_batches": 2,
    "algorithm.kl_coef": 0.05,
    "data.source": "tiny",
    "data.tokenizer": "tiny",
    # Prompts are ~20 tokens; a plan (plan=...) takes this as the prompt width.
    "data.max_length": 64,
    "model.hidden_size": 128,
    "model.num_layers": 2,
    "model.num_heads": 4,
    "model.num_kv_heads": 2,
    "model.head_dim": 32,
    "model.mlp_dim": 344,
    "model.max_position_embeddings": 256,
    "steps": 60,
    "optim.lr": 3e-5,
    "optim.warmup_steps": 0,
    "optim.schedule": "constant",
    "optim.weight_decay": 0.0,
    "train.log_every": 10,
    "train.eval_every": 30,
    "train.checkpoint_every": 30,
    "train.num_samples": 256,
}
