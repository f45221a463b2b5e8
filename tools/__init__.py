"""Commands a user runs around the pipeline: report, predict, serve."""
