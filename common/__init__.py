"""threepc.common."""
