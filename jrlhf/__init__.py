"""jrlhf: LLM post-training in JAX/Flax.

Tensor names carry their shapes with these letters (einsum strings use the same ones):

  B batch         L length (tokens in this call)   S cache slots (keys visible to a query)
  D model dim     H query heads                    K key/value heads      G query heads per kv head
  Dh head dim     F MLP dim                        V vocabulary           R rank (PEFT)
  N new (sampled) tokens                           P prompt length
  T virtual tokens (prompt / prefix tuning)

`x_BxLxD` is a float array of shape (B, L, D); `mask_BxL` is a bool array of shape (B, L).
"""

__version__ = "0.1.0"
