"""End to end against TRL: one tiny HF Llama pair (policy, reference), the tiny tokenizer, four
preference pairs; TRL's DPOTrainer computes its loss and metrics on its own collated batch, and
jrlhf's DPO loss on the same batch (weights loaded through `from_pretrained`) must agree."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jrlhf.algorithms import dpo
from jrlhf.data import load_tokenizer
from jrlhf.models import from_pretrained

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

PAIRS = [  # not mirrored: the chosen and rejected answers differ in content and length
    {"prompt": "sort 4721 ", "chosen": "1247", "rejected": "7421x"},
    {"prompt": "reverse abc ", "chosen": "cba", "rejected": "abc"},
    {"prompt": "add 12+30 ", "chosen": "42", "rejected": "41"},
    {"prompt": "sort 90 ", "chosen": "09", "rejected": "9 0 0"},
]
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected")


def tiny_llama(seed, vocab):
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=64,
                                 initializer_range=0.2)
  return transformers.LlamaForCausalLM(cfg).eval()


def jrlhf_batch(inputs):
  """TRL's collated batch in the jrlhf data contract (same rows, same [chosen; rejected])."""
  attention = inputs["attention_mask"].numpy()
  return {"tokens": inputs["input_ids"].numpy().astype(np.int32),
          "positions": np.maximum(np.cumsum(attention, 1) - 1, 0).astype(np.int32),
          "segment_ids": attention.astype(np.int32),
          "loss_mask": inputs["completion_mask"].numpy().astype(bool)}


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_loss_and_rewards_equal_trls(tmp_path, loss_type):
  tokenizer = load_tokenizer("tiny")
  policy, ref = tiny_llama(0, len(tokenizer)), tiny_llama(1, len(tokenizer))
  args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4,
                       beta=0.1, loss_type=[loss_type], report_to=[], use_cpu=True,
                       bf16=False, dataset_num_proc=None)
  trainer = trl.DPOTrainer(model=policy, ref_model=ref, args=args,
                           train_dataset=datasets.Dataset.from_list(PAIRS),
                           processing_class=tokenizer)
  inputs = next(iter(trainer.get_train_dataloader()))
  with torch.no_grad():
    trl_loss = float(trainer.compute_loss(trainer.model, inputs))
  mode = "train" if trainer.model.training else "eval"  # where TRL files this batch's metrics
  trl_metrics = {k: v[-1] for k, v in trainer._metrics[mode].items()}

  policy.save_pretrained(tmp_path / "policy")
  ref.save_pretrained(tmp_path / "ref")
  model, params = from_pretrained(tmp_path / "policy")
  _, ref_params = from_pretrained(tmp_path / "ref")
  batch = {k: jnp.asarray(v) for k, v in jrlhf_batch(inputs).items()}
  cfg = dpo.DPOConfig(beta=0.1, loss=(loss_type,))
  loss, sums = dpo.loss_fn(params, ref_params, batch, model, cfg, dpo.pair_counts(batch))
  ours = dpo._means(sums, loss)

  assert float(ours["pairs"]) == 4
  assert float(loss) == pytest.approx(trl_loss, abs=1e-4)
  for key in METRICS:
    assert float(ours[key]) == pytest.approx(trl_metrics[key], abs=1e-4), key
  # Not a vacuous match: the two models disagree, so the rewards are far from 0.
  assert abs(trl_metrics["rewards/margins"]) > 1e-2
