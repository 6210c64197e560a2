"""rnn-train under torchrun with two gloo processes writes exactly one model."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from service.card import ModelCard

ROOT = Path(__file__).resolve().parents[2]


def run_group(cmd: list[str], env: dict[str, str], timeout: float = 120) -> tuple[str, str, int]:
    """Run ``cmd`` in its own process group, killing the whole group (workers too) on timeout."""
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return stdout, stderr, proc.returncode


def test_torchrun_two_processes_export_once(tmp_path: Path) -> None:
    # torchrun --standalone --nproc_per_node=2 -m training.cli ... (standalone: a free port)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    tiny = shlex.split("--task sine --cell gru --hidden 8 --epochs 2 --samples 128 --seq-len 20")
    cmd = [*torchrun, "-m", "training.cli", *tiny, "--out", str(tmp_path), "--name", "ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    stdout, stderr, returncode = run_group(cmd, env)
    assert returncode == 0, stderr[-3000:]

    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["1"]
    out = tmp_path / "ddp" / "1"
    card = ModelCard.read(out / "card.json")
    assert card.version == 1 and card.cell == "gru"
    assert card.model_extra["training"]["world_size"] == 2
    # 128 sequences, 20% for validation: each rank trained on half of the rest.
    assert card.model_extra["training"]["train_sequences"] == 102
    assert len(json.loads((out / "history.json").read_text())) == 2
    assert (out / "training.png").exists()
    # Only rank 0 reports.
    assert stdout.count('"model_dir"') == 1
