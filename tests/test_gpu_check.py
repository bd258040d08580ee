"""scripts/gpu_check.py at a tiny size on CPU: its checks run and agree, without Ray, DeepSpeed or gguf."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
PROBE = f"""
import json, runpy, sys
sys.argv = ["gpu_check.py", "--tiny", "--device", "cpu"]
runpy.run_path({str(SCRIPT)!r}, run_name="__main__")
print(json.dumps({{"imported": [m for m in ("ray", "deepspeed", "gguf") if m in sys.modules]}}))
"""


def test_gpu_check_runs_tiny_on_cpu_without_ray_deepspeed_or_gguf():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, check=True).stdout
    report_text, _, probe = out.strip().rpartition("\n")
    report = json.loads(report_text)
    assert json.loads(probe)["imported"] == []
    assert report["device"] == "cpu" and report["dtype"] == "float32"
    assert 0 < report["dpo_loss"] < 2 and report["dpo_step_s"] > 0
    assert report["merge_max_abs_err"] < 1e-5  # the exact soup is base + Σ w·s·BA
    assert report["soup_vs_merged_max_abs_logit_err"] < 1e-4 * max(1.0, report["logit_scale"])
    assert report["generate_new_tokens"] == 4 * 8  # eos disabled: every request decodes its limit
