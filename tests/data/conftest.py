"""Tokenizers for the data tests, all built locally (no hub): the tiny one, and character-level
ones that carry the shipped real chat templates (ChatML, Llama 3) with their special tokens."""

from pathlib import Path

import datasets
import pytest

from jrlhf.data.tokenizer import TINY_ALPHABET, build_char_tokenizer, load_tokenizer

HERE = Path(__file__).parent
CHATML_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


@pytest.fixture(autouse=True)
def _local_caches(tmp_path_factory, monkeypatch):
  """`datasets` and the tiny tokenizer cache write under pytest's tmp dir, never the home dir."""
  root = tmp_path_factory.getbasetemp()
  # `datasets` reads its env var once at import, so the module attribute is what counts.
  monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", root / "hf_datasets")
  monkeypatch.setenv("JRLHF_CACHE", str(root / "jrlhf_cache"))


@pytest.fixture(scope="session")
def tiny_tok(tmp_path_factory):
  return load_tokenizer("tiny", root=tmp_path_factory.mktemp("tiny_tokenizer"))


def chatml_tokenizer(template: str = "chatml.jinja"):
  """Qwen2.5-style: no BOS at all, EOS = <|im_end|>, pad = <|endoftext|>."""
  return build_char_tokenizer(
      alphabet=TINY_ALPHABET, special_tokens=CHATML_SPECIALS + ("<unk>",), pad="<|endoftext|>",
      bos=None, eos="<|im_end|>", unk="<unk>", chat_template=(HERE / template).read_text(),
      add_bos=False)


@pytest.fixture(scope="session")
def chatml_tok():
  return chatml_tokenizer()


@pytest.fixture(scope="session")
def llama3_tok():
  """Llama-3-style: the tokenizer prepends BOS on its own and the template writes it too."""
  return build_char_tokenizer(
      alphabet=TINY_ALPHABET, special_tokens=LLAMA3_SPECIALS + ("<unk>",), pad="<|eot_id|>",
      bos="<|begin_of_text|>", eos="<|eot_id|>", unk="<unk>",
      chat_template=(HERE / "llama3.jinja").read_text(), add_bos=True)
