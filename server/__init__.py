"""threepc.server."""
