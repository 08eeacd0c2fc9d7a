"""``python -m glm4v_fast.bench``: the same command as ``glm4v-fast bench``."""
import sys

from .cli import main

sys.exit(main())
