"""Fault drill entry point (grace_ds.bench.fault_drill): python scripts/fault_drill.py --help for its options."""
from grace_ds.bench.fault_drill import main

if __name__ == "__main__":
    main()
