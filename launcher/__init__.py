"""Command-line entry point, Ray cluster connection, job submission and supervision."""
