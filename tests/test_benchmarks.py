"""The benchmark scripts still run (tiny sizes, both sides): they are how speed is reported."""

import pathlib
import subprocess
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).parents[1] / "benchmarks"


# peft_throughput's full fine-tuning row is sft_throughput's step: one compile fewer here.
@pytest.mark.parametrize("script, extra", [("generate.py", []), ("sft_throughput.py", []),
                                           ("peft_throughput.py", ["--methods", "lora,qlora"]),
                                           ("dpo_throughput.py", []),
                                           # Its PPO part trains a start first (~1 min).
                                           pytest.param("rollout.py", [], marks=pytest.mark.slow)])
def test_benchmark_smoke(script, extra, tmp_path):
  out = tmp_path / "result.json"
  proc = subprocess.run([sys.executable, str(BENCHMARKS / script), "--tiny", "--out", str(out),
                         *extra],
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "jrlhf" in proc.stdout and out.exists()
