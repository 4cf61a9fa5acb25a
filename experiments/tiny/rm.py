"""python -m jrlhf.run experiment=tiny/rm init_from=runs/tiny-sft,train.export=true/export

Shows: a reward model (Bradley-Terry, scalar head on the last real token) on the embedded task's
preference pairs (the correct answer vs a near miss the task's scorer rejects), LoRA r=16 on the
tiny SFT model's body plus a zero score head. Runs chain through exports: first
`python -m jrlhf.run experiment=tiny/sft train.export=true`, then this file with `init_from=` the
SFT run's export directory. Measured (2 CPU cores, about 2 minutes): held-out `eval/accuracy`
(chosen scored above rejected, 256 pairs) 0.754 (0.758 at 1200 steps). Full fine-tuning
(`peft=none`) overfits: 0.63 at 150 steps on 4000 pairs, 0.69 at 600, 0.738 at 600 steps on
20000 pairs, then 0.70 at 1500 while train accuracy passes 0.84. A near miss differs from the
answer in one or two characters, so the RM has to redo the task to tell them apart.
With `train.export=true` the RM is written as an HF *ForSequenceClassification checkpoint
(merged) that PPO loads as its reward model.
Hardware: 2 CPU cores, about 2 minutes.
"""

CONFIG = {
    "algorithm": "rm",
    # LoRA generalises better than full fine-tuning here (see above); the score head trains too.
    "peft": "lora",
    "peft.rank": 16,
    "peft.alpha": 32.0,
    "data.source": "tiny",
    "data.tokenizer": "tiny",
    # Near the task's cap (~21.9k prompts): fresh pairs rather than epochs over 4000.
    "data.num_train_examples": 21000,
    "data.max_length": 32,
    "data.min_bucket": 32,
    "data.batch_size": 32,
    "steps": 600,
    "optim.lr": 1e-3,
    "optim.warmup_steps": 10,
    "optim.schedule": "cosine",
    "train.log_every": 10,
    "train.eval_every": 200,
    "train.checkpoint_every": 600,
    "train.num_samples": 0,
}
