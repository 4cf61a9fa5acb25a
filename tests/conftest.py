"""Every test runs on 8 fake CPU devices so each sharding path is exercised without hardware."""

import os

# Must happen before JAX is imported anywhere.
# The concurrency-optimized scheduler of XLA:CPU can order independent collectives differently
# on different fake devices; on a 2-core machine their threads then wait on each other until
# the rendezvous times out (seen: a prompt-tuned train step on a (1, 2, 4) mesh aborts).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    " --xla_cpu_enable_concurrency_optimized_scheduler=false"
    # Eight device threads share two cores with the other tests' processes; the default 40 s
    # before a collective is declared stuck is short on a loaded CI machine.
    " --xla_cpu_collective_call_terminate_timeout_seconds=300").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# One program at a time on the fake devices: with async dispatch a program can start on some
# device threads while others still run the previous one, and their collectives have then waited
# on each other until the rendezvous timed out (seen intermittently on this 2-core machine).
jax.config.update("jax_cpu_enable_async_dispatch", False)
