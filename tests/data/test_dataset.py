"""Loading through `datasets` (local json/jsonl/parquet/csv), format detection, truncation and
the accounting of skipped rows."""

import json

import datasets
import pytest

from jrlhf.data import DataConfig, detect_format, from_rows, load_dataset

ROWS = [{"prompt": f"q{i}:", "completion": f"a{i}"} for i in range(20)]


@pytest.mark.parametrize("columns, fmt", [
    (["messages", "id"], "messages"),
    (["prompt", "completion", "text"], "prompt_completion"),
    (["text", "meta"], "text"),
])
def test_detect_format(columns, fmt):
  assert detect_format(columns) == fmt


def test_detect_format_names_the_expected_columns():
  with pytest.raises(ValueError, match="prompt \\+ completion"):
    detect_format(["question", "answer"])


def write(path, rows):
  suffix = path.suffix
  if suffix == ".jsonl":
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  elif suffix == ".json":
    path.write_text(json.dumps(rows))
  elif suffix == ".parquet":
    datasets.Dataset.from_list(rows).to_parquet(str(path))
  else:
    datasets.Dataset.from_list(rows).to_csv(str(path), index=False)
  return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_local_files_load_through_datasets(tiny_tok, tmp_path, suffix):
  path = write(tmp_path / f"data{suffix}", ROWS)
  cfg = DataConfig(source=str(path), tokenizer="unused", eval_fraction=0.25, max_length=32)
  train, eval_, stats = load_dataset(cfg, tiny_tok)
  assert stats.format == "prompt_completion"
  assert (len(train), len(eval_)) == (15, 5)
  decoded = {tiny_tok.decode(t) for t in list(train.tokens) + list(eval_.tokens)}
  assert decoded == {f"<bos>q{i}:a{i}<eos>" for i in range(20)}


def test_eval_fraction_holds_out_at_least_one_and_at_most_num_eval(tiny_tok, tmp_path):
  path = write(tmp_path / "d.jsonl", ROWS)
  for fraction, num_eval, expected in [(0.01, 256, 1), (0.5, 4, 4), (0.5, 256, 10)]:
    cfg = DataConfig(source=str(path), eval_fraction=fraction, num_eval_examples=num_eval)
    train, eval_, _ = load_dataset(cfg, tiny_tok)
    assert (len(train), len(eval_)) == (20 - expected, expected)


def test_eval_split_and_caps(tiny_tok, tmp_path):
  """A folder of files is a `datasets` dataset with named splits."""
  write(tmp_path / "train.jsonl", ROWS)
  write(tmp_path / "test.jsonl", ROWS[:4])
  cfg = DataConfig(source=str(tmp_path), eval_split="test", num_train_examples=7,
                   num_eval_examples=3)
  train, eval_, _ = load_dataset(cfg, tiny_tok)
  assert (len(train), len(eval_)) == (7, 3)


def test_missing_file_and_bad_suffix_are_explained(tiny_tok, tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_dataset(DataConfig(source=str(tmp_path / "nope.jsonl")), tiny_tok)
  (tmp_path / "data.txt").write_text("hi")
  with pytest.raises(ValueError, match="must be one of"):
    load_dataset(DataConfig(source=str(tmp_path / "data.txt")), tiny_tok)


def test_unreachable_hub_id_is_explained(tiny_tok):
  """Tests run with HF_HUB_OFFLINE=1 (tests/conftest.py): a hub id fails fast, with the fix."""
  with pytest.raises(ValueError, match="a hub id in the local cache, or data.source=tiny"):
    load_dataset(DataConfig(source="someone/not-a-dataset"), tiny_tok)


def test_truncation_keeps_the_start_and_drops_lost_completions(tiny_tok):
  rows = [
      {"prompt": "abc", "completion": "defghij"},   # 12 tokens: cut to 8, targets survive
      {"prompt": "abcdefghij", "completion": "k"},  # completion entirely past the cut: dropped
      {"prompt": "ab", "completion": "c"},          # fits
  ]
  data, stats = from_rows(rows, tiny_tok, DataConfig(max_length=8))
  assert (stats.rows, stats.kept, stats.truncated, stats.dropped_truncated) == (3, 2, 1, 1)
  assert tiny_tok.decode(data.tokens[0]) == "<bos>abcdefg"
  assert data.loss_mask[0].tolist() == [False] * 4 + [True] * 4


def test_malformed_rows_are_skipped_counted_and_explained(tiny_tok):
  rows = [{"prompt": "a", "completion": "b"}, {"prompt": "a"}, {"prompt": "a", "completion": ""},
          {"prompt": 1, "completion": "b"}, {"prompt": "c", "completion": "d"}]
  data, stats = from_rows(rows, tiny_tok, DataConfig(format="prompt_completion"))
  assert (stats.kept, stats.skipped) == (2, 3)
  assert stats.reasons == ("row 1: missing column 'completion'", "row 2: empty completion",
                           "row 3: prompt and completion must both be strings or both be "
                           "message lists, got int and str")


def test_strict_raises_with_the_row_and_reason(tiny_tok):
  rows = [{"text": "ok"}, {"text": "  "}]
  with pytest.raises(ValueError, match="row 1: empty text"):
    from_rows(rows, tiny_tok, DataConfig(strict=True))


def test_no_examples_left_is_an_error_with_reasons(tiny_tok, tmp_path):
  path = write(tmp_path / "d.jsonl", [{"text": "  "}] * 3)
  with pytest.raises(ValueError, match="(?s)no training examples.*row 0: empty text"):
    load_dataset(DataConfig(source=str(path), eval_fraction=0.0), tiny_tok)


def test_prompts_and_references(tiny_tok):
  rows = [{"messages": [{"role": "user", "content": "sort 321"},
                        {"role": "assistant", "content": "123"}]}]
  data, _ = from_rows(rows, tiny_tok, DataConfig())
  prompts, refs = data.prompts_and_references(tiny_tok)
  assert tiny_tok.decode(prompts[0]) == "<bos><|user|>sort 321<eos><|assistant|>"
  assert refs == ["123"]
