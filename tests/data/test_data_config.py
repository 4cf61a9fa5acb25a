"""DataConfig refuses bad values at construction, naming what would be valid."""

import pytest

from jrlhf.data import DataConfig


@pytest.mark.parametrize("kwargs, match", [
    ({"format": "mesages"}, "did you mean 'messages'"),
    ({"max_length": 1}, "max_length=1 must be >= 2"),
    ({"batch_size": 0}, "batch_size=0"),
    ({"eval_fraction": 1.0}, "eval_fraction"),
    ({"min_bucket": 0}, "min_bucket"),
    ({"num_train_examples": 0}, "num_train_examples"),
    ({"source": ""}, "hub dataset id or a local file"),
])
def test_bad_values_are_explained(kwargs, match):
  with pytest.raises(ValueError, match=match):
    DataConfig(**kwargs)


def test_defaults_are_the_embedded_task():
  cfg = DataConfig()
  assert (cfg.source, cfg.tokenizer, cfg.format) == ("tiny", "tiny", "auto")
