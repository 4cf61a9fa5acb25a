"""Loop tests build the same programs several times (a run, then its resumption): a persistent
compilation cache makes every build after the first a cache hit instead of a multi-second
compile on 8 fake devices."""

import tempfile

import jax

_CACHE = tempfile.mkdtemp(prefix="jrlhf-test-xla-cache-")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
