"""The GPU check runs anywhere: here on the CPU with a tiny config, printing its one JSON object."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tokmarg.strategies import REGISTRY

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_on_cpu_with_a_tiny_config(llama3_tokenizer_dir: Path) -> None:
    cmd = [sys.executable, "-m", "tokmarg.gpucheck", "--tokenizer", str(llama3_tokenizer_dir)]
    proc = subprocess.run(
        [*cmd, "--shape", "tiny", "--batches", "2,4", "--samples", "2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    res = json.loads(lines[-1])  # one JSON object
    assert res["device"] == "cpu" and res["shape"] == "tiny"
    for sem in ("exact", "paper"):
        assert res["fp32"][sem]["within_tolerance"], res["fp32"][sem]
        assert res["fp32"][sem]["codes_agree"], res["fp32"][sem]
        assert set(res["fp32"][sem]["per_strategy"]) == set(REGISTRY)  # all seven
    flips = res["bf16_vs_fp32"]
    assert flips["nodes_common"] > 0 and min(flips["top_p"], flips["eps"], flips["eos_0.7"]) >= 0
    assert [t["batch"] for t in res["throughput"]] == [2, 4]
    assert res["batch_speedup"]["2"] == 1.0 and res["batch_speedup"]["4"] > 0
    for t in res["throughput"]:
        assert t["samples_per_s"] > 0 and t["bytes_to_host_per_node"] < 16_000
        assert sum(b["calls"] for b in t["forward_profile"]) == t["forward_calls"]
    assert res["attention"]["now"] == "tokmarg_tree" and res["multi_gpu"] is None


def test_gpu_check_llama_guard_4_text_model(llama4_tokenizer_dir: Path) -> None:
    """`--arch llama4`: Llama Guard 4's text model (Llama4ForCausalLM) with the Llama 4 tokenizer."""
    cmd = [sys.executable, "-m", "tokmarg.gpucheck", "--tokenizer", str(llama4_tokenizer_dir), "--arch", "llama4"]
    proc = subprocess.run(
        [*cmd, "--shape", "tiny", "--batches", "2", "--samples", "2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads([line for line in proc.stdout.splitlines() if line.strip()][-1])
    assert res["arch"] == "Llama4ForCausalLM" and res["attention"]["now"] == "tokmarg_tree"
    for sem in ("exact", "paper"):
        assert res["fp32"][sem]["within_tolerance"] and res["fp32"][sem]["codes_agree"], res["fp32"][sem]
