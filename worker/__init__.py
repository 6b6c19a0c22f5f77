"""threepc.worker."""
