"""Tokenizers: the embedded character-level one that the project builds, and loading any other.

  tok = load_tokenizer("tiny")          # built with `tokenizers`, loaded by AutoTokenizer
  tok = load_tokenizer("path/or/hub-id")

The tiny tokenizer has one token per printable ASCII character (plus newline) and seven special
tokens, 103 in all, so it fits the tiny model preset (vocab_size 256). It is built
deterministically into a cache directory named by a hash of its contents, so a change to the
vocabulary or the template can never be served from a stale cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import string
import tempfile
from pathlib import Path

from jrlhf.data.config import TINY

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
ROLES = ("system", "user", "assistant")
# Ids 0..3 are fixed so that SamplingConfig(pad_id=0) and the model config agree without lookups.
TINY_SPECIALS = (PAD, BOS, EOS, UNK) + tuple(f"<|{role}|>" for role in ROLES)
# Tab, carriage return and form feeds are left out: the task never writes them.
TINY_ALPHABET = tuple(c for c in string.printable if c not in "\t\r\x0b\x0c")
# Every turn ends with EOS (like ChatML's <|im_end|>), so the generation stop token is EOS.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('tiny chat template: unknown role ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
CACHE_ENV = "JRLHF_CACHE"


def build_char_tokenizer(*, alphabet=TINY_ALPHABET, special_tokens=TINY_SPECIALS, pad=PAD,
                         bos=BOS, eos=EOS, unk=UNK, chat_template=TINY_CHAT_TEMPLATE,
                         add_bos=True):
  """A character-level `PreTrainedTokenizerFast`: one id per special token, then per character.

  `add_bos`: the tokenizer prepends BOS when called with add_special_tokens=True (like Llama), so
  the no-double-BOS logic has something to guard against.
  """
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast

  missing = [t for t in (pad, bos, eos, unk) if t is not None and t not in special_tokens]
  if missing:
    raise ValueError(f"special tokens {missing} must be listed in special_tokens={special_tokens}")
  vocab = {token: i for i, token in enumerate(tuple(special_tokens) + tuple(alphabet))}
  tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
  # Every character is its own pre-token; WordLevel then maps it (or <unk>) to an id.
  tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
  tok.decoder = decoders.Fuse()  # the default decoder would join characters with spaces
  tok.add_special_tokens(list(special_tokens))
  if add_bos and bos is not None:
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])])
  return PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token=pad, bos_token=bos, eos_token=eos, unk_token=unk,
      chat_template=chat_template)


def save_tokenizer(tokenizer, path: str | os.PathLike) -> Path:
  """Writes `tokenizer` to `path` atomically: a concurrent reader sees all files or none."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
  try:
    tokenizer.save_pretrained(tmp)
    # The generic fast class, so transformers 4.x loads it too (5.x maps it to its backend).
    config_file = tmp / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    try:
      tmp.rename(path)
    except OSError:  # another process (a parallel sweep point) got there first
      if not (path / "tokenizer.json").exists():
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return path


def cache_dir() -> Path:
  return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "jrlhf")


def tiny_tokenizer_dir(root: str | os.PathLike | None = None) -> Path:
  """The directory of the tiny tokenizer under `root` (default: $JRLHF_CACHE or ~/.cache/jrlhf),
  built there if missing."""
  tokenizer = build_char_tokenizer()
  content = tokenizer.backend_tokenizer.to_str() + TINY_CHAT_TEMPLATE
  digest = hashlib.sha256(content.encode()).hexdigest()[:12]
  path = Path(root or cache_dir()) / f"tiny_tokenizer-{digest}"
  if not (path / "tokenizer.json").exists():
    save_tokenizer(tokenizer, path)
  return path


def load_tokenizer(name: str = TINY, *, root: str | os.PathLike | None = None):
  """`"tiny"` (built on first use under `root`), or a local directory / hub id for AutoTokenizer.

  Raises if the tokenizer has no EOS token: SFT appends it so that the model learns to stop.
  """
  from transformers import AutoTokenizer

  source = tiny_tokenizer_dir(root) if name == TINY else name
  try:
    tokenizer = AutoTokenizer.from_pretrained(str(source))
  except (OSError, ValueError) as e:
    raise ValueError(f"could not load tokenizer {name!r}: {e}. Use data.tokenizer=tiny, a local "
                     "directory with tokenizer.json, or a hub id in the local HF cache") from e
  if tokenizer.eos_token_id is None:
    raise ValueError(f"tokenizer {name!r} has no eos_token; SFT appends EOS to every completion. "
                     "Pick a tokenizer with one, or add it to its tokenizer_config.json")
  return tokenizer
