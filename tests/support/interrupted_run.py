"""One procedure for the SIGKILL tests of every trainer: run a CLI training command straight through
and, beside it, once killed mid-way and rerun; the caller compares what the two runs wrote."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path


def latest_checkpoint(out: Path) -> int:
    """The newest orbax step under out/checkpoints (0 when none)."""
    folder = out / "checkpoints"
    steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []
    return max(steps, default=0)


def loss_curve(out: Path) -> list[float]:
    return [h["loss"] for h in json.loads((out / "loss_curve.json").read_text())]


def straight_and_resumed(
    command: list[str], root: Path, steps: int, final_file: str, timeout: float = 300
) -> tuple[Path, Path]:
    """(straight, killed) output folders: `command --out straight` runs uninterrupted; `command --out killed`
    is SIGKILLed once 3 checkpoints exist (asserting `final_file` was not yet written), then rerun to the end."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    straight_dir, killed_dir = root / "straight", root / "killed"
    straight = subprocess.Popen(
        [*command, "--out", str(straight_dir)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    killed = subprocess.Popen(
        [*command, "--out", str(killed_dir)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + timeout
    while latest_checkpoint(killed_dir) < 3 and killed.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    reached = latest_checkpoint(killed_dir)
    assert killed.returncode == -signal.SIGKILL and 3 <= reached < steps, reached
    assert not (killed_dir / final_file).exists()
    resumed = subprocess.run([*command, "--out", str(killed_dir)], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    _, err = straight.communicate()
    assert straight.returncode == 0, err.decode()
    assert loss_curve(straight_dir) == loss_curve(killed_dir) and len(loss_curve(killed_dir)) == steps
    return straight_dir, killed_dir
