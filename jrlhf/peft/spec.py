"""Which projections a PEFT method wraps: regexes over '/'-joined param paths.

    spec = LoraSpec(targets=("attn/(q|v)/", "mlp/down/"), rank=8, alpha=16,
                    rank_pattern={"mlp/": 16})
    targets = resolve(params, spec)   # {"layers/attn/q/kernel": (8, 16.0), ...}

Paths are those of the param tree (`layers/attn/q/kernel`, `layers/mlp/down/kernel`,
`lm_head/kernel`); only projection kernels (paths ending in `/kernel`) can be targets. A regex
matches a path when `re.search` finds it anywhere in the path. A target regex, or a rank/alpha
pattern, that matches nothing is an error that lists the paths it could have matched: a typo
must not silently train nothing.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from typing import Any

import jax

from jrlhf.models import layers

# PEFT's "all-linear": every projection except the output head (lm_head, or the score head).
ALL_LINEAR = "all-linear"
_HEADS = ("lm_head/kernel", "score/kernel")


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """LoRA hyper-parameters. `targets`: one regex, a tuple of them, or "all-linear".

  `rank_pattern` / `alpha_pattern` map a regex to the rank / alpha of the targets it matches
  (first match wins; others get `rank` / `alpha`). Scale is alpha / rank, or alpha / sqrt(rank)
  with `use_rslora` (rsLoRA keeps the update size steady as the rank grows). `init` is
  "kaiming" (PEFT's default: A ~ U(+-1/sqrt(in))) or "gaussian" (A ~ N(0, 1/rank)); B is zero
  either way, so a freshly wrapped model computes exactly the base model.
  """

  targets: str | tuple[str, ...] = ALL_LINEAR
  rank: int = 8
  alpha: float = 8.0
  rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
  alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
  use_rslora: bool = False
  init: str = "kaiming"
  dropout: float = 0.0

  def __post_init__(self):
    if self.init not in ("kaiming", "gaussian"):
      raise ValueError(f"init {self.init!r} is not one of 'kaiming', 'gaussian'")
    if not 0 <= self.dropout < 1:
      raise ValueError(f"dropout {self.dropout} must be in [0, 1)")
    ranks = [self.rank, *self.rank_pattern.values()]
    if any(not isinstance(r, int) or r < 1 for r in ranks):
      raise ValueError(f"ranks must be positive integers, got {ranks}")

  def scale(self, rank: int, alpha: float) -> float:
    return alpha / rank ** 0.5 if self.use_rslora else alpha / rank


def is_kernel_leaf(x) -> bool:
  return type(x) in layers.KERNEL_HANDLERS


def stable_hash(text: str) -> int:
  """A per-path seed that is the same in every process (Python's hash() is not)."""
  return zlib.crc32(text.encode()) & 0x7FFFFFFF


def path_str(key_path) -> str:
  """'layers/attn/q/kernel' from a jax key path (dict keys, attribute names, sequence indices)."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                  for k in key_path)


def kernel_paths(params: Any) -> list[str]:
  """Every projection kernel in the tree (plain arrays or already-wrapped PEFT leaves)."""
  leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_kernel_leaf)[0]
  return [p for p in (path_str(kp) for kp, _ in leaves) if p.endswith("/kernel")]


def _no_match(what: str, regex: str, candidates: list[str]):
  listing = "\n  ".join(candidates)
  return ValueError(f"{what} {regex!r} matches no projection kernel; the paths it could match "
                    f"(re.search) are:\n  {listing}")


def select(params: Any, targets: str | tuple[str, ...]) -> list[str]:
  """The kernel paths chosen by `targets`, in tree order."""
  candidates = kernel_paths(params)
  if targets == ALL_LINEAR:
    return [p for p in candidates if p not in _HEADS]
  regexes = (targets,) if isinstance(targets, str) else tuple(targets)
  if not regexes:
    raise ValueError("no target regexes given")
  for regex in regexes:
    if not any(re.search(regex, p) for p in candidates):
      raise _no_match("target regex", regex, candidates)
  return [p for p in candidates if any(re.search(r, p) for r in regexes)]


def _pattern_value(patterns: dict[str, Any], path: str, default):
  for regex, value in patterns.items():
    if re.search(regex, path):
      return value
  return default


def resolve(params: Any, spec: LoraSpec) -> dict[str, tuple[int, float]]:
  """Target path -> (rank, alpha), checking that every pattern applies somewhere."""
  chosen = select(params, spec.targets)
  for what, patterns in (("rank_pattern", spec.rank_pattern), ("alpha_pattern",
                                                                spec.alpha_pattern)):
    for regex in patterns:
      if not any(re.search(regex, p) for p in chosen):
        raise _no_match(f"{what} regex", regex, chosen)
  return {p: (_pattern_value(spec.rank_pattern, p, spec.rank),
              float(_pattern_value(spec.alpha_pattern, p, spec.alpha))) for p in chosen}
