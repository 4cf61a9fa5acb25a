"""The benchmark scripts still run (tiny sizes, both sides): they are how speed is reported."""

import pathlib
import subprocess
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).parents[1] / "benchmarks"


@pytest.mark.parametrize("script", ["generate.py", "sft_throughput.py"])
def test_benchmark_smoke(script, tmp_path):
  out = tmp_path / "result.json"
  proc = subprocess.run([sys.executable, str(BENCHMARKS / script), "--tiny", "--out", str(out)],
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "jrlhf" in proc.stdout and out.exists()
