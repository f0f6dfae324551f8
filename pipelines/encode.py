"""Entry point for launchers that take a script: `accelerate launch pipelines/encode.py INPUT... --out DIR`
is `deepencoder encode INPUT... --out DIR` in every process."""

import sys

from deepencoder.cli import main

if __name__ == "__main__":
    sys.exit(main(["encode", *sys.argv[1:]]))
