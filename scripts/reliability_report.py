"""Reliability report entry point (grace_ds.bench.reliability): runs it as a module from the repository root,
where the test suite's files it reuses (tests/) import. python scripts/reliability_report.py --help"""
import subprocess
import sys
from pathlib import Path

if __name__ == "__main__":
    root = Path(__file__).resolve().parents[1]
    sys.exit(subprocess.call([sys.executable, "-m", "grace_ds.bench.reliability", *sys.argv[1:]], cwd=root))
