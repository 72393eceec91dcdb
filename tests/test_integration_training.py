"""Real runs: all-MiniLM-L6-v2 on SST-2 from ../shared/data, and `torchrun` with two CPU processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adamix_zoo.evaluation import evaluate_run
from adamix_zoo.recipes.glue import TrainArgs, train
from tests.tiny_glue import tiny_backbone_dir, write_glue

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("ADAMIX_DATA_DIR", ROOT.parent / "shared" / "data"))


@pytest.mark.skipif(not (DATA / "glue" / "sst2").is_dir(), reason="needs ../shared/data/glue/sst2")
def test_adamix_lora_learns_sst2_with_minilm(tmp_path):
    args = TrainArgs(task="sst2", method="adamix-lora", data_dir=str(DATA), output_dir=str(tmp_path),
                     train_subset=480, validation_subset=200, max_length=48, batch_size=16,
                     max_steps=40, eval_every=20, lr=5e-3, head_lr=1e-2, seed=0, progress=False)
    result = train(args)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert result.best > 0.65  # untrained: about 0.5
    config = json.loads((tmp_path / "run_config.json").read_text())
    assert config["backbone"] == "minilm-l6" and config["data"]["train_size"] == 480
    merged = evaluate_run(tmp_path, str(DATA), merged=True, validation_subset=200)
    assert merged["accuracy"] == pytest.approx(result.best)


def test_torchrun_two_processes_train_through_the_cli(tmp_path):
    backbone = tiny_backbone_dir(tmp_path / "bert")
    data = write_glue(tmp_path / "glue", n_train=128, n_val=32)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "adamix_zoo", "train", "--task", "sst2", "--method", "adamix-lora",
           "--backbone", str(backbone), "--data-dir", str(data), "--output-dir", str(out),
           "--max-steps", "8", "--batch-size", "8", "--lr", "0.03", "--device", "cpu", "--no-progress"]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=ROOT,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    config = json.loads((out / "run_config.json").read_text())
    assert config["world_size"] == 2
    lines = (out / "metrics.jsonl").read_text().splitlines()
    # four evaluations per run, each written once (rank 0), not once per rank
    assert [json.loads(line)["step"] for line in lines] == [2, 4, 6, 8]
    assert (out / "adamix_experts.safetensors").is_file()
