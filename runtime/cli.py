"""The `vidrd` command line."""
import sys


def main(argv=None):
    print("vidrd: under construction")
    return 0


if __name__ == "__main__":
    sys.exit(main())
