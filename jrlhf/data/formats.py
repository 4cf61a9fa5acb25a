"""Row formats: detect one from the columns, and check a row before it is tokenized.

  text               {"text": "..."}
  messages           {"messages": [{"role": "user", "content": "..."}, ...]}
  prompt_completion  {"prompt": "...", "completion": "..."}, or both as message lists
                     (TRL's conversational prompt-completion)

A row that does not fit its format raises `MalformedRow` with a reason a user can act on; the
loader counts and skips it (or re-raises with the row index when data.strict=true).
"""

from __future__ import annotations

from typing import Any, Iterable

FORMAT_COLUMNS = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}


class MalformedRow(ValueError):
  """A row that cannot be turned into a training example; the message is the reason."""


def detect_format(columns: Iterable[str]) -> str:
  """The first format whose columns are all present: messages > prompt_completion > text."""
  columns = set(columns)
  for fmt, needed in FORMAT_COLUMNS.items():
    if set(needed) <= columns:
      return fmt
  expected = "; ".join(f"{fmt}: {' + '.join(cols)}" for fmt, cols in FORMAT_COLUMNS.items())
  raise ValueError(f"cannot tell the data format from the columns {sorted(columns)}; expected "
                   f"one of ({expected}). Rename the columns or set data.format")


def _field(row: dict[str, Any], name: str) -> Any:
  value = row.get(name)
  if value is None:
    raise MalformedRow(f"missing column {name!r}")
  return value


def check_messages(messages: Any, name: str = "messages") -> list[dict[str, str]]:
  if not isinstance(messages, (list, tuple)):
    raise MalformedRow(f"{name} must be a list of {{role, content}} dicts, got "
                       f"{type(messages).__name__}")
  if not messages:
    raise MalformedRow(f"{name} is empty")
  out = []
  for i, message in enumerate(messages):
    if not isinstance(message, dict):
      raise MalformedRow(f"{name}[{i}] must be a dict, got {type(message).__name__}")
    role, content = message.get("role"), message.get("content")
    if not isinstance(role, str) or not isinstance(content, str):
      raise MalformedRow(f"{name}[{i}] needs string 'role' and 'content', got role="
                         f"{type(role).__name__}, content={type(content).__name__}")
    out.append({"role": role, "content": content})
  return out


def check_text(row: dict[str, Any]) -> str:
  text = _field(row, "text")
  if not isinstance(text, str):
    raise MalformedRow(f"text must be a string, got {type(text).__name__}")
  if not text.strip():
    raise MalformedRow("empty text")
  return text


def check_prompt_completion(row: dict[str, Any]) -> tuple[Any, Any]:
  """(prompt, completion): two strings, or two message lists."""
  prompt, completion = _field(row, "prompt"), _field(row, "completion")
  if isinstance(prompt, str) and isinstance(completion, str):
    if not completion.strip():
      raise MalformedRow("empty completion")
    return prompt, completion
  if isinstance(prompt, (list, tuple)) and isinstance(completion, (list, tuple)):
    if not completion:
      raise MalformedRow("empty completion")
    completion = check_messages(completion, "completion")
    if not any(m["content"].strip() for m in completion):
      raise MalformedRow("empty completion")
    return (check_messages(prompt, "prompt") if prompt else []), completion
  raise MalformedRow(f"prompt and completion must both be strings or both be message lists, got "
                     f"{type(prompt).__name__} and {type(completion).__name__}")


def check_chat(row: dict[str, Any], assistant_only: bool) -> list[dict[str, str]]:
  messages = check_messages(_field(row, "messages"))
  if assistant_only and not any(m["role"] == "assistant" for m in messages):
    raise MalformedRow("no assistant message to train on (data.assistant_only_loss=false trains "
                       "on every token)")
  return messages
