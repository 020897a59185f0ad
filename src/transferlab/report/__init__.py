"""Reports: plots read from metrics.csv, and markdown/HTML reports read from a run's files."""
