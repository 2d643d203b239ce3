"""``python -m safegen.eval ARGS`` is ``safegen eval ARGS`` (also under ``accelerate launch`` / ``torchrun``)."""

import sys

from .command import main

if __name__ == "__main__":
    sys.exit(main())
