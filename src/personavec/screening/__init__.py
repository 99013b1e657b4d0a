"""Training-data screening: ΔP and cheaper scores per sample (locally and on Ray Data), the report, and the
screening experiment."""
