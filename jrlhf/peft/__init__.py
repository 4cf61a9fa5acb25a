"""Parameter-efficient fine-tuning as param-tree transforms and kernel leaf types (DESIGN 2).

Importing this package registers every PEFT leaf type with `jrlhf.models.layers.matmul`.

    from jrlhf import peft
    params = peft.lora.wrap(params, peft.LoraSpec(targets="all-linear", rank=8), rng)
    trainable, frozen = peft.split_trainable(params)
    peft.save_peft_adapter("out/adapter", model, params, "meta-llama/Llama-3.2-1B")
"""

from jrlhf.peft import adapters, lora, peft_format, quant, spec
from jrlhf.peft import prompt
from jrlhf.peft.lora import LoraWeight, combine, merge, split_trainable
from jrlhf.peft.peft_format import load_peft_adapter, save_peft_adapter
from jrlhf.peft.spec import ALL_LINEAR, LoraSpec

__all__ = ["ALL_LINEAR", "LoraSpec", "LoraWeight", "adapters", "combine", "load_peft_adapter",
           "lora", "merge", "peft_format", "quant", "save_peft_adapter", "spec", "split_trainable"]
