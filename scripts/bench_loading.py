"""Loading benchmark entry point (grace_ds.bench.loading): python scripts/bench_loading.py --help for its options."""
from grace_ds.bench.loading import main

if __name__ == "__main__":
    main()
