"""`peft=NAME` on the command line: one config class per method, all with the same interface.

    python -m jrlhf.run experiment=tiny/sft peft=lora peft.rank=16
    python -m jrlhf.run experiment=tiny/sft peft=qlora peft.quant=nf4
    python -m jrlhf.run experiment=tiny/sft peft=adapter peft.kind=parallel
    python -m jrlhf.run experiment=tiny/sft peft=prompt peft.num_virtual_tokens=20
    python -m jrlhf.run experiment=tiny/sft peft=prefix peft.projection=true

Each method turns the plain param tree into a PEFT tree (`transform`, pure, run under jit so the
new leaves are born sharded), gives the shardings of that tree (`shardings`), and says which
plain leaves train (`train_regex`; PEFT leaf types name their own trainable fields). The train
state splits the tree with `jrlhf.peft.split_trainable`; algorithms only ever see trainable and
frozen halves (DESIGN decision 3), so any algorithm runs with any method.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import chz
import jax

from jrlhf.peft import adapters, lora, peft_format, quant
from jrlhf.peft.spec import ALL_LINEAR, LoraSpec, is_kernel_leaf, path_str
from jrlhf.peft.trainable import VIRTUAL_TOKEN_SUBTREES, base_params

Encode = Callable[[str], list[int]]


@chz.chz
class FullFinetune:
  """peft=none: full fine-tuning, every param trains."""

  @property
  def full(self) -> bool:
    """Full fine-tuning: every method subclasses this class, so only this class itself is."""
    return type(self) is FullFinetune

  @property
  def train_regex(self) -> str | None:
    return None

  @property
  def export_kinds(self) -> tuple[str, ...]:
    return ("merged",)

  def transform(self, params: Any, rng, model_cfg, encode: Encode | None = None) -> Any:
    return params

  def shardings(self, wrapped: Any, params_sh: Any, mesh) -> Any:
    return params_sh

  def save_adapter(self, directory, params: Any, model, base_model_name_or_path: str) -> None:
    """The trained weights alone, in the peft library's format (for "adapter" in export_kinds)."""
    raise ValueError(f"peft={name_of(self)} has no adapter format")

  def load_weights(self, params: Any) -> Any:
    """Replaces freshly initialised method weights with saved ones (after `transform`)."""
    return params


def _patterns(entries: tuple[str, ...], cast, key: str) -> dict[str, Any]:
  out = {}
  for entry in entries:
    regex, sep, value = entry.rpartition(":")
    if not sep or not regex:
      raise ValueError(f"peft.{key} entry {entry!r} is not REGEX:VALUE (e.g. mlp/:16)")
    out[regex] = cast(value)
  return out


@chz.chz
class LoraConfig(FullFinetune):
  """peft=lora: y = x W + s (x A) B on the targeted projections (REFERENCE.md; defaults as
  PEFT's LoraConfig: rank 8, alpha 8, dropout 0).

  targets: regexes over param paths (`attn/(q|v)/`), or all-linear (every projection but the
    head). rank_pattern / alpha_pattern: REGEX:VALUE entries for per-path ranks / alphas.
  rslora: s = alpha / sqrt(rank) instead of alpha / rank. init: A ~ kaiming (PEFT) | gaussian.
  dropout: on the LoRA branch's input, during training steps only.
  export: with train.export, write the PEFT adapter (export/adapter), the merged model
    (export/), or both.
  adapter: a peft-format LoRA adapter directory to start from (continue training one made here
    or with the peft library); peft.targets / rank must select the modules it adapts.
  """

  rank: int = 8
  alpha: float = 8.0
  targets: tuple[str, ...] = (ALL_LINEAR,)
  rank_pattern: tuple[str, ...] = ()
  alpha_pattern: tuple[str, ...] = ()
  rslora: bool = False
  init: str = "kaiming"
  dropout: float = 0.0
  export: str = "both"
  adapter: str = ""

  @chz.validate
  def _check(self):
    self.spec()  # LoraSpec validates ranks, init and dropout
    if self.export not in ("adapter", "merged", "both"):
      raise ValueError(f"peft.export={self.export!r} is not one of adapter, merged, both")

  @property
  def export_kinds(self) -> tuple[str, ...]:
    return ("adapter", "merged") if self.export == "both" else (self.export,)

  def spec(self) -> LoraSpec:
    targets = ALL_LINEAR if self.targets == (ALL_LINEAR,) else tuple(self.targets)
    return LoraSpec(targets=targets, rank=self.rank, alpha=self.alpha,
                    rank_pattern=_patterns(self.rank_pattern, int, "rank_pattern"),
                    alpha_pattern=_patterns(self.alpha_pattern, float, "alpha_pattern"),
                    use_rslora=self.rslora, init=self.init, dropout=self.dropout)

  def transform(self, params, rng, model_cfg, encode=None):
    return lora.wrap(params, self.spec(), rng)

  def save_adapter(self, directory, params, model, base_model_name_or_path):
    peft_format.save_peft_adapter(directory, params, base_model_name_or_path, model=model)

  def load_weights(self, params):
    if not self.adapter:
      return params
    saved = _kernels(peft_format.load_peft_adapter(self.adapter, base_params(params)))
    ours = _kernels(params)
    extra = sorted(p for p, w in saved.items()
                   if isinstance(w, lora.LoraWeight) and not isinstance(ours[p], lora.LoraWeight))
    missing = sorted(p for p, w in ours.items()
                     if isinstance(w, lora.LoraWeight) and not isinstance(saved[p], lora.LoraWeight))
    if extra or missing:
      raise ValueError(f"peft.adapter={self.adapter} adapts {extra or 'no other modules'} that "
                       f"peft.targets does not select, and not {missing or 'nothing missing'}; "
                       f"set peft.targets to the adapter's modules")

    def put(path, w):
      if not isinstance(w, lora.LoraWeight):
        return w
      s = saved[path]
      if s.a.shape != w.a.shape or abs(s.scale - w.scale) > 1e-6 * abs(w.scale):
        raise ValueError(f"peft.adapter={self.adapter}: {path} has rank {s.a.shape[-1]} and "
                         f"scale {s.scale}, the config gives rank {w.a.shape[-1]} and scale "
                         f"{w.scale}; set peft.rank / peft.alpha (or the patterns) to match")
      return dataclasses.replace(
          w, a=jax.device_put(s.a.astype(w.a.dtype), w.a.sharding),
          b=jax.device_put(s.b.astype(w.b.dtype), w.b.sharding))

    return jax.tree_util.tree_map_with_path(lambda kp, w: put(path_str(kp), w), params,
                                            is_leaf=is_kernel_leaf)

  def shardings(self, wrapped, params_sh, mesh):
    return lora.shardings_like(wrapped, params_sh)


@chz.chz
class QLoraConfig(LoraConfig):
  """peft=qlora: the targeted base kernels in 4 bits (NF4 or int4, blocks of 64, optional
  double quantization of the scales), then LoRA on them. The merged export dequantizes the
  rounded base: it is not the original 16-bit model plus the adapter."""

  quant: str = "nf4"
  double_quant: bool = True
  export: str = "adapter"

  @chz.validate
  def _check_quant(self):
    if self.quant not in quant.CODEBOOKS:
      raise ValueError(f"peft.quant={self.quant!r} is not one of {sorted(quant.CODEBOOKS)}")

  def transform(self, params, rng, model_cfg, encode=None):
    base = quant.quantize(params, self.spec().targets, self.quant, self.double_quant)
    return lora.wrap(base, self.spec(), rng)

  def shardings(self, wrapped, params_sh, mesh):
    return lora.shardings_like(wrapped, quant.shardings_like(wrapped, params_sh))


@chz.chz
class AdapterConfig(FullFinetune):
  """peft=adapter: bottleneck adapters h + s W_up f(W_down h), W_up zero (identity start).

  kind: houlsby (after attention output and MLP output, reduction 16, swish), pfeiffer (after
    the MLP output, reduction 16, relu) or parallel (beside the MLP, reduction 2, relu, s = 4);
    reduction_factor / activation / scale override the kind's defaults (0 / "" / 0 = default).
  """

  kind: str = "houlsby"
  reduction_factor: int = 0
  activation: str = ""
  scale: float = 0.0

  @chz.validate
  def _check(self):
    if self.kind not in adapters.ADAPTER_PRESETS:
      raise ValueError(f"peft.kind={self.kind!r} is not one of "
                       f"{', '.join(adapters.ADAPTER_PRESETS)}")
    if self.activation and self.activation not in adapters.ACTIVATIONS:
      raise ValueError(f"peft.activation={self.activation!r} is not one of "
                       f"{', '.join(adapters.ACTIVATIONS)}")
    if self.reduction_factor < 0:
      raise ValueError(f"peft.reduction_factor={self.reduction_factor} must be >= 1 (0 = default)")

  @property
  def export_kinds(self) -> tuple[str, ...]:
    return ()  # nonlinear: no merged model, and no PEFT-library format for these adapters

  def transform(self, params, rng, model_cfg, encode=None):
    return adapters.add_adapters(params, rng, self.kind,
                                 reduction_factor=self.reduction_factor or None,
                                 activation=self.activation or None, scale=self.scale or None)

  def shardings(self, wrapped, params_sh, mesh):
    return adapters.shardings_like(wrapped, params_sh)


@chz.chz
class IA3Config(FullFinetune):
  """peft=ia3: learned scales (init 1) on k, v and the MLP down-projection's input."""

  @property
  def export_kinds(self) -> tuple[str, ...]:
    return ("merged",)  # exact: a diagonal scale folds into the kernel

  def transform(self, params, rng, model_cfg, encode=None):
    return adapters.add_ia3(params)

  def shardings(self, wrapped, params_sh, mesh):
    return adapters.shardings_like(wrapped, params_sh)


@chz.chz
class _VirtualTokens(FullFinetune):
  """What prompt and prefix tuning share: N trainable virtual positions, no merged export."""

  num_virtual_tokens: int = 20

  @chz.validate
  def _check_tokens(self):
    if self.num_virtual_tokens < 1:
      raise ValueError(f"peft.num_virtual_tokens={self.num_virtual_tokens} must be >= 1")

  @property
  def train_regex(self) -> str | None:
    return _prompt().TRAIN_REGEX

  @property
  def export_kinds(self) -> tuple[str, ...]:
    return ("adapter",)  # PEFT's PROMPT_TUNING / PREFIX_TUNING format; no merged model

  def shardings(self, wrapped, params_sh, mesh):
    return _prompt().shardings_like(wrapped, params_sh, mesh)

  def save_adapter(self, directory, params, model, base_model_name_or_path):
    # The virtual-token sub-trees are replicated: every process holds them whole.
    virtual = {k: jax.device_get(params[k]) for k in VIRTUAL_TOKEN_SUBTREES if k in params}
    if jax.process_index() == 0:
      _prompt().save_peft_prompt(directory, virtual, model.cfg, base_model_name_or_path or None)


@chz.chz
class PromptConfig(_VirtualTokens):
  """peft=prompt: N trainable virtual token embeddings before every sequence.

  init: random | vocab (rows of the embedding, sampled) | text (the embeddings of init_text,
  repeated / truncated to N; needs the run's tokenizer).
  """

  init: str = "random"
  init_text: str = ""

  @chz.validate
  def _check(self):
    if self.init not in ("random", "vocab", "text"):
      raise ValueError(f"peft.init={self.init!r} is not one of random, vocab, text")
    if (self.init == "text") != bool(self.init_text):
      raise ValueError("peft.init=text and peft.init_text=... go together")

  def transform(self, params, rng, model_cfg, encode=None):
    ids = None
    if self.init == "text":
      if encode is None:
        raise ValueError("peft.init=text needs a tokenizer to encode peft.init_text")
      ids = encode(self.init_text)
    return _prompt().add_prompt(params, rng, model_cfg, self.num_virtual_tokens,
                                init=self.init, init_token_ids=ids)


@chz.chz
class PrefixConfig(_VirtualTokens):
  """peft=prefix: trainable key/value prefixes of N slots in every layer (prefix tuning /
  P-tuning v2). projection: reparameterise through Embedding -> Linear -> tanh -> Linear of
  width encoder_hidden_size (0 = PEFT's default, kv heads x head dim); zero_init: start exactly
  as the base model, through a zero-initialised per-layer gate on the prefix's attention (a
  zero prefix is not a no-op under softmax); gated prefixes have no PEFT-format export."""

  projection: bool = False
  encoder_hidden_size: int = 0
  zero_init: bool = False

  @property
  def export_kinds(self) -> tuple[str, ...]:
    return () if self.zero_init else ("adapter",)

  def transform(self, params, rng, model_cfg, encode=None):
    return _prompt().add_prefix(params, rng, model_cfg, self.num_virtual_tokens,
                                projection=self.projection,
                                encoder_hidden_size=self.encoder_hidden_size or None,
                                zero_init=self.zero_init)


def _prompt():
  from jrlhf.peft import prompt  # noqa: PLC0415
  return prompt


# `peft=NAME`: the table the CLI chooses from (grep finds every method).
PEFT_METHODS: dict[str, type] = {
    "none": FullFinetune,
    "lora": LoraConfig,
    "qlora": QLoraConfig,
    "adapter": AdapterConfig,
    "ia3": IA3Config,
    "prompt": PromptConfig,
    "prefix": PrefixConfig,
}
PeftConfig = FullFinetune  # every method subclasses it


def name_of(cfg: FullFinetune) -> str:
  return next(n for n, c in PEFT_METHODS.items() if type(cfg) is c)


def _kernels(params: Any) -> dict[str, Any]:
  flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_kernel_leaf)[0]
  return {path_str(kp): leaf for kp, leaf in flat}


def merged_params(params: Any) -> Any:
  """A plain tree for a Hugging Face checkpoint: LoRA folded in (W + s A B, a 4-bit base
  dequantized first), IA3 scales folded in, any other 4-bit kernel dequantized."""
  plain = quant.dequantize(adapters.merge_ia3(lora.merge(params)))
  left = {type(x).__name__ for x in jax.tree.leaves(
      plain, is_leaf=lambda x: dataclasses.is_dataclass(x) and not isinstance(x, jax.Array))
      if dataclasses.is_dataclass(x)}
  if left:
    raise ValueError(f"cannot merge {sorted(left)} leaves into plain kernels")
  return plain


def check_export(cfg: FullFinetune) -> None:
  """train.export with a method whose result has no Hugging Face / PEFT form: say so up front,
  not after training."""
  if not cfg.export_kinds:
    raise ValueError(
        f"train.export=true, but peft={name_of(cfg)} (as configured) cannot be exported to "
        f"Hugging Face format (its weights are not mergeable and the peft library has no such "
        f"adapter); the trained weights stay in the run's orbax checkpoints. Set "
        f"train.export=false")

