"""Preference pairs (prompt, chosen, rejected) for reward models and the DPO family.

  train, eval_, stats = load_preference_data(cfg, tokenizer)   # cfg: DataConfig
  batches = PreferenceBatches(train, cfg, seed=0)
  batch = batches.get(step)   # 2 * batch_size rows: [chosen; rejected], the contract fields

Rows may be any of (normalised by `normalise`):
  {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}  explicit
  {"chosen": ..., "rejected": ...}                   implicit prompt: the shared prefix
  HH-RLHF transcripts "\\n\\nHuman: ... \\n\\nAssistant: ..."  -> chat messages, prompt shared
  UltraFeedback-style: prompt str, chosen/rejected = full message lists (user turn included)
optional `margin` (reward models) and `ref_chosen_logps` / `ref_rejected_logps` (TRL's names
for precomputed DPO reference log-probs) columns travel with the pair as per-row batch columns
`margin` / `ref_logps`. Each side is tokenized like SFT's prompt/completion rows (`Encoder`:
one BOS, EOS after a text response, the chat template for messages), the loss mask on the
response. A pair whose longer side exceeds `max_length` is dropped and counted, never cut: a
truncated response would change what is preferred.
`data.batch_size` counts pairs; a batch holds twice as many rows.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterator, Sequence

import chz
import numpy as np

from jrlhf.data import tiny_task
from jrlhf.data.config import TINY, DataConfig
from jrlhf.data.dataset import (LOCAL_BUILDERS, SplitStats, TokenizedDataset, load_rows,
                                skip_malformed)
from jrlhf.data.encode import Encoder
from jrlhf.data.formats import MalformedRow
from jrlhf.data.packing import bucket_for, bucket_lengths

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
EXTRA_COLUMNS = ("margin", "ref_chosen_logps", "ref_rejected_logps")


def _hh_messages(transcript: str) -> list[dict[str, str]]:
  """'\\n\\nHuman: a\\n\\nAssistant: b' -> [{user: a}, {assistant: b}]."""
  messages, rest = [], transcript
  if not rest.startswith(HUMAN):
    raise MalformedRow("an HH-RLHF transcript must start with '\\n\\nHuman:'")
  while rest:
    role = "user" if rest.startswith(HUMAN) else "assistant"
    rest = rest[len(HUMAN if role == "user" else ASSISTANT):]
    cut = min((i for i in (rest.find(HUMAN), rest.find(ASSISTANT)) if i >= 0), default=len(rest))
    messages.append({"role": role, "content": rest[:cut].strip()})
    rest = rest[cut:]
  return messages


def _common_prefix(a: Sequence, b: Sequence) -> int:
  n = 0
  while n < min(len(a), len(b)) and a[n] == b[n]:
    n += 1
  return n


def normalise(row: dict[str, Any]) -> tuple[Any, Any, Any]:
  """(prompt, chosen, rejected): all strings, or all message lists. Raises MalformedRow."""
  if "chosen" not in row or "rejected" not in row:
    raise MalformedRow(f"a preference row needs 'chosen' and 'rejected' (found {sorted(row)})")
  prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
  if isinstance(chosen, str) and isinstance(rejected, str) and prompt is None and (
      chosen.startswith(HUMAN)):
    chosen, rejected = _hh_messages(chosen), _hh_messages(rejected)
  if isinstance(chosen, list) and isinstance(prompt, str):
    prompt = [{"role": "user", "content": prompt}]  # UltraFeedback: a plain prompt column
  if prompt is None or (isinstance(chosen, list) and chosen[:len(prompt)] == prompt):
    # Implicit prompt (or one repeated inside the responses): the shared prefix, cut at a
    # message boundary (chat) or kept as text.
    n = _common_prefix(chosen, rejected)
    if isinstance(chosen, list):
      while n and chosen[n - 1]["role"] == "assistant" and n == min(len(chosen), len(rejected)):
        n -= 1  # identical final answers: keep them as the responses
      prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    else:
      prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
  if isinstance(prompt, list) != isinstance(chosen, list) or (
      isinstance(chosen, list) != isinstance(rejected, list)):
    raise MalformedRow("prompt, chosen and rejected must all be text or all be message lists")
  if not chosen or not rejected:
    raise MalformedRow("an empty chosen or rejected response")
  return prompt, chosen, rejected


@dataclasses.dataclass
class PreferenceDataset:
  """Tokenized pairs: `chosen` and `rejected` sides (same index = same pair) and extra columns."""

  chosen: TokenizedDataset
  rejected: TokenizedDataset
  extras: dict[str, np.ndarray]

  def __len__(self) -> int:
    return len(self.chosen)


def tokenize_pairs(rows, encoder: Encoder, *, max_length: int, strict: bool = False
                   ) -> tuple[PreferenceDataset, SplitStats]:
  """Encodes pairs, drops (and counts) those that do not fit, skips malformed ones."""
  sides: dict[str, list] = {"ct": [], "cm": [], "rt": [], "rm": []}
  extras: dict[str, list] = {k: [] for k in EXTRA_COLUMNS}
  reasons, n, skipped, dropped = [], 0, 0, 0
  for n, row in enumerate(rows, 1):
    try:
      prompt, chosen, rejected = normalise(row)
      ct, cm = encoder.encode({"prompt": prompt, "completion": chosen}, "prompt_completion")
      rt, rm = encoder.encode({"prompt": prompt, "completion": rejected}, "prompt_completion")
    except MalformedRow as e:
      skip_malformed(e, n - 1, strict, reasons)
      skipped += 1
      continue
    if max(len(ct), len(rt)) > max_length:
      dropped += 1
      continue
    for key, value in zip(("ct", "cm", "rt", "rm"), (ct, cm, rt, rm)):
      sides[key].append(value)
    for key in EXTRA_COLUMNS:
      if key in row:
        extras[key].append(float(row[key]))
  pad_id = encoder.tokenizer.pad_token_id
  pad_id = encoder.eos_id if pad_id is None else pad_id
  kept = len(sides["ct"])
  data = PreferenceDataset(
      TokenizedDataset(sides["ct"], sides["cm"], pad_id),
      TokenizedDataset(sides["rt"], sides["rm"], pad_id),
      {k: np.asarray(v, np.float32) for k, v in extras.items() if v and len(v) == kept})
  return data, SplitStats(n, kept, skipped, 0, dropped, tuple(reasons))


def pairs_file_rows(cfg: DataConfig):
  """The rows of `data.pairs` (capped by num_train_examples), all of them training pairs."""
  path = Path(cfg.pairs).expanduser()
  if path.suffix.lower() not in LOCAL_BUILDERS:
    raise ValueError(f"data.pairs={cfg.pairs!r} must be a local file ending in "
                     f"{', '.join(LOCAL_BUILDERS)}")
  if not path.is_file():
    raise FileNotFoundError(f"data.pairs={cfg.pairs!r} does not exist; write one with "
                            "`python -m jrlhf.onpolicy --out FILE ...`, or drop data.pairs to "
                            f"train on data.source={cfg.source!r}'s own pairs")
  file_cfg = chz.replace(cfg, source=str(path), subset=None, split="train", eval_split=None,
                         eval_fraction=0.0, pairs=None)
  return load_rows(file_cfg)[0]


def load_preference_data(cfg: DataConfig, tokenizer, seed: int | None = None):
  """(train, eval, DataStats) of preference pairs per the config (`tiny`: the task's pairs;
  with `data.pairs`, training pairs from that file and held-out pairs from the source)."""
  from jrlhf.data.dataset import DataStats  # noqa: PLC0415 - same package, kept local for clarity

  if cfg.source == TINY:
    train_rows, eval_rows = load_rows(cfg, seed)
    split_seed = cfg.split_seed if seed is None else seed
    train_rows = tiny_task.preference_pairs(train_rows, split_seed)
    eval_rows = tiny_task.preference_pairs(eval_rows, split_seed + 1)
  else:
    train_rows, eval_rows = load_rows(cfg, seed)
  if cfg.pairs is not None:
    train_rows = pairs_file_rows(cfg)
  encoder = Encoder(tokenizer, completion_only_loss=True)
  kwargs = dict(max_length=cfg.max_length, strict=cfg.strict)
  train, train_stats = tokenize_pairs(train_rows, encoder, **kwargs)
  eval_, eval_stats = tokenize_pairs(eval_rows, encoder, **kwargs)
  stats = DataStats("preference", train_stats, eval_stats)
  if not len(train):
    origin = f"data.pairs={cfg.pairs!r}" if cfg.pairs else f"data.source={cfg.source!r}"
    raise ValueError(f"no preference pairs left from {origin}:\n"
                     f"{stats.summary()}\n(pairs longer than data.max_length are dropped)")
  return train, eval_, stats


class PreferenceBatches:
  """`batch_size` pairs per step as 2 * batch_size rows `[chosen; rejected]`, a pure function of
  the step (epoch permutations seeded by (seed, epoch)), right-padded to a bucket length."""

  def __init__(self, data: PreferenceDataset, cfg: DataConfig, seed: int,
               *, shuffle: bool | None = None):
    self.data, self.seed, self.batch_size = data, seed, cfg.batch_size
    self.shuffle = cfg.shuffle if shuffle is None else shuffle
    self.lengths = np.maximum(data.chosen.lengths, data.rejected.lengths) if len(data) else (
        np.zeros(0, np.int64))
    self.buckets = bucket_lengths(cfg.max_length, cfg.min_bucket)
    self.steps_per_epoch = len(data) // self.batch_size

  def indices(self, step: int) -> np.ndarray:
    if not self.steps_per_epoch:
      raise ValueError(f"{len(self.data)} pairs are fewer than data.batch_size="
                       f"{self.batch_size} (pairs per batch); lower it or add data")
    epoch, k = divmod(step, self.steps_per_epoch)
    order = (np.random.default_rng([self.seed, epoch]).permutation(len(self.data))
             if self.shuffle else np.arange(len(self.data)))
    return order[k * self.batch_size:(k + 1) * self.batch_size]

  def get(self, step: int, process_index: int = 0, process_count: int = 1
          ) -> dict[str, np.ndarray]:
    """This process's contiguous slice of the global `[chosen; rejected]` rows: the global
    array the processes assemble is then `[chosen; rejected]` too."""
    rows = 2 * self.batch_size
    if rows % process_count:
      raise ValueError(f"2 * data.batch_size = {rows} rows must split over {process_count} "
                       "processes")
    batch = self.collate(self.indices(step))
    per = rows // process_count
    return {k: v[process_index * per:(process_index + 1) * per] for k, v in batch.items()}

  def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
    """Every pair once, in order; the last batch is filled with empty pairs (no targets)."""
    for start in range(0, len(self.data), self.batch_size):
      yield self.collate(np.arange(start, min(start + self.batch_size, len(self.data))),
                         num_pairs=self.batch_size)

  def collate(self, pairs: np.ndarray, num_pairs: int | None = None) -> dict[str, np.ndarray]:
    num_pairs = len(pairs) if num_pairs is None else num_pairs
    length = bucket_for(int(self.lengths[pairs].max()), self.buckets)
    rows = 2 * num_pairs
    out = {"tokens": np.full((rows, length), self.data.chosen.pad_id, np.int32),
           "positions": np.zeros((rows, length), np.int32),
           "segment_ids": np.zeros((rows, length), np.int32),
           "loss_mask": np.zeros((rows, length), bool)}
    for offset, side in ((0, self.data.chosen), (num_pairs, self.data.rejected)):
      for b, i in enumerate(pairs):
        n = len(side.tokens[i])
        out["tokens"][offset + b, :n] = side.tokens[i]
        out["positions"][offset + b, :n] = np.arange(n)
        out["segment_ids"][offset + b, :n] = 1
        out["loss_mask"][offset + b, :n] = side.loss_mask[i]
    extras = self.data.extras
    if "margin" in extras:
      margin = np.zeros(num_pairs, np.float32)
      margin[:len(pairs)] = extras["margin"][pairs]
      out["margin"] = np.concatenate([margin, margin])
    if "ref_chosen_logps" in extras and "ref_rejected_logps" in extras:
      ref = np.zeros(rows, np.float32)
      ref[:len(pairs)] = extras["ref_chosen_logps"][pairs]
      ref[num_pairs:num_pairs + len(pairs)] = extras["ref_rejected_logps"][pairs]
      out["ref_logps"] = ref
    return out


def eval_prompts(data: PreferenceDataset, tokenizer, limit: int):
  """(prompt tokens, reference text) of the chosen sides: a DPO policy's sampled eval."""
  return data.chosen.prompts_and_references(tokenizer, limit)
