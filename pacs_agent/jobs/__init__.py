"""Jobs: the SQL-backed queue and the worker process that runs the pipelines."""
