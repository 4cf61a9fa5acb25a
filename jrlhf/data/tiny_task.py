"""The embedded task: short verifiable instructions in chat form, scored by exact match.

  train_rows, eval_rows = make_split(seed=0, n_train=20000, n_eval=256)
  eval_rows[0]  # {"messages": [{"role": "user", "content": "sort 4721"},
                #               {"role": "assistant", "content": "1247"}]}
  score("1247", "1247")  # 1.0

Three tasks, mixed equally: `reverse` 3-6 lowercase letters, `sort` 3-6 digits ascending, `add`
two 2-digit numbers. Prompts are at most 12 characters and answers at most 6, so with the tiny
character-level tokenizer a whole chat is under 25 tokens and a 2-layer model learns it in
minutes on a CPU. Held-out prompts never occur in the training set.
"""

from __future__ import annotations

import math
import random
import string

TASKS = ("reverse", "sort", "add")
DEFAULT_TRAIN = 20000
MIN_LEN, MAX_LEN = 3, 6


def _reverse(rng: random.Random) -> tuple[str, str]:
  word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(MIN_LEN, MAX_LEN)))
  return f"reverse {word}", word[::-1]


def _sort(rng: random.Random) -> tuple[str, str]:
  digits = "".join(rng.choices(string.digits, k=rng.randint(MIN_LEN, MAX_LEN)))
  return f"sort {digits}", "".join(sorted(digits))


def _add(rng: random.Random) -> tuple[str, str]:
  a, b = rng.randint(10, 99), rng.randint(10, 99)
  return f"add {a}+{b}", str(a + b)


GENERATORS = {"reverse": _reverse, "sort": _sort, "add": _add}
# Distinct prompts each task can produce; `add` is the one a large request can exhaust.
PROMPT_SPACE = {
    "reverse": sum(26**n for n in range(MIN_LEN, MAX_LEN + 1)),
    "sort": sum(10**n for n in range(MIN_LEN, MAX_LEN + 1)),
    "add": 90 * 90,
}


def _chat(prompt: str, answer: str) -> dict:
  return {"messages": [{"role": "user", "content": prompt},
                       {"role": "assistant", "content": answer}]}


def make_split(seed: int, n_train: int, n_eval: int) -> tuple[list[dict], list[dict]]:
  """`n_train` and `n_eval` chat rows with distinct prompts; no eval prompt is in train.

  Tasks take turns (reverse, sort, add, ...) and each set is then shuffled, so every split is a
  deterministic function of `seed`.
  """
  if n_train < 0 or n_eval < 0:
    raise ValueError(f"n_train={n_train} and n_eval={n_eval} must be >= 0")
  per_task = math.ceil((n_train + n_eval) / len(TASKS))
  if per_task > 0.9 * PROMPT_SPACE["add"]:
    raise ValueError(f"n_train + n_eval = {n_train + n_eval} asks for ~{per_task} `add` prompts "
                     f"of {PROMPT_SPACE['add']} possible; use at most "
                     f"{int(0.9 * PROMPT_SPACE['add']) * len(TASKS)} examples in all")
  rng = random.Random(seed)
  seen: set[str] = set()

  def draw(n: int) -> list[dict]:
    rows = []
    for i in range(n):
      while True:  # rejection keeps prompts distinct; the 0.9 cap above bounds the retries
        prompt, answer = GENERATORS[TASKS[i % len(TASKS)]](rng)
        if prompt not in seen:
          break
      seen.add(prompt)
      rows.append(_chat(prompt, answer))
    rng.shuffle(rows)
    return rows

  eval_rows = draw(n_eval)  # drawn first so that the held-out set does not depend on n_train
  return draw(n_train), eval_rows


def corrupt(answer: str, rng: random.Random) -> str:
  """A near miss that the scorer rejects: two characters swapped, or one replaced by another of
  its kind (digit for digit, letter for letter), so a policy must get the details right."""
  chars = list(answer)
  swappable = [i for i in range(len(chars) - 1) if chars[i] != chars[i + 1]]
  if swappable and rng.random() < 0.5:
    i = rng.choice(swappable)
    chars[i], chars[i + 1] = chars[i + 1], chars[i]
  else:
    i = rng.randrange(len(chars))
    pool = string.digits if chars[i].isdigit() else string.ascii_lowercase
    chars[i] = rng.choice([c for c in pool if c != chars[i]])
  return "".join(chars)


def preference_pairs(rows: list[dict], seed: int) -> list[dict]:
  """Chat rows -> {"prompt", "chosen", "rejected"} message lists: the correct answer against a
  `corrupt`ed one, kept only when the task's scorer tells them apart (1 vs 0)."""
  rng = random.Random(seed)
  pairs = []
  for row in rows:
    user, assistant = row["messages"]
    answer = assistant["content"]
    wrong = corrupt(answer, rng)
    if score(answer, answer) == 1.0 and score(wrong, answer) == 0.0:
      pairs.append({"prompt": [user], "chosen": [assistant],
                    "rejected": [{"role": "assistant", "content": wrong}]})
  return pairs


def score(prediction: str, reference: str) -> float:
  """1.0 when the prediction is the reference, surrounding whitespace aside; else 0.0."""
  return float(prediction.strip() == reference.strip())


def chance_accuracy() -> float:
  """Exact match of a guesser that knows each task's answer format but not the input.

  reverse: 26^-n for n letters; sort: one of C(n+9, 9) non-decreasing digit strings; add: one of
  the 179 possible sums (20..198). Averaged over lengths and tasks: about 0.25%.
  """
  lengths = range(MIN_LEN, MAX_LEN + 1)
  reverse = sum(26.0**-n for n in lengths) / len(lengths)
  sort = sum(1 / math.comb(n + 9, 9) for n in lengths) / len(lengths)
  add = 1 / (198 - 20 + 1)
  return (reverse + sort + add) / len(TASKS)
