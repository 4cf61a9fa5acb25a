"""Host-side data: formats, tokenization, chat-template masks, packing and batching (numpy only).

  tokenizer = load_tokenizer(cfg.data.tokenizer)
  train, eval_, stats = load_dataset(cfg.data, tokenizer)

The embedded default is `tiny_task` (data) with the `tiny` tokenizer; `tiny_task.score` is its
exact-match scorer. transformers and datasets are imported on first use, not here.
"""

from jrlhf.data import tiny_task
from jrlhf.data.config import FORMATS, DataConfig
from jrlhf.data.dataset import (DataStats, SplitStats, TokenizedDataset, from_rows, load_dataset,
                                load_rows)
from jrlhf.data.encode import Encoder
from jrlhf.data.formats import MalformedRow, detect_format
from jrlhf.data.tokenizer import build_char_tokenizer, load_tokenizer, tiny_tokenizer_dir

__all__ = [
    "DataConfig", "DataStats", "Encoder", "FORMATS", "MalformedRow", "SplitStats",
    "TokenizedDataset", "build_char_tokenizer",
    "detect_format", "from_rows", "load_dataset", "load_rows", "load_tokenizer", "tiny_task",
    "tiny_tokenizer_dir",
]
