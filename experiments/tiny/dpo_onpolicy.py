"""python -m jrlhf.run experiment=tiny/dpo_onpolicy init_from=DIR data.pairs=PAIRS.jsonl

Shows: one round of iterative (on-policy) DPO on the embedded task; the rounds run with
`python -m jrlhf.iterative_dpo --init-from runs/tiny-sft,train.export=true/export --rounds 3
--out runs/tiny-dpo-onpolicy --num-prompts 2000 --k 8` (this experiment is its default). Each
round `jrlhf.onpolicy` samples k=8 answers (T = 1) to 2000 fresh training prompts from the
round's start policy, scores them with the task's exact-match scorer and pairs the best with
the worst (prompts whose 8 answers all tie give no pair); this file is then the round's DPO run
(`data.pairs=` that file, `init_from=` the round's start, which is also its frozen reference),
and its export starts the next round. `eval/accuracy` is greedy exact match on the task's 256
held-out prompts, as in tiny/dpo (noise +-0.03).
Hardware: 2 CPU cores.
"""

CONFIG = {
    "algorithm": "dpo",
    "algorithm.beta": 0.3,
    # The chosen NLL (RPO) keeps DPO from lowering the likelihood of correct answers (tiny/dpo).
    "algorithm.loss": ("sigmoid", "sft"),
    "data.source": "tiny",
    "data.tokenizer": "tiny",
    # Prompts are <= 18 tokens and sampled answers <= 16 (jrlhf.onpolicy's max_new_tokens).
    "data.max_length": 40,
    "data.min_bucket": 40,
    "data.batch_size": 32,
    "steps": 100,
    "optim.lr": 3e-4,
    "optim.warmup_steps": 10,
    "optim.schedule": "cosine",
    "train.log_every": 10,
    "train.eval_every": 100,
    "train.checkpoint_every": 100,
    "train.num_samples": 256,
}
