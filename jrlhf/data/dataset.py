"""Load rows (the tiny task, a hub id, or a local file through `datasets`) and tokenize them.

  tokenizer = load_tokenizer(cfg.tokenizer)
  train, eval_, stats = load_dataset(cfg, tokenizer)
  print(stats.summary())   # kept / skipped / truncated per split, and the first skip reasons
  prompts, refs = eval_.prompts_and_references(tokenizer, 64)   # for generation at eval
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from jrlhf.data import tiny_task
from jrlhf.data.config import TINY, DataConfig
from jrlhf.data.encode import Encoder
from jrlhf.data.formats import MalformedRow, detect_format

# Local file suffix -> the `datasets` builder that reads it.
LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
MAX_REASONS = 5


def skip_malformed(error: Exception, index: int, strict: bool, reasons: list[str]) -> None:
  """A malformed row: an error with `data.strict`, else a skip whose reason is kept (the first
  MAX_REASONS); the caller counts it."""
  if strict:
    raise ValueError(f"row {index}: {error} (data.strict=false skips and counts such rows)"
                     ) from error
  if len(reasons) < MAX_REASONS:
    reasons.append(f"row {index}: {error}")


@dataclasses.dataclass(frozen=True)
class SplitStats:
  """What happened to the rows of one split. `reasons`: the first few skips, with row index."""

  rows: int = 0
  kept: int = 0
  skipped: int = 0
  truncated: int = 0  # kept, but cut to max_length
  dropped_truncated: int = 0  # no target token left after the cut
  reasons: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class DataStats:
  format: str
  train: SplitStats
  eval: SplitStats

  def summary(self) -> str:
    lines = [f"data format: {self.format}"]
    for name, s in (("train", self.train), ("eval", self.eval)):
      lines.append(f"{name}: {s.kept}/{s.rows} rows kept, {s.skipped} malformed skipped, "
                   f"{s.truncated} truncated, {s.dropped_truncated} dropped (fully truncated)")
      lines += [f"  skipped {r}" for r in s.reasons]
    return "\n".join(lines)


@dataclasses.dataclass
class TokenizedDataset:
  """Examples as variable-length int32 tokens and bool loss masks (see `Encoder`)."""

  tokens: list[np.ndarray]
  loss_mask: list[np.ndarray]
  pad_id: int

  def __len__(self) -> int:
    return len(self.tokens)

  @property
  def lengths(self) -> np.ndarray:
    return np.array([len(t) for t in self.tokens], np.int64)

  def prompt_length(self, i: int) -> int:
    """Tokens before the first target: the prompt a sampler should continue."""
    return int(np.argmax(self.loss_mask[i]))

  def prompts_and_references(self, tokenizer, limit: int | None = None
                             ) -> tuple[list[np.ndarray], list[str]]:
    """Up to `limit` (prompt tokens, reference text) pairs; the reference is the first run of
    target tokens decoded without special tokens (the tiny task's answer)."""
    prompts, references = [], []
    for i in range(len(self) if limit is None else min(limit, len(self))):
      start = self.prompt_length(i)
      rest = self.loss_mask[i][start:]
      stop = start + (int(np.argmin(rest)) if not rest.all() else len(rest))
      prompts.append(self.tokens[i][:start])
      references.append(tokenizer.decode(self.tokens[i][start:stop], skip_special_tokens=True))
    return prompts, references


def _load_hf(cfg: DataConfig, split: str):
  import datasets

  path = Path(cfg.source).expanduser()
  builder = LOCAL_BUILDERS.get(path.suffix.lower())
  if path.is_file():
    if builder is None:
      raise ValueError(f"data.source={cfg.source!r} has suffix {path.suffix!r}; local files must "
                       f"be one of {', '.join(LOCAL_BUILDERS)}")
    # A single local file is always the builder's "train" split.
    return datasets.load_dataset(builder, data_files=str(path), split="train")
  if not path.is_dir() and (builder is not None or cfg.source.startswith(("/", ".", "~"))):
    raise FileNotFoundError(f"data.source={cfg.source!r} looks like a local file but does not "
                            "exist; check the path (or use a hub dataset id)")
  try:  # a hub id, or a local folder of data files
    return datasets.load_dataset(str(path) if path.is_dir() else cfg.source, cfg.subset,
                                 split=split)
  except Exception as e:  # offline, unknown id, missing split: all fixed the same ways
    raise ValueError(f"could not load data.source={cfg.source!r} split {split!r}: {e}. Use a "
                     "local .json/.jsonl/.parquet file, a hub id in the local cache, or "
                     "data.source=tiny") from e


def load_rows(cfg: DataConfig, seed: int | None = None) -> tuple[Any, Any]:
  """Raw (train, eval) rows: sequences of dicts (lists or `datasets.Dataset`)."""
  split_seed = cfg.split_seed if seed is None else seed
  if cfg.source == TINY:
    return tiny_task.make_split(split_seed, cfg.num_train_examples or tiny_task.DEFAULT_TRAIN,
                                cfg.num_eval_examples)
  train = _load_hf(cfg, cfg.split)
  if cfg.eval_split is not None:
    eval_ = _load_hf(cfg, cfg.eval_split)
  elif cfg.eval_fraction > 0 and cfg.num_eval_examples > 0 and len(train) > 1:
    # At least one example, and no more than eval will use: the rest stays in training.
    n_eval = min(max(1, round(len(train) * cfg.eval_fraction)), cfg.num_eval_examples)
    parts = train.train_test_split(test_size=n_eval, seed=split_seed)
    train, eval_ = parts["train"], parts["test"]
  else:
    eval_ = train.select([])
  if cfg.num_train_examples is not None:
    train = train.select(range(min(cfg.num_train_examples, len(train))))
  return train, eval_.select(range(min(cfg.num_eval_examples, len(eval_))))


def _format(cfg: DataConfig, rows) -> str:
  """cfg.format, or the one the columns imply (the first 100 rows' keys for in-memory rows)."""
  if cfg.format != "auto":
    return cfg.format
  if hasattr(rows, "column_names"):
    return detect_format(rows.column_names)
  return detect_format({key for row in rows[:100] for key in row})


def _encoder(cfg: DataConfig, tokenizer) -> Encoder:
  return Encoder(tokenizer, completion_only_loss=cfg.completion_only_loss,
                 assistant_only_loss=cfg.assistant_only_loss)


def tokenize_rows(rows: Iterable[dict], fmt: str, encoder: Encoder, *, max_length: int,
                  strict: bool = False) -> tuple[TokenizedDataset, SplitStats]:
  """Encodes, truncates (keeping the start) and filters rows; counts what it skipped."""
  tokens, masks, reasons = [], [], []
  n = skipped = truncated = dropped = 0
  for n, row in enumerate(rows, 1):
    try:
      ids, mask = encoder.encode(row, fmt)
    except MalformedRow as e:
      skip_malformed(e, n - 1, strict, reasons)
      skipped += 1
      continue
    if len(ids) > max_length:
      ids, mask = ids[:max_length], mask[:max_length]
      if not mask.any():
        dropped += 1
        continue
      truncated += 1
    tokens.append(ids)
    masks.append(mask)
  pad_id = encoder.tokenizer.pad_token_id
  dataset = TokenizedDataset(tokens, masks, encoder.eos_id if pad_id is None else pad_id)
  return dataset, SplitStats(n, len(tokens), skipped, truncated, dropped, tuple(reasons))


def load_dataset(cfg: DataConfig, tokenizer, seed: int | None = None
                 ) -> tuple[TokenizedDataset, TokenizedDataset, DataStats]:
  """(train, eval, stats) per the config. `seed` overrides cfg.split_seed for the held-out split
  and the tiny task (None keeps it; the run seed is best left out so sweeps share one eval set)."""
  train_rows, eval_rows = load_rows(cfg, seed)
  fmt = _format(cfg, train_rows)
  encoder = _encoder(cfg, tokenizer)
  kwargs = dict(max_length=cfg.max_length, strict=cfg.strict)
  train, train_stats = tokenize_rows(train_rows, fmt, encoder, **kwargs)
  eval_, eval_stats = tokenize_rows(eval_rows, fmt, encoder, **kwargs)
  stats = DataStats(fmt, train_stats, eval_stats)
  if not len(train):
    raise ValueError(f"no training examples left from data.source={cfg.source!r}:\n"
                     f"{stats.summary()}")
  return train, eval_, stats


def from_rows(rows: Sequence[dict], tokenizer,
              cfg: DataConfig) -> tuple[TokenizedDataset, SplitStats]:
  """Tokenize in-memory rows with the config's format and loss settings (tests, notebooks)."""
  return tokenize_rows(rows, _format(cfg, rows), _encoder(cfg, tokenizer),
                       max_length=cfg.max_length, strict=cfg.strict)
