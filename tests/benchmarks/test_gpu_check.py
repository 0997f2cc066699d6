"""`make gpu-check`'s dry run: every part of the GPU check runs on tiny shapes on this CPU, so the
script cannot rot between the times a GPU is lent."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import gpu_check  # noqa: E402 -- benchmarks/gpu_check.py


def test_the_dry_run_measures_every_figure(tmp_path):
    report = gpu_check.main(["--dry-run", "--out", str(tmp_path / "gpu.json")])
    assert json.loads((tmp_path / "gpu.json").read_text()) == json.loads(json.dumps(report))
    assert report["dry_run"] and report["device"] == "cpu"
    for part in ("train_composition", "train_llama_0.4b"):
        assert 0 < report[part]["mfu"] < 1 and report[part]["tokens_per_s"] > 0
    assert [row["batch"] for row in report["generation"]] == [1, 32]
    assert all(row["new_tokens"] == row["batch"] * 4 for row in report["generation"])
    assert report["search"]["queries_per_s"] > 0 and report["matmul_peak_tflops"]["fp32"] > 0
