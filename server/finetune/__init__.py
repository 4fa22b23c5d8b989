"""Fine-tuning through the API: training files, jobs on disk (jobs.py), each run in its own process (run.py),
and the server's queue that starts runs and registers their prefixes (runner.py)."""
