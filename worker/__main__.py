"""`python -m threepc.worker ...` is `threepc worker ...`."""

from threepc.server.cli import main

if __name__ == "__main__":
    main(["worker", *__import__("sys").argv[1:]])
