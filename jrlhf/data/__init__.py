"""Host-side data: formats, tokenization, chat-template masks, packing and batching (numpy only).

  tokenizer = load_tokenizer(cfg.data.tokenizer)
  train, eval_, stats = load_dataset(cfg.data, tokenizer)
  batches = Batches(train, cfg.data, seed=cfg.seed)
  batch = batches.get(step)   # tokens, positions, segment_ids, loss_mask: (B, L) numpy arrays

The embedded default is `tiny_task` (data) with the `tiny` tokenizer; `tiny_task.score` is its
exact-match scorer. Preference pairs (RM, DPO): `load_preference_data` and `PreferenceBatches`. transformers and datasets are imported on first use, not here.
"""

from jrlhf.data import preference, tiny_task
from jrlhf.data.batches import Batches
from jrlhf.data.config import FORMATS, DataConfig
from jrlhf.data.dataset import (DataStats, SplitStats, TokenizedDataset, from_rows, load_dataset,
                                load_rows)
from jrlhf.data.encode import Encoder
from jrlhf.data.formats import MalformedRow, detect_format
from jrlhf.data.packing import best_fit_decreasing, bucket_lengths
from jrlhf.data.preference import PreferenceBatches, PreferenceDataset, load_preference_data
from jrlhf.data.tokenizer import build_char_tokenizer, load_tokenizer, tiny_tokenizer_dir

__all__ = [
    "Batches", "DataConfig", "DataStats", "Encoder", "FORMATS", "MalformedRow",
    "PreferenceBatches", "PreferenceDataset", "SplitStats", "TokenizedDataset",
    "best_fit_decreasing", "bucket_lengths", "build_char_tokenizer", "detect_format", "from_rows",
    "load_dataset", "load_preference_data", "load_rows", "load_tokenizer", "preference",
    "tiny_task", "tiny_tokenizer_dir",
]
