"""Preference data: row layouts normalised, pairs tokenized with the response as target, pairs
that do not fit dropped and counted, batches laid out [chosen; rejected], tiny-task pairs."""

import json

import numpy as np
import pytest

from jrlhf.data import DataConfig, load_tokenizer, preference, tiny_task
from jrlhf.data.encode import Encoder


def test_hh_rlhf_transcripts_become_chats_with_the_shared_turns_as_prompt():
  row = {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant: 4",
         "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant: 5"}
  prompt, chosen, rejected = preference.normalise(row)
  assert [m["role"] for m in prompt] == ["user", "assistant", "user"]
  assert prompt[-1]["content"] == "2+2?"
  assert chosen == [{"role": "assistant", "content": "4"}]
  assert rejected == [{"role": "assistant", "content": "5"}]


def test_ultrafeedback_message_lists_with_a_plain_prompt():
  row = {"prompt": "q?", "chosen": [{"role": "user", "content": "q?"},
                                    {"role": "assistant", "content": "good"}],
         "rejected": [{"role": "user", "content": "q?"}, {"role": "assistant", "content": "bad"}]}
  prompt, chosen, rejected = preference.normalise(row)
  assert prompt == [{"role": "user", "content": "q?"}]
  assert chosen[0]["content"] == "good" and rejected[0]["content"] == "bad"


def test_implicit_text_prompt_is_the_shared_prefix_and_explicit_is_kept():
  assert preference.normalise({"chosen": "Q: x A: yes", "rejected": "Q: x A: no"}) == (
      "Q: x A: ", "yes", "no")
  assert preference.normalise({"prompt": "p", "chosen": "a", "rejected": "b"}) == ("p", "a", "b")
  with pytest.raises(preference.MalformedRow):
    preference.normalise({"prompt": "p", "chosen": "a"})


def test_pairs_tokenize_with_response_targets_and_long_pairs_are_dropped():
  tok = load_tokenizer("tiny")
  rows = [{"prompt": "ab", "chosen": "cd", "rejected": "efg"},
          {"prompt": "ab", "chosen": "c" * 40, "rejected": "d"},
          {"chosen": "x"}]
  data, stats = preference.tokenize_pairs(rows, Encoder(tok), max_length=16)
  assert (stats.rows, stats.kept, stats.dropped_truncated, stats.skipped) == (3, 1, 1, 1)
  chosen = tok.decode(data.chosen.tokens[0][data.chosen.loss_mask[0]])
  rejected = tok.decode(data.rejected.tokens[0][data.rejected.loss_mask[0]])
  assert chosen == "cd<eos>" and rejected == "efg<eos>"  # EOS after a text response


def test_batches_are_chosen_then_rejected_and_split_by_process():
  tok = load_tokenizer("tiny")
  rows = [{"prompt": f"p{i}", "chosen": "y" * (i + 1), "rejected": "n", "margin": i}
          for i in range(6)]
  data, _ = preference.tokenize_pairs(rows, Encoder(tok), max_length=32)
  cfg = DataConfig(batch_size=2, max_length=32, min_bucket=8)
  batches = preference.PreferenceBatches(data, cfg, seed=0)
  batch = batches.get(0)
  assert batch["tokens"].shape[0] == 4
  pairs = batches.indices(0)
  for b, i in enumerate(pairs):
    np.testing.assert_array_equal(batch["tokens"][b, :len(data.chosen.tokens[i])],
                                  data.chosen.tokens[i])
    np.testing.assert_array_equal(batch["tokens"][2 + b, :len(data.rejected.tokens[i])],
                                  data.rejected.tokens[i])
  np.testing.assert_array_equal(batch["margin"], np.tile(pairs.astype(np.float32), 2))
  halves = [batches.get(0, p, 2) for p in range(2)]
  np.testing.assert_array_equal(np.concatenate([h["tokens"] for h in halves]), batch["tokens"])
  wide = preference.PreferenceBatches(data, DataConfig(batch_size=4, max_length=32), seed=0)
  last = list(wide.eval_batches())[-1]  # pairs 4, 5 and two empty ones
  assert last["tokens"].shape[0] == 8 and not last["segment_ids"][[2, 3, 6, 7]].any()
  assert last["segment_ids"][[0, 1, 4, 5], 0].all()


def test_tiny_task_pairs_are_judged_by_the_scorer():
  rows, _ = tiny_task.make_split(0, 60, 0)
  pairs = tiny_task.preference_pairs(rows, seed=0)
  assert len(pairs) == 60
  for pair, row in zip(pairs, rows):
    answer = row["messages"][1]["content"]
    assert tiny_task.score(pair["chosen"][0]["content"], answer) == 1.0
    assert tiny_task.score(pair["rejected"][0]["content"], answer) == 0.0
  cfg = DataConfig(num_train_examples=30, num_eval_examples=8, max_length=64)
  train, eval_, stats = preference.load_preference_data(cfg, load_tokenizer("tiny"))
  assert (len(train), len(eval_)) == (30, 8) and stats.train.dropped_truncated == 0


def test_a_pairs_file_replaces_the_training_pairs_and_eval_stays_on_the_source(tmp_path):
  rows = [{"prompt": [{"role": "user", "content": f"sort {n}"}],
           "chosen": [{"role": "assistant", "content": "".join(sorted(str(n)))}],
           "rejected": [{"role": "assistant", "content": str(n)}]} for n in (321, 531, 975)]
  path = tmp_path / "pairs.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  tok = load_tokenizer("tiny")
  cfg = DataConfig(pairs=str(path), num_eval_examples=8, max_length=64)
  train, eval_, stats = preference.load_preference_data(cfg, tok)
  assert (len(train), len(eval_), stats.train.rows) == (3, 8, 3)
  chosen = tok.decode(train.chosen.tokens[0][train.chosen.loss_mask[0]])
  assert chosen in {"123<eos>", "135<eos>", "579<eos>"}
  # Held-out pairs are the tiny task's, exactly as without data.pairs.
  _, plain_eval, _ = preference.load_preference_data(
      DataConfig(num_eval_examples=8, max_length=64), tok)
  for a, b in zip(eval_.chosen.tokens, plain_eval.chosen.tokens):
    np.testing.assert_array_equal(a, b)
  # num_train_examples caps the file's pairs.
  capped, _, _ = preference.load_preference_data(
      DataConfig(pairs=str(path), num_train_examples=2, num_eval_examples=8, max_length=64), tok)
  assert len(capped) == 2


def test_a_missing_or_unreadable_pairs_file_says_what_to_do(tmp_path):
  tok = load_tokenizer("tiny")
  with pytest.raises(FileNotFoundError, match="data.pairs=.*does not exist.*jrlhf.onpolicy"):
    preference.load_preference_data(DataConfig(pairs=str(tmp_path / "none.jsonl")), tok)
  with pytest.raises(ValueError, match="data.pairs=.*must be a local file ending in"):
    preference.load_preference_data(DataConfig(pairs=str(tmp_path / "pairs.txt")), tok)
  with pytest.raises(ValueError, match="data.pairs is empty"):
    DataConfig(pairs="")
