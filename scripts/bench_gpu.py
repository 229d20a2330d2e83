"""GPU benchmark entry point (grace_ds.bench.gpu): python scripts/bench_gpu.py --help for its options."""
from grace_ds.bench.gpu import main

if __name__ == "__main__":
    main()
