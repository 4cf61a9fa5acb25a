"""Sample from a model with the jitted KV-cache sampler, sharded over the device mesh.

    python -m jrlhf.sample                                   # embedded tiny model, no downloads
    python -m jrlhf.sample --model Qwen/Qwen2.5-0.5B --prompt "The capital of France is"
    python -m jrlhf.sample --save /tmp/tiny                  # also export it as an HF checkpoint

Without `--model`, a tiny random-weight Llama with a byte-level vocabulary runs on the CPU: it
shows the whole path (sharded init, HF export/import round trip, sampling) in seconds, though
its text is noise.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jrlhf.models import ModelConfig, Transformer, from_pretrained, save_pretrained
from jrlhf.models.generate import Sampler, SamplingConfig
from jrlhf.sharding import MeshConfig, batch_ways, init_sharded, make_mesh, put_batch


class ByteTokenizer:
  """UTF-8 bytes as token ids: the tokenizer of the embedded model."""

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids) -> str:
    return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")


def left_pad(rows: list[list[int]], pad_id: int, multiple: int, length: int | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
  """Left-padded (B, P) tokens and mask; B is rounded up to `multiple` with copies of row 0;
  P is the longest row, or `length` (fixed widths compile once)."""
  while len(rows) % multiple:
    rows = rows + [rows[0]]
  length = max(map(len, rows)) if length is None else length
  tokens = np.full((len(rows), length), pad_id, np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for i, row in enumerate(rows):
    tokens[i, length - len(row):] = row
    mask[i, length - len(row):] = 1
  return tokens, mask


def fixed_batches(prompts, rows: list[int], size: int, pad_id: int, mesh):
  """Batches of `size` rows for a sampler that must compile once: per batch, the prompt index of
  each row (the last batch filled with copies of its first row), how many rows are real, and the
  prompts left-padded to the longest of `prompts`, placed on `mesh` ({"p": tokens, "m": mask})."""
  width = max(len(p) for p in prompts)
  for start in range(0, len(rows), size):
    idx = rows[start:start + size]
    real = len(idx)
    idx = idx + [idx[0]] * (size - real)
    prompt_BxP, mask_BxP = left_pad([list(prompts[i]) for i in idx], pad_id, 1, length=width)
    yield idx, real, put_batch({"p": prompt_BxP, "m": mask_BxP}, mesh)


def parse_mesh(text: str) -> MeshConfig:
  data, fsdp, tensor = (int(v) for v in text.split(","))
  return MeshConfig(data=data, fsdp=fsdp, tensor=tensor)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", help="HF checkpoint directory or hub id (default: embedded)")
  parser.add_argument("--prompt", action="append", help="repeatable; default: two short prompts")
  parser.add_argument("--max-new-tokens", type=int, default=32)
  parser.add_argument("--temperature", type=float, default=0.0)
  parser.add_argument("--top-k", type=int, default=0)
  parser.add_argument("--top-p", type=float, default=1.0)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--mesh", type=parse_mesh, default=MeshConfig(),
                      help="data,fsdp,tensor sizes; -1 = the rest (default 1,-1,1)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--save", help="also write the model as an HF checkpoint here")
  args = parser.parse_args(argv)

  mesh = make_mesh(args.mesh)
  prompts = args.prompt or ["Once upon a time", "The answer is"]
  if args.model:
    import transformers  # noqa: PLC0415

    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    model, params = from_pretrained(args.model, dtype=args.dtype, mesh=mesh)
    stop = () if model.cfg.eos_token_id is None else (model.cfg.eos_token_id,)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  else:
    tokenizer = ByteTokenizer()
    model = Transformer(ModelConfig(param_dtype=args.dtype, dtype=args.dtype))
    params, _ = init_sharded(model, jax.random.key(args.seed), jnp.zeros((1, 1), jnp.int32),
                             mesh=mesh)
    stop, pad_id = (), 0
  if args.save:
    save_pretrained(args.save, model, params)
    model, params = from_pretrained(args.save, dtype=args.dtype, mesh=mesh)
    print(f"saved to {args.save} and reloaded from there")

  tokens, mask = left_pad([tokenizer.encode(p) for p in prompts], pad_id, batch_ways(mesh))
  tokens, mask = put_batch((tokens, mask), mesh)
  sampler = Sampler(model, SamplingConfig(
      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
      max_new_tokens=args.max_new_tokens, stop_tokens=stop, pad_id=pad_id))
  rng = jax.random.key(args.seed)
  start = time.perf_counter()
  out = jax.block_until_ready(sampler(params, tokens, mask, rng))
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  out = jax.block_until_ready(sampler(params, tokens, mask, rng))
  run_s = time.perf_counter() - start
  lengths = np.asarray(out.lengths_B)
  for prompt, row, n, logp in zip(prompts, np.asarray(out.tokens_BxN), lengths,
                                  np.asarray(out.logprobs_BxN)):
    print(f"{prompt!r} -> {tokenizer.decode(row[:n])!r}  (logp {logp[:n].sum():.2f})")
  print(f"{model.cfg.family}, mesh {dict(mesh.shape)}: {lengths.sum() / run_s:.0f} new tokens/s "
        f"(first call with compile {compile_s:.1f}s, then {run_s * 1e3:.0f} ms)")


if __name__ == "__main__":
  main()
