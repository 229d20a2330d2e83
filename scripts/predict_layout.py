"""Layout prediction entry point (grace_ds.bench.predict_layout): python scripts/predict_layout.py --help for its options."""
from grace_ds.bench.predict_layout import main

if __name__ == "__main__":
    main()
