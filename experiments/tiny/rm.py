"""python -m jrlhf.run experiment=tiny/rm init_from=runs/tiny-sft,train.export=true/export

Shows: a reward model (Bradley-Terry, scalar head on the last real token) on the embedded task's
preference pairs (the correct answer vs a near miss the task's scorer rejects), its body started
from the tiny SFT model and a zero score head. Runs chain through exports: first
`python -m jrlhf.run experiment=tiny/sft train.export=true`, then this file with `init_from=` the
SFT run's export directory. The held-out `eval/accuracy` (chosen scored above rejected) ends
high; with `train.export=true` the RM is written as an HF *ForSequenceClassification checkpoint
that PPO loads as its reward model. `peft=lora` trains LoRA plus the score head.
Hardware: 2 CPU cores, a few minutes.
"""

CONFIG = {
    "algorithm": "rm",
    "data.source": "tiny",
    "data.tokenizer": "tiny",
    "data.num_train_examples": 4000,
    "data.max_length": 32,
    "data.min_bucket": 32,
    "data.batch_size": 32,
    "steps": 150,
    "optim.lr": 1e-3,
    "optim.warmup_steps": 10,
    "optim.schedule": "cosine",
    "train.log_every": 10,
    "train.eval_every": 150,
    "train.checkpoint_every": 150,
    "train.num_samples": 0,
}
