"""Output: tables (CSV/TSV/JSON/parquet), figures and the `info` summary of a store."""
