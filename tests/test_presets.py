"""Preset shapes give the published parameter counts (computed abstractly, nothing allocated)."""

import math

import jax
import pytest

from configs import models as presets
from jrlhf.models import Transformer
from jrlhf.models.hf import abstract_params

# Published totals (HF model cards / safetensors index sizes), in parameters.
PUBLISHED = {
    "gpt2": 124.44e6, "llama2_7b": 6.738e9, "llama2_70b": 68.98e9, "llama3_8b": 8.030e9,
    "llama3_70b": 70.55e9, "mistral_7b": 7.248e9, "qwen2_5_7b": 7.616e9, "qwen3_8b": 8.191e9,
    "small": 33.7e6,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_param_count(name):
  shapes = abstract_params(Transformer(presets.PRESETS[name]))
  count = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))
  assert count == pytest.approx(PUBLISHED[name], rel=2e-3)
