"""python -m jrlhf.study ablations/peft --out docs/ablations/peft

Shows: full fine-tuning vs LoRA (rank 4, 16) vs QLoRA (NF4, rank 16) vs bottleneck adapters
(Houlsby) vs prompt tuning vs prefix tuning, on SFT and on DPO, all from one partly trained SFT
model (the start run: tiny/sft stopped at 300 steps, well below its 800-step accuracy, so SFT
has something left to learn). Every arm trains the same number of steps at a learning rate
suited to its method (SFT: full 1e-3; LoRA, QLoRA, adapters 3e-3; prompt / prefix 3e-2. DPO,
300 steps of tiny/dpo's RPO loss: full 3e-4; LoRA, QLoRA, adapters 1e-3; prompt / prefix 1e-2).
For DPO the table adds `eval/rewards/accuracies` (held-out pairs ranked right). One table (report.md) gives per run: `eval/accuracy` (greedy exact match on
256 held-out prompts), `params/trainable` and `memory/train_step_gib` (the train step compiled
ahead of time for one CPU device, `plan=cpu`: arguments + outputs + temporaries, donated state
counted once), and `perf/step_time_s` (the last log window, after compilation).
`--seeds 3` repeats every run (mean +- std).
Hardware: 2 CPU cores; wall time and results in docs/ablations/README.md.
"""

_SFT = {"experiment": "tiny/sft", "init_from": "{start}", "steps": 300, "optim.lr": 3e-3,
        "optim.warmup_steps": 20, "train.eval_every": 300, "train.checkpoint_every": 300}
_DPO = {"experiment": "tiny/dpo", "init_from": "{start}", "steps": 300, "optim.lr": 1e-3,
        "optim.warmup_steps": 10, "train.eval_every": 300, "train.checkpoint_every": 300}
_LORA = {"peft": "lora", "peft.rank": "4,16", "peft.alpha": 16.0}
_QLORA = {"peft": "qlora", "peft.rank": 16, "peft.alpha": 16.0}

STUDY = {
    "start": {"experiment": "tiny/sft", "steps": 300, "train.eval_every": 300,
              "train.checkpoint_every": 300},
    "common": {"train.progress": False},
    "arms": {
        "sft-full": {**_SFT, "optim.lr": 1e-3},
        "sft-lora": {**_SFT, **_LORA},
        "sft-qlora": {**_SFT, **_QLORA},
        "sft-adapter": {**_SFT, "peft": "adapter"},
        "sft-prompt": {**_SFT, "peft": "prompt", "optim.lr": 3e-2},
        "sft-prefix": {**_SFT, "peft": "prefix", "optim.lr": 3e-2},
        "dpo-full": {**_DPO, "optim.lr": 3e-4},
        "dpo-lora": {**_DPO, **_LORA},
        "dpo-qlora": {**_DPO, **_QLORA},
        "dpo-adapter": {**_DPO, "peft": "adapter"},
        "dpo-prompt": {**_DPO, "peft": "prompt", "optim.lr": 1e-2},
        "dpo-prefix": {**_DPO, "peft": "prefix", "optim.lr": 1e-2},
    },
    "seeds": 1,
    "plan": "cpu",
    "report": {"metrics": "eval/accuracy,eval/rewards/accuracies,params/trainable,"
                          "memory/train_step_gib,perf/step_time_s",
               "keys": "algorithm,peft,peft.rank,optim.lr"},
}
