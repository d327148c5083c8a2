"""What every entry point's command line shares: the one-line argument parser, number types that
refuse nonsense, and main_guard, which turns a UserError into one line on stderr and exit status 2."""
import argparse
import math
import sys

from smollm2.errors import UsageError, UserError


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag raises UsageError (one line) instead of printing usage and exiting."""

    def error(self, message):
        raise UsageError(message)


def number(kind, positive):
    """An argparse type: an int or float that is > 0 (positive) or >= 0."""
    def parse(text):
        value = kind(text)  # argparse turns a ValueError into "invalid parse value: 'x'"
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise argparse.ArgumentTypeError(f"must be {'> 0' if positive else '>= 0'}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


POS_INT, NONNEG_INT, POS_FLOAT, NONNEG_FLOAT = (number(int, True), number(int, False),
                                                number(float, True), number(float, False))


def main_guard(main, prog, exit=sys.exit, interrupted=None):
    """Run main() and exit with its status; a UserError is one line `prog: error: ...` and status 2.
    interrupted: the line to print for a Ctrl-C that main() did not handle (status 130), if any."""
    try:
        code = main()
    except UserError as e:
        sys.stderr.write(f"{prog}: error: {e}\n")  # one write: ranks under torchrun share an unbuffered stderr
        code = 2
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        print(f"{prog}: {interrupted}", file=sys.stderr)
        code = 130
    exit(code)
