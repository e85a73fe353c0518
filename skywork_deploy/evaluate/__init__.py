"""`eval`: score a deployment on math problems with Math-Verify (datasets, scoring, targets, runner)."""
