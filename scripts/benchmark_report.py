"""Benchmark page entry point (grace_ds.bench.report_page): python scripts/benchmark_report.py --help for its options."""
from grace_ds.bench.report_page import main

if __name__ == "__main__":
    main()
