"""The embedded default: the tokenizer the project builds, and the generated task."""

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from jrlhf.data import DataConfig, from_rows, load_tokenizer, tiny_task, tiny_tokenizer_dir
from jrlhf.data.tokenizer import TINY_SPECIALS


def test_tiny_tokenizer_round_trips_through_auto_tokenizer(tmp_path):
  path = tiny_tokenizer_dir(tmp_path)
  assert path == tiny_tokenizer_dir(tmp_path)  # deterministic: built once, found again
  tok = AutoTokenizer.from_pretrained(str(path))
  assert isinstance(tok, PreTrainedTokenizerFast)
  assert len(tok) <= 256  # fits the tiny model preset
  assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
  assert tok.convert_ids_to_tokens(list(range(len(TINY_SPECIALS)))) == list(TINY_SPECIALS)
  text = "Reverse 'a b'\n{x: [1, 2]} ~!"
  assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
  assert tok(text)["input_ids"][0] == tok.bos_token_id
  chat = [{"role": "user", "content": "add 12+30"}, {"role": "assistant", "content": "42"}]
  assert tok.apply_chat_template(chat, tokenize=False) == (
      "<bos><|user|>add 12+30<eos><|assistant|>42<eos>")
  assert tok.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True) == (
      "<bos><|user|>add 12+30<eos><|assistant|>")
  assert tok.decode(tok("é")["input_ids"], skip_special_tokens=True) == ""  # unknown -> <unk>


def test_load_tokenizer_errors_name_the_fix(tmp_path):
  with pytest.raises(ValueError, match="data.tokenizer=tiny"):
    load_tokenizer(str(tmp_path / "missing"))


def answer(prompt):
  task, arg = prompt.split(" ")
  if task == "reverse":
    return arg[::-1]
  if task == "sort":
    return "".join(sorted(arg))
  a, b = arg.split("+")
  return str(int(a) + int(b))


def test_make_split_is_deterministic_disjoint_and_correct():
  train, eval_ = tiny_task.make_split(seed=0, n_train=3000, n_eval=300)
  assert (train, eval_) == tiny_task.make_split(seed=0, n_train=3000, n_eval=300)
  assert eval_ == tiny_task.make_split(seed=0, n_train=10, n_eval=300)[1]  # eval ignores n_train
  assert eval_ != tiny_task.make_split(seed=1, n_train=3000, n_eval=300)[1]
  prompts = lambda rows: [r["messages"][0]["content"] for r in rows]  # noqa: E731
  assert len(set(prompts(train))) == 3000 and len(set(prompts(eval_))) == 300
  assert not set(prompts(train)) & set(prompts(eval_))
  for row in train + eval_:
    user, assistant = row["messages"]
    assert (user["role"], assistant["role"]) == ("user", "assistant")
    assert assistant["content"] == answer(user["content"])
    assert len(user["content"]) <= 14 and len(assistant["content"]) <= 8
  assert {p.split(" ")[0] for p in prompts(eval_)} == set(tiny_task.TASKS)


def test_make_split_refuses_more_than_it_can_make():
  with pytest.raises(ValueError, match="at most"):
    tiny_task.make_split(0, n_train=30000, n_eval=0)


def test_tiny_chats_are_short_and_masked_on_the_answer(tiny_tok):
  train, _ = tiny_task.make_split(seed=0, n_train=300, n_eval=0)
  data, stats = from_rows(train, tiny_tok, DataConfig(max_length=64))
  assert stats.kept == 300
  assert max(len(t) for t in data.tokens) <= 32
  prompts, refs = data.prompts_and_references(tiny_tok)
  assert refs == [r["messages"][1]["content"] for r in train]
  assert all(len(p) <= 24 for p in prompts)


def test_score_and_chance():
  assert tiny_task.score("123", "123") == 1.0
  assert tiny_task.score(" 123\n", "123") == 1.0
  assert tiny_task.score("1234", "123") == 0.0
  assert 0.001 < tiny_task.chance_accuracy() < 0.005
