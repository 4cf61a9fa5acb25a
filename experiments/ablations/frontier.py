"""python -m jrlhf.study ablations/frontier --out docs/ablations/frontier

Shows: the reward-KL frontier of DPO, PPO and GRPO on the embedded task, from one SFT model (the
start run, also every arm's KL reference). DPO sweeps beta, PPO and GRPO their KL coefficient.
After each run, `jrlhf.policy_eval` samples 4 answers to each of 256 held-out prompts from the
trained policy (T = 1) and measures the same two numbers for every algorithm: the task's reward
(exact match of the samples, `policy/reward`) and the sequence-level KL to the SFT model
(`policy/kl`, nats per answer). The report draws reward vs KL, one curve per algorithm
(plots/policy-reward-vs-policy-kl.png), and a table (frontier.md); greedy exact match is
`policy/accuracy`. `--seeds 3` repeats every point (mean +- std, error bars). DPO and GRPO
train harder here than their experiments (lr 1e-3 and 2e-4): at those files' learning rates every
point stayed within 0.25 nats of the start and within sampling noise of its reward.
Hardware: 2 CPU cores; wall time and results in docs/ablations/README.md.
`--reduced` is the CI-sized version (tests/test_study.py): two points, a few steps each.
"""

STUDY = {
    "start": {"experiment": "tiny/sft"},
    "common": {"train.progress": False},
    "arms": {
        # RPO-style DPO (tiny/dpo: the sigmoid loss plus the chosen NLL); weaker beta = further.
        "dpo": {"experiment": "tiny/dpo", "init_from": "{start}", "train.export": True,
                "steps": 300, "train.eval_every": 300, "train.checkpoint_every": 300,
                "optim.lr": 1e-3, "algorithm.beta": "0.03,0.1,0.3,1.0"},
        "ppo": {"experiment": "tiny/ppo", "init_from": "{start}", "train.export": True,
                "algorithm.prompts_per_step": 128, "optim.lr": 5e-5, "steps": 100,
                "train.eval_every": 100, "train.checkpoint_every": 100,
                "algorithm.kl_coef": "0.01,0.05,0.2"},
        "grpo": {"experiment": "tiny/grpo", "init_from": "{start}", "train.export": True,
                 "optim.lr": 2e-4, "algorithm.kl_coef": "0.0,0.05,0.3"},
    },
    "seeds": 1,
    "policy_eval": {"prompts": 256, "samples": 4},
    "report": {"xy": ["policy/kl,policy/reward", "policy/kl,policy/accuracy"],
               "series": "algorithm", "keys": "algorithm.beta,algorithm.kl_coef",
               "metrics": "policy/*,eval/accuracy,objective/kl,objective/scores"},
    "reduced": {
        "common": {"train.num_samples": 8, "train.max_new_tokens": 8, "train.log_every": 1},
        "arms": {
            "dpo": {"algorithm.beta": "0.1", "steps": 3, "train.eval_every": 3,
                    "train.checkpoint_every": 3, "data.num_train_examples": 256},
            "grpo": {"algorithm.kl_coef": "0.04", "steps": 2, "train.eval_every": 2,
                     "train.checkpoint_every": 2, "algorithm.prompts_per_step": 4,
                     "algorithm.group_size": 2, "algorithm.max_new_tokens": 8},
        },
        "drop": ["ppo"],
        "start": {"steps": 10, "data.num_train_examples": 256, "train.eval_every": 10,
                  "train.checkpoint_every": 10},
        "policy_eval": {"prompts": 16, "samples": 2, "batch_size": 32},
    },
}
