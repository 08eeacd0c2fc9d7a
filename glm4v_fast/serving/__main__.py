"""`python -m glm4v_fast.serving [options]`: the same server as `glm4v-fast serve`."""
import argparse
import sys

from .server import add_serve_arguments, run_server


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glm4v_fast.serving",
                                     description="GLM-4V vision embedding server")
    add_serve_arguments(parser)
    return run_server(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
