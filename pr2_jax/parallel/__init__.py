"""Device mesh, logical-axis rules and expert parallelism."""
