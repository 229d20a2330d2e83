"""Online re-planning benchmark on devices: entry point of grace_ds.bench.online (python scripts/bench_online.py --help)."""
from grace_ds.bench.online import main

if __name__ == "__main__":
    main()
