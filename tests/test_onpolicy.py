"""On-policy pairs and iterative DPO: pairing rules, prompts encoded as the DPO reader encodes
them, sampled pairs whose chosen side scores above the rejected one (by a policy model and a
reward function or a reward model), the file read back by the preference reader, and the
rounds' chaining and resume."""

import json
import math
import os
import subprocess
import sys

import datasets
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jrlhf import iterative_dpo, onpolicy
from jrlhf.data import DataConfig, Encoder, load_preference_data, load_tokenizer, preference
from jrlhf.models import ModelConfig, Transformer, save_pretrained
from jrlhf.onpolicy import PairSettings, make_pairs


@pytest.fixture(autouse=True)
def _local_caches(tmp_path_factory, monkeypatch):
  """The tiny tokenizer and `datasets` caches under pytest's tmp dir, never the home dir."""
  root = tmp_path_factory.getbasetemp()
  monkeypatch.setenv("JRLHF_CACHE", str(root / "jrlhf_cache"))
  monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", root / "hf_datasets")
  monkeypatch.setenv("HF_DATASETS_CACHE", str(root / "hf_datasets"))  # the child processes


def test_best_worst_pairs_the_highest_with_the_lowest_score():
  texts = [["a", "b", "c", "d"], ["e", "f", "g", "h"]]
  scores = np.array([[0.2, 0.9, 0.1, 0.5], [3.0, -1.0, 2.0, 0.0]])
  pairs, unpaired = make_pairs(texts, scores, "best_worst")
  assert pairs == [(0, 1, 2), (1, 0, 1)] and unpaired == 0


def test_ties_give_no_pair_and_are_counted():
  texts = [["a", "b", "c"], ["d", "e", "f"], ["g", "h", "i"]]
  scores = np.array([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
  pairs, unpaired = make_pairs(texts, scores, "best_worst")
  assert pairs == [(1, 1, 0)] and unpaired == 2
  # A gap below the margin counts as a tie.
  assert make_pairs(texts[1:2], scores[1:2] * 0.5, "best_worst", margin=0.6) == ([], 1)


def test_margin_mode_keeps_every_pair_far_enough_apart():
  texts = [["lo", "mid", "hi"]]
  scores = np.array([[0.0, 0.5, 1.0]])
  pairs, _ = make_pairs(texts, scores, "margin", margin=0.5)
  assert sorted(pairs) == [(0, 1, 0), (0, 2, 0), (0, 2, 1)]
  assert make_pairs(texts, scores, "margin", margin=0.6) == ([(0, 2, 0)], 0)
  assert make_pairs(texts, scores, "margin", margin=1.5) == ([], 1)


def test_margin_mode_pairs_each_distinct_text_pair_once_and_skips_nan():
  texts = [["right", "right", "wrong", ""]]
  scores = np.array([[1.0, 1.0, 0.0, math.nan]])
  pairs, _ = make_pairs(texts, scores, "margin")
  assert pairs == [(0, 0, 2)]
  # NaN (an empty response) is never the worst, though min() over raw floats could pick it.
  assert make_pairs(texts, scores, "best_worst")[0] == [(0, 0, 2)]


def test_bad_modes_and_shapes_are_refused():
  with pytest.raises(ValueError, match="not one of"):
    make_pairs([["a", "b"]], np.zeros((1, 2)), "all")
  with pytest.raises(ValueError, match="P x K"):
    make_pairs([["a", "b"]], np.zeros((1, 3)))
  with pytest.raises(ValueError, match="k=1"):
    PairSettings(k=1)


def test_prompts_of_every_row_kind_and_their_tokens_match_the_dpo_reader():
  tok = load_tokenizer("tiny")
  encoder = Encoder(tok)
  chat = {"messages": [{"role": "user", "content": "sort 321"},
                       {"role": "assistant", "content": "123"}]}
  prompt, reference = onpolicy.prompt_of(chat)
  assert prompt == chat["messages"][:1] and reference == "123"
  assert onpolicy.prompt_of({"prompt": "2+2=", "completion": "4"}) == ("2+2=", "4")
  assert onpolicy.prompt_of({"prompt": "q"}) == ("q", None)
  assert onpolicy.prompt_of({"prompt": "p: ", "chosen": "a", "rejected": "b"}) == ("p: ", "a")
  with pytest.raises(onpolicy.MalformedRow):
    onpolicy.prompt_of({"text": "no prompt here"})
  for prompt, text in ((chat["messages"][:1], "132"), ("2+2=", "5")):
    row = {"prompt": prompt, "chosen": onpolicy.as_response(prompt, text),
           "rejected": onpolicy.as_response(prompt, text + "9")}
    data, _ = preference.tokenize_pairs([row], encoder, max_length=64)
    start = data.chosen.prompt_length(0)
    np.testing.assert_array_equal(onpolicy.prompt_tokens(encoder, prompt),
                                  data.chosen.tokens[0][:start])


def _export(directory, head="lm", seed=0):
  tok = load_tokenizer("tiny")
  model = Transformer(ModelConfig(vocab_size=len(tok), hidden_size=32, num_heads=2,
                                  num_kv_heads=1, head_dim=16, mlp_dim=64,
                                  max_position_embeddings=128), head=head)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32)))[
      "params"]
  save_pretrained(directory, model, params)
  return str(directory)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
  return _export(tmp_path_factory.mktemp("policy"))


def digit_reward(text: str, reference: str) -> float:
  """Deterministic and varied on a random model's output: digits in common with the answer."""
  return float(sum(c in reference for c in text)) - 0.1 * len(text)


def _read(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("mode", ["best_worst", "margin"])
def test_on_policy_pairs_prefer_the_higher_score_and_load_for_dpo(policy_dir, tmp_path, mode):
  cfg = DataConfig(num_train_examples=300, num_eval_examples=16, max_length=40)
  out = tmp_path / "pairs.jsonl"
  settings = PairSettings(num_prompts=24, k=4, max_new_tokens=6, batch_size=32, mode=mode)
  summary = onpolicy.generate_pairs(policy_dir, cfg, out, settings, reward_fn=digit_reward)
  rows = _read(out)
  assert summary["pairs"] == len(rows) > 0
  assert summary["prompts"] == 24 and summary["samples"] == 96
  assert summary == json.loads(onpolicy.summary_path(out).read_text())
  for row in rows:
    prompt = row["prompt"][0]["content"]
    chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
    assert row["score_chosen"] > row["score_rejected"]
    # Rescored from the written texts: the scores belong to these responses.
    reference = str(sum(map(int, prompt[4:].split("+")))) if prompt.startswith("add") else None
    if reference is not None:
      assert math.isclose(digit_reward(chosen, reference), row["score_chosen"])
      assert math.isclose(digit_reward(rejected, reference), row["score_rejected"])
  if mode == "best_worst":
    assert len({json.dumps(r["prompt"]) for r in rows}) == len(rows)  # one pair per prompt
    assert summary["pairs"] + summary["prompts_without_pair"] == 24
  train, eval_, stats = load_preference_data(
      DataConfig(pairs=str(out), num_eval_examples=16, max_length=40), load_tokenizer("tiny"))
  assert len(train) == len(rows) and stats.train.skipped == 0
  assert len(eval_) == 16  # held-out pairs still come from the tiny task


def test_the_cli_scores_prompt_only_rows_with_a_reward_model(policy_dir, tmp_path, capsys):
  rm_dir = _export(tmp_path / "rm", head="scalar", seed=1)
  out = tmp_path / "pairs.jsonl"
  # A prompt-only source: no reference answers, which only a reward model can do without.
  source = tmp_path / "prompts.jsonl"
  source.write_text("".join(json.dumps({"prompt": f"say {w}"}) + "\n"
                            for w in ("ab", "cd", "ef", "gh", "ij", "kl", "mn", "op", "qr")))
  argv = ["--policy", policy_dir, "--out", str(out), "--num-prompts", "8", "--k", "4",
          "--max-new-tokens", "6", "--batch-size", "32", f"data.source={source}",
          "data.max_length=40", "data.eval_fraction=0.0"]
  assert onpolicy.main(argv + ["--reward-model", rm_dir]) == 0
  summary, rows = json.loads(onpolicy.summary_path(out).read_text()), _read(out)
  assert summary["reward"] == rm_dir and summary["prompts"] == 8
  assert len(rows) == summary["pairs"] > 0
  assert all(r["score_chosen"] > r["score_rejected"] for r in rows)
  assert all(isinstance(r["prompt"], str) and isinstance(r["chosen"], str) for r in rows)
  assert onpolicy.main(argv) == 2  # no reward function for this source, and no reward model
  assert "--reward-model" in capsys.readouterr().err
  assert onpolicy.main(argv + ["steps=3"]) == 2
  assert "only data.* keys" in capsys.readouterr().err


class FakeRounds:
  """Stands in for the two child processes: writes what each would write, records the calls."""

  def __init__(self, accuracy=0.5):
    self.calls, self.accuracy = [], accuracy

  def __call__(self, args):
    self.calls.append(args)
    if args[0] == "jrlhf.onpolicy":
      out = args[args.index("--out") + 1]
      with open(out, "w") as f:
        f.write(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
      onpolicy.summary_path(out).write_text(json.dumps(
          {"pairs": 1, "prompts": 1, "prompts_without_pair": 0, "mean_score": 0.25}))
    else:
      keys = dict(a.split("=", 1) for a in args[1:])
      run_dir = keys["run_dir"]
      os.makedirs(f"{run_dir}/export", exist_ok=True)
      open(f"{run_dir}/export/config.json", "w").write("{}")
      self.accuracy += 0.1
      with open(f"{run_dir}/metrics.jsonl", "w") as f:
        f.write(json.dumps({"step": 3, "loss": 0.5}) + "\n")
        f.write(json.dumps({"step": 3, "eval/accuracy": self.accuracy}) + "\n")
    return 0


def test_rounds_chain_policies_and_a_rerun_skips_finished_rounds(tmp_path, policy_dir):
  fake = FakeRounds()
  out = tmp_path / "it"
  argv = ["--init-from", policy_dir, "--out", str(out), "--rounds", "2", "--seed", "5",
          "--k", "3", "steps=3", "data.max_length=48"]
  assert iterative_dpo.main(argv, command=fake) == 0
  gen0, dpo0, gen1, dpo1 = fake.calls
  assert gen0[gen0.index("--policy") + 1] == policy_dir
  assert gen1[gen1.index("--policy") + 1] == str(out / "round-0" / "export")
  assert [g[g.index("--seed") + 1] for g in (gen0, gen1)] == ["5", "6"]  # new prompts
  assert gen0[gen0.index("--k") + 1] == "3"
  # Prompts come from the DPO runs' data config; other keys only reach the DPO runs.
  assert gen0[gen0.index("--experiment") + 1] == "tiny/dpo_onpolicy"
  assert "data.max_length=48" in gen0 and "steps=3" not in gen0
  assert "data.max_length=48" in dpo0
  assert f"init_from={out / 'round-0' / 'export'}" in dpo1
  assert f"data.pairs={out / 'round-1' / 'pairs.jsonl'}" in dpo1 and "steps=3" in dpo1
  assert "experiment=tiny/dpo_onpolicy" in dpo0 and "train.export=true" in dpo0
  rows = json.loads((out / "summary.json").read_text())
  assert [(r["round"], r["pairs"]) for r in rows] == [(0, 1), (1, 1)]
  assert [round(r["eval/accuracy"], 6) for r in rows] == [0.6, 0.7]
  assert (out / "summary.md").read_text().count("\n") == 4  # header, rule, two rounds
  rerun = FakeRounds()
  assert iterative_dpo.main(argv + [], command=rerun) == 0 and rerun.calls == []
  # A third round resumes from round 1's export.
  assert iterative_dpo.main([*argv[:5], "3", *argv[6:]], command=rerun) == 0
  assert len(rerun.calls) == 2
  assert rerun.calls[0][rerun.calls[0].index("--policy") + 1] == str(out / "round-1" / "export")


def test_round_keys_and_bad_overrides_fail_before_any_round(tmp_path, capsys):
  fake = FakeRounds()
  base = ["--init-from", "x", "--out", str(tmp_path / "it")]
  assert iterative_dpo.main(base + ["init_from=y"], command=fake) == 2
  assert "set by each round" in capsys.readouterr().err
  assert iterative_dpo.main(base + ["optim.lrr=1"], command=fake) == 2
  assert iterative_dpo.main(base, command=fake) == 1  # x is no model directory
  assert "config.json" in capsys.readouterr().err
  assert fake.calls == []


@pytest.mark.slow
def test_two_rounds_of_iterative_dpo_end_to_end(tmp_path, policy_dir):
  out = tmp_path / "it"
  # A random policy never answers the tiny task right (exact match ties at 0, no pairs); a
  # random reward model tells its responses apart.
  rm_dir = _export(tmp_path / "rm", head="scalar", seed=1)
  env = dict(os.environ, TQDM_DISABLE="1", XLA_FLAGS="")  # one CPU device, as a user runs it
  args = [sys.executable, "-m", "jrlhf.iterative_dpo", "--init-from", policy_dir,
          "--out", str(out), "--rounds", "2", "--num-prompts", "16", "--k", "4",
          "--max-new-tokens", "6", "--reward-model", rm_dir,
          "steps=2", "data.batch_size=4", "data.num_eval_examples=8", "train.num_samples=8",
          "train.eval_every=2", "train.log_every=1", "train.progress=false"]
  proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads((out / "summary.json").read_text())
  assert [r["round"] for r in rows] == [0, 1]
  assert all(r["pairs"] > 0 and r["step"] == 2 and "eval/accuracy" in r for r in rows)
  assert json.loads((out / "round-1" / "config.json").read_text())["init_from"] == str(
      out / "round-0" / "export")
  assert (out / "round-1" / "export" / "config.json").is_file()
