"""Loss masks, BOS and EOS per format, on the tiny tokenizer and on real chat templates."""

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from jrlhf.data.encode import Encoder
from jrlhf.data.formats import MalformedRow
from tests.data.conftest import CHATML_SPECIALS, HERE, chatml_tokenizer

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4, of course."},
]


def runs(mask):
  """[start, stop) of each run of True."""
  edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
  return list(zip(edges[::2], edges[1::2]))


def target_texts(tok, ids, mask):
  return [tok.decode(ids[a:b]) for a, b in runs(mask)]


def test_text_gets_one_bos_and_one_eos(tiny_tok):
  enc = Encoder(tiny_tok)
  ids, mask = enc.encode({"text": "hello"}, "text")
  assert tiny_tok.decode(ids) == "<bos>hello<eos>"
  assert not mask[0] and mask[1:].all()
  # Already there: never doubled.
  ids, _ = enc.encode({"text": "<bos>hello<eos>"}, "text")
  assert tiny_tok.decode(ids) == "<bos>hello<eos>"
  assert list(ids).count(tiny_tok.bos_token_id) == 1 and list(ids).count(tiny_tok.eos_token_id) == 1


def test_completion_only_mask(tiny_tok):
  row = {"prompt": "Q: 2+2=", "completion": " 4"}
  ids, mask = Encoder(tiny_tok).encode(row, "prompt_completion")
  assert tiny_tok.decode(ids) == "<bos>Q: 2+2= 4<eos>"
  assert target_texts(tiny_tok, ids, mask) == [" 4<eos>"]
  ids, mask = Encoder(tiny_tok, completion_only_loss=False).encode(row, "prompt_completion")
  assert not mask[0] and mask[1:].all()


def test_conversational_prompt_completion(chatml_tok):
  row = {"prompt": CHAT[:4], "completion": CHAT[4:]}
  ids, mask = Encoder(chatml_tok).encode(row, "prompt_completion")
  assert target_texts(chatml_tok, ids, mask) == ["4, of course.<|im_end|>"]


def test_assistant_only_mask_chatml(chatml_tok):
  """Qwen2.5's template: an injected system turn, no BOS, <|im_end|>\\n after every turn."""
  ids, mask = Encoder(chatml_tok).encode({"messages": CHAT[1:]}, "messages")
  text = chatml_tok.decode(ids)
  assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
  assert target_texts(chatml_tok, ids, mask) == ["Hello!<|im_end|>", "4, of course.<|im_end|>"]
  assert list(ids).count(chatml_tok.eos_token_id) == 5  # one per turn (system injected): none added


def test_assistant_only_mask_llama3_single_bos(llama3_tok):
  ids, mask = Encoder(llama3_tok).encode({"messages": CHAT}, "messages")
  assert list(ids).count(llama3_tok.bos_token_id) == 1 and ids[0] == llama3_tok.bos_token_id
  assert target_texts(llama3_tok, ids, mask) == ["Hello!<|eot_id|>", "4, of course.<|eot_id|>"]


def test_mask_matches_transformers_generation_mask(chatml_tok):
  """Where a template marks {% generation %}, transformers' own mask is the reference."""
  tok = chatml_tokenizer("chatml_generation.jinja")
  out = tok.apply_chat_template(CHAT, return_assistant_tokens_mask=True, return_dict=True)
  ids, mask = Encoder(tok).encode({"messages": CHAT}, "messages")
  assert list(ids) == list(out["input_ids"])
  np.testing.assert_array_equal(mask, np.asarray(out["assistant_masks"], bool))


def test_every_token_when_not_assistant_only(tiny_tok):
  ids, mask = Encoder(tiny_tok, assistant_only_loss=False).encode({"messages": CHAT}, "messages")
  assert not mask[0] and mask[1:].all()


def test_eos_appended_once_when_template_has_no_end_marker(tiny_tok):
  tok = Encoder(tiny_tok).tokenizer
  plain = PreTrainedTokenizerFast(
      tokenizer_object=tok.backend_tokenizer, bos_token="<bos>", eos_token="<eos>",
      pad_token="<pad>", unk_token="<unk>",
      chat_template="{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                    "{% if add_generation_prompt %}assistant: {% endif %}")
  ids, mask = Encoder(plain).encode({"messages": CHAT[1:3]}, "messages")
  assert plain.decode(ids) == "user: Hi there\nassistant: Hello!<eos>\n"
  assert target_texts(plain, ids, mask) == ["Hello!<eos>"]


def bpe_chatml():
  """A byte-level BPE with merges, so tokens span several characters (as in real models)."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(CHATML_SPECIALS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  corpus = [m["content"] for m in CHAT] * 50 + ["You are a helpful assistant.", "system user"] * 50
  tok.train_from_iterator(corpus, trainer)
  return PreTrainedTokenizerFast(
      tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
      chat_template=(HERE / "chatml.jinja").read_text())


def test_assistant_only_mask_with_bpe_merges():
  tok = bpe_chatml()
  ids, mask = Encoder(tok).encode({"messages": CHAT}, "messages")
  assert len(ids) < len(tok.decode(ids)) / 2  # merges happened
  assert target_texts(tok, ids, mask) == ["Hello!<|im_end|>", "4, of course.<|im_end|>"]


@pytest.mark.parametrize("row, fmt, reason", [
    ({"text": ""}, "text", "empty text"),
    ({"txt": "a"}, "text", "missing column 'text'"),
    ({"text": 3}, "text", "text must be a string"),
    ({"prompt": "a", "completion": "  "}, "prompt_completion", "empty completion"),
    ({"prompt": "a", "completion": ["x"]}, "prompt_completion", "both be strings"),
    ({"messages": "hi"}, "messages", "must be a list"),
    ({"messages": [{"role": "user"}]}, "messages", "string 'role' and 'content'"),
    ({"messages": [{"role": "user", "content": "a"}]}, "messages", "no assistant message"),
    ({"messages": [{"role": "tool", "content": "a"}, {"role": "assistant", "content": "b"}]},
     "messages", "chat template failed"),
])
def test_malformed_rows(tiny_tok, row, fmt, reason):
  with pytest.raises(MalformedRow, match=reason):
    Encoder(tiny_tok).encode(row, fmt)


def test_template_that_rewrites_earlier_turns_is_refused_with_the_alternative(tiny_tok):
  """Like Qwen3 dropping earlier reasoning: prefixes do not line up, so no mask is guessed."""
  rewriting = PreTrainedTokenizerFast(
      tokenizer_object=tiny_tok.backend_tokenizer, bos_token="<bos>", eos_token="<eos>",
      pad_token="<pad>", unk_token="<unk>",
      chat_template="{% for m in messages %}{% if loop.last %}> {% endif %}{{ m['role'] }}: "
                    "{{ m['content'] }}\n{% endfor %}")
  with pytest.raises(MalformedRow, match="data.assistant_only_loss=false"):
    Encoder(rewriting).encode({"messages": CHAT[1:4]}, "messages")
