"""threepc.proto."""
