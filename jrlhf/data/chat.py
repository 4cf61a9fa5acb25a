"""Which characters of a rendered chat are the turns we train on, for any chat template.

Templates rarely mark assistant turns (`{% generation %}` is rare), so the span of turn i is
found by rendering prefixes of the conversation:

  start = len(render(messages[:i], add_generation_prompt=True))   # header of turn i included
  end   = len(render(messages[:i + 1]))                           # turn i and its end marker

and checking that each rendering is a prefix of the next. Trailing whitespace after the end
marker (ChatML's "\\n" after <|im_end|>) is not a target: the model stops at the marker. Spans are
in characters; `token_mask` maps them onto tokens through the tokenizer's offsets, which stays
right when a BPE token straddles a boundary (a prefix tokenized alone would not).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jrlhf.data.formats import MalformedRow

EVERY_TOKEN = ("data.assistant_only_loss=false (chats) or data.completion_only_loss=false "
               "(prompt/completion) trains on every token instead")


def render(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
  try:
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
  except Exception as e:  # jinja errors (raise_exception in a template, role order) are per row
    raise MalformedRow(f"chat template failed: {e}") from e


def _turn_start(tokenizer, messages, i: int, after: str) -> int:
  """Where turn i's content starts in `after`: past the generation prompt when the template has
  one that matches, else past the previous turn."""
  if i == 0:
    try:  # some templates refuse an empty conversation; then the turn starts the text
      before = render(tokenizer, [], add_generation_prompt=True)
      return len(before) if after.startswith(before) else 0
    except MalformedRow:
      return 0
  agp = (True, False) if messages[i]["role"] == "assistant" else (False,)
  for add_generation_prompt in agp:
    before = render(tokenizer, messages[:i], add_generation_prompt)
    if after.startswith(before):
      return len(before)
  raise MalformedRow(f"the chat template renders messages[:{i}] differently inside the full "
                     f"conversation, so turn {i} cannot be located and this template cannot give "
                     f"per-turn masks; {EVERY_TOKEN}")


def target_spans(tokenizer, messages: Sequence[dict],
                 targets: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
  """The rendered conversation and the [start, end) character span of each target turn."""
  text = render(tokenizer, messages)
  if list(targets) == list(range(len(messages))):  # every turn: headers between turns too
    return text, [(0, len(text.rstrip()))]
  spans = []
  for i in targets:
    after = text if i == len(messages) - 1 else render(tokenizer, messages[:i + 1])
    if not text.startswith(after):
      raise MalformedRow(f"the chat template renders messages[:{i + 1}] differently inside the "
                         "full conversation (it rewrites earlier turns), so turn masks cannot be "
                         f"computed; {EVERY_TOKEN}")
    start = _turn_start(tokenizer, messages, i, after)
    spans.append((start, start + len(after[start:].rstrip())))
  return text, spans


def token_mask(offsets_Lx2: np.ndarray, spans: Sequence[tuple[int, int]]) -> np.ndarray:
  """True for each token whose characters overlap a span (empty tokens never do)."""
  start_L, end_L = offsets_Lx2[:, 0], offsets_Lx2[:, 1]
  mask_L = np.zeros(len(offsets_Lx2), bool)
  for start, end in spans:
    mask_L |= (start_L < end) & (end_L > start) & (end_L > start_L)
  return mask_L
