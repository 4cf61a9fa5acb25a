"""Parameter-efficient fine-tuning as param-tree transforms and kernel leaf types (DESIGN 2).

Importing this package registers every PEFT leaf type with `jrlhf.models.layers.matmul`.

    from jrlhf import peft
    params = peft.lora.wrap(params, peft.LoraSpec(targets="all-linear", rank=8), rng)
    trainable, frozen = peft.split_trainable(params)
    peft.save_peft_adapter("out/adapter", params, base_model_name_or_path="meta-llama/Llama-3.2-1B")
"""

from jrlhf.peft import adapters, lora, peft_format, prompt, quant, spec, trainable
from jrlhf.peft.lora import LoraWeight, merge
from jrlhf.peft.peft_format import load_peft_adapter, save_peft_adapter
from jrlhf.peft.spec import ALL_LINEAR, LoraSpec
from jrlhf.peft.trainable import combine, split_trainable

__all__ = ["ALL_LINEAR", "LoraSpec", "LoraWeight", "adapters", "combine", "load_peft_adapter",
           "lora", "merge", "peft_format", "prompt", "quant", "save_peft_adapter", "spec", "split_trainable",
           "trainable"]
