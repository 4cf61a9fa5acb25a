"""What data to train on and how to cut it into batches.

  DataConfig()                                         # the embedded tiny task + tiny tokenizer
  DataConfig(source="data/chat.jsonl", tokenizer="Qwen/Qwen2.5-0.5B-Instruct", packing=True)
"""

from __future__ import annotations

import difflib

import chz

# `auto` picks from the columns: messages > prompt + completion > text.
FORMATS = ("auto", "text", "messages", "prompt_completion")
# The embedded task and the embedded tokenizer are both called this.
TINY = "tiny"


def _did_you_mean(value: str, choices: tuple[str, ...]) -> str:
  close = difflib.get_close_matches(value, choices, n=1)
  return f" (did you mean {close[0]!r}?)" if close else ""


@chz.chz
class DataConfig:
  """Source, format, tokenization and batching of the training data.

  source: "tiny" (the embedded task), a hub dataset id, or a local .json/.jsonl/.parquet/.csv file.
  subset: the hub dataset's config name, if it has several.
  format: text | messages | prompt_completion | auto (chosen from the columns).
  split / eval_split: dataset splits; without an eval_split, `eval_fraction` of `split` (at least
    1, at most num_eval_examples) is held out by `split_seed`. The tiny task generates its own
    disjoint held-out set.
  split_seed: seed of the held-out split and of the tiny task's generation. Apart from the run
    seed so that a sweep over seeds evaluates on one held-out set.
  num_train_examples: cap on training examples (None = all; the tiny task then makes 20000).
  num_eval_examples: cap on held-out examples (the tiny task makes exactly this many).
  tokenizer: "tiny" (built by the project) or a path / hub id for transformers.AutoTokenizer.
  max_length: tokens per row; longer examples are truncated from the end, and dropped when no
    target token survives.
  min_bucket: rows are padded to the smallest length in {min_bucket * 2^k} + {max_length} that
    holds them, so a jitted step compiles at most a handful of times.
  batch_size: rows per global batch (all processes together).
  packing: pack several examples per row (best-fit decreasing); otherwise one example per row.
  completion_only_loss: prompt/completion data trains on the completion only.
  assistant_only_loss: chat data trains on the assistant turns only.
  strict: raise on the first malformed row instead of skipping and counting it.
  pairs: preference pairs (a local .json/.jsonl/.parquet/.csv file of prompt/chosen/rejected
    rows, e.g. written by `python -m jrlhf.onpolicy`) that replace the source's training pairs
    of a pair-trained algorithm (RM, DPO); held-out evaluation still comes from `source`.
  """

  source: str = TINY
  subset: str | None = None
  format: str = "auto"
  split: str = "train"
  eval_split: str | None = None
  eval_fraction: float = 0.02
  split_seed: int = 0
  num_train_examples: int | None = None
  num_eval_examples: int = 256
  tokenizer: str = TINY
  max_length: int = 1024
  min_bucket: int = 64
  batch_size: int = 8
  packing: bool = False
  shuffle: bool = True
  completion_only_loss: bool = True
  assistant_only_loss: bool = True
  strict: bool = False
  pairs: str | None = None

  @chz.validate
  def _check(self):
    if self.format not in FORMATS:
      raise ValueError(f"data.format={self.format!r} is not one of {', '.join(FORMATS)}"
                       f"{_did_you_mean(self.format, FORMATS)}")
    if not self.source:
      raise ValueError('data.source is empty; use "tiny", a hub dataset id or a local file path')
    if not self.tokenizer:
      raise ValueError('data.tokenizer is empty; use "tiny", a local directory or a hub id')
    if self.max_length < 2:
      raise ValueError(f"data.max_length={self.max_length} must be >= 2 (a prompt token and a "
                       "target token)")
    if self.min_bucket < 1:
      raise ValueError(f"data.min_bucket={self.min_bucket} must be >= 1; set it to "
                       "data.max_length for a single padded shape")
    if self.batch_size < 1:
      raise ValueError(f"data.batch_size={self.batch_size} must be >= 1")
    if not 0.0 <= self.eval_fraction < 1.0:
      raise ValueError(f"data.eval_fraction={self.eval_fraction} must be in [0, 1)")
    if self.num_train_examples is not None and self.num_train_examples < 1:
      raise ValueError(f"data.num_train_examples={self.num_train_examples} must be >= 1, or "
                       "None for all")
    if self.pairs is not None and not self.pairs:
      raise ValueError("data.pairs is empty; give a preference file (.jsonl) or None for the "
                       "source's own pairs")
    if self.num_eval_examples < 0:
      raise ValueError(f"data.num_eval_examples={self.num_eval_examples} must be >= 0")
