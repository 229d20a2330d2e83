"""Training benchmark entry point (grace_ds.bench.training): python scripts/bench_training.py --help for its options."""
from grace_ds.bench.training import main

if __name__ == "__main__":
    main()
