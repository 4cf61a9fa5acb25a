"""One row -> (tokens, loss mask): BOS once, EOS appended once, targets per format.

  enc = Encoder(tokenizer, completion_only_loss=True, assistant_only_loss=True)
  tokens_L, mask_L = enc.encode({"prompt": "2+2=", "completion": "4"}, "prompt_completion")
  # tokens: <bos> 2 + 2 = 4 <eos>     mask: F F F F F T T

`mask_L[t]` is True when tokens_L[t] is a target (predicted from position t-1); the first token is
never one. Prompt and completion are tokenized together and split by character offsets, so the
tokens are the ones the whole text would get.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jrlhf.data import chat, formats
from jrlhf.data.formats import MalformedRow


def _added_prefix(tokenizer) -> list[int]:
  """The ids the tokenizer puts in front of a text by itself (usually [BOS], or nothing)."""
  plain = tokenizer("x", add_special_tokens=False)["input_ids"]
  full = tokenizer("x")["input_ids"]
  for k in range(len(full) - len(plain) + 1):
    if full[k:k + len(plain)] == plain:
      return full[:k]
  return []


class Encoder:
  """Tokenizes rows of every format with one tokenizer; see the module docstring."""

  def __init__(self, tokenizer, *, completion_only_loss: bool = True,
               assistant_only_loss: bool = True):
    if tokenizer.eos_token_id is None:
      raise ValueError("the tokenizer has no eos_token; SFT appends EOS so the model learns to "
                       "stop. Pick a tokenizer with one")
    self.tokenizer = tokenizer
    self.eos_id = tokenizer.eos_token_id
    self.prefix = _added_prefix(tokenizer)
    self.special_ids = set(tokenizer.all_special_ids)
    self.completion_only_loss = completion_only_loss
    self.assistant_only_loss = assistant_only_loss

  def encode(self, row: dict[str, Any], fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """int32 tokens and bool targets of one row; raises MalformedRow."""
    if fmt == "text":
      ids, mask = self._plain(formats.check_text(row), 0)
    elif fmt == "prompt_completion":
      prompt, completion = formats.check_prompt_completion(row)
      if isinstance(completion, str):
        target_from = len(prompt) if self.completion_only_loss else 0
        ids, mask = self._plain(prompt + completion, target_from)
      else:
        messages = list(prompt) + list(completion)
        first = len(prompt) if self.completion_only_loss else 0
        ids, mask = self._chat(messages, range(first, len(messages)))
    elif fmt == "messages":
      messages = formats.check_chat(row, self.assistant_only_loss)
      targets = [i for i, m in enumerate(messages)
                 if m["role"] == "assistant" or not self.assistant_only_loss]
      ids, mask = self._chat(messages, targets)
    else:
      raise ValueError(f"format {fmt!r} is not one of {tuple(formats.FORMAT_COLUMNS)}")
    mask[0] = False  # nothing predicts a document's first token
    if not mask.any():
      raise MalformedRow("no target tokens (the trained part tokenizes to nothing)")
    return ids.astype(np.int32), mask

  def _tokenize(self, text: str) -> tuple[list[int], np.ndarray]:
    try:
      enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as e:
      raise ValueError("loss masks need a fast tokenizer (character offsets); load one with "
                       "use_fast=True or convert it to tokenizer.json") from e
    return list(enc["input_ids"]), np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2)

  def _plain(self, text: str, target_from: int) -> tuple[np.ndarray, np.ndarray]:
    """Text whose characters from `target_from` on are targets; BOS and EOS as needed."""
    ids, offsets = self._tokenize(text)
    mask = chat.token_mask(offsets, [(target_from, len(text))])
    # A text that already starts with BOS keeps its own: never two.
    if self.prefix and ids[:len(self.prefix)] != self.prefix:
      ids = self.prefix + ids
      mask = np.concatenate([np.zeros(len(self.prefix), bool), mask])
    if not ids or ids[-1] != self.eos_id:
      ids, mask = ids + [self.eos_id], np.append(mask, True)
    return np.asarray(ids), mask

  def _chat(self, messages, targets) -> tuple[np.ndarray, np.ndarray]:
    """The template decides BOS (it usually writes it); EOS is added only after a final target
    turn that the template leaves without any end marker."""
    text, spans = chat.target_spans(self.tokenizer, messages, list(targets))
    ids, offsets = self._tokenize(text)
    mask = chat.token_mask(offsets, spans)
    last_is_target = bool(targets) and targets[-1] == len(messages) - 1
    if last_is_target and mask.any():
      last_target = int(np.flatnonzero(mask)[-1])
      if ids[last_target] not in self.special_ids:
        ids.insert(last_target + 1, self.eos_id)
        mask = np.insert(mask, last_target + 1, True)
    return np.asarray(ids), mask
