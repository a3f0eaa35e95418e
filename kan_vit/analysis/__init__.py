"""Looking at models and runs: the learned KAN functions and the metrics of runs."""
