"""What every benchmark result JSON records about its run: the commit, the command and the hardware."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]  # the checkout the benchmark ran from


def commit() -> str:
    """HEAD of the checkout, "+uncommitted" when tracked files differ from it; "unknown" outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head.stdout.strip() + ("+uncommitted" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def command() -> str:
    """The command line as typed, the script by its file name."""
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])


def hardware(device: str) -> dict:
    """The machine, its CPUs and the device the ranks ran on (the GPU's name on CUDA)."""
    accelerator = torch.cuda.get_device_name(0) if device == "cuda" and torch.cuda.is_available() else "cpu"
    return {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "device": accelerator,
            "torch": torch.__version__}


def run_record(device: str) -> dict:
    """commit, command, date and hardware: the part of a result's `setting` every benchmark shares."""
    return {"commit": commit(), "command": command(), "date": time.strftime("%Y-%m-%d"), **hardware(device)}
