"""Settings, each declared once: a dataclass field with its default, its help and its range.
The command line, the range checks and the saved configs are all derived from the declarations.

    @dataclass
    class TrainConfig:
        lr_adam: float = setting(3e-3, "AdamW learning rate", range="(0, inf)", group="optimization")

    add_arguments(parser, TrainConfig)      # --lr-adam, type float, "(default: 0.003)" in --help
    check(cfg)                              # ValueError naming --lr-adam if it is NaN, inf or <= 0

`range` is an interval in the usual notation: "[1, inf)" is an integer or float >= 1, "(0, 1]" is
0 < x <= 1. Every number is also checked to be finite. `group` starts a heading in --help that the
following fields share until the next one.
"""
import argparse
import dataclasses
import math
import numbers
import os
import sys


def setting(default, help, *, range=None, choices=None, group=None, cli=True):
    """A dataclass field carrying its help, its allowed values and its --help heading.
    cli=False: a setting of the code (tests, checks) that the command line does not offer."""
    return dataclasses.field(default=default, metadata={
        "help": help, "range": range, "choices": choices, "group": group, "cli": cli})


def flag(name):
    return "--" + name.replace("_", "-")


def int_list(text):
    """"1,4,64" -> (1, 4, 64): how tuple settings (the dilations) are written on the command line."""
    try:
        values = tuple(int(x) for x in str(text).strip("()[] ").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, like 1,4,64; got {text!r}")
    return values


def number(kind, spec):
    """An argparse `type` for the flags of commands that have no settings dataclass: parses `kind`
    (int or float) and checks the interval `spec` as check_value does, so that `--tokens -1` gets
    argparse's one-line usage error ("argument --tokens: must be in [1, inf), got -1")."""
    def parse(text):
        try:
            value = kind(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if outside(value, spec):
            raise argparse.ArgumentTypeError(f"must be in {spec}, got {text}")
        return value
    parse.__name__ = kind.__name__        # argparse names the type in its messages
    return parse


class OneLineParser(argparse.ArgumentParser):
    """argparse's parser with its errors on one line, `prog: error: argument --tokens: must be in
    [1, inf), got -1`, without the usage block before it (--help has that); exit status 2, argparse's
    convention for a bad command line. Subcommands' parsers are of the same class."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def safe_output():
    """Make stdout and stderr write characters their encoding cannot hold as escapes instead of
    raising UnicodeEncodeError: a model can emit any character, and a file name any byte, while a
    terminal or a redirect may be cp1252 or ASCII (PYTHONIOENCODING, a Windows console)."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(errors="backslashreplace")
            except (ValueError, OSError):     # a closed or detached stream: leave it as it is
                pass


def run_cli(main):
    """sys.exit(main()) for a command, quietly when its reader goes away (`... | head`: the rest of
    the output is not wanted, Python's documented way) or on Ctrl-C (status 130)."""
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # no second error at exit
        code = 0
    except KeyboardInterrupt:
        print(file=sys.stderr)
        code = 130
    sys.exit(code)


def _parse_range(spec):
    lo, hi = (x.strip() for x in spec[1:-1].split(","))
    return float(lo), spec[0] == "(", float(hi), spec[-1] == ")"


def outside(v, spec):
    """True when the number v is not finite or not in the interval `spec`. Python's integers have no
    limit (math.isfinite(10**400) would raise OverflowError): an int is finite, and compares exactly."""
    lo, lo_open, hi, hi_open = _parse_range(spec)
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        return True
    if not isinstance(v, numbers.Integral) and not math.isfinite(v):
        return True
    return v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi)


def check_value(name, value, spec):
    """A ValueError naming the flag when `value` (a number or a tuple of numbers) is not finite or
    not in the interval `spec`."""
    if value is None or spec is None:
        return
    for v in (value if isinstance(value, (tuple, list)) else (value,)):
        if outside(v, spec):
            raise ValueError(f"{flag(name)} must be in {spec}, got {_short(value)}")


def _short(value, limit=60):
    """A value for a message: 10**400 typed by a hostile hand is 401 digits."""
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit // 2]}...({len(text)} characters)"


def check(cfg):
    """Check every field of a config dataclass against its declared range and choices."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        check_value(f.name, value, f.metadata.get("range"))
        choices = f.metadata.get("choices")
        if choices and value is not None and value not in choices:
            raise ValueError(f"{flag(f.name)} must be one of {', '.join(map(str, choices))}, got {value!r}")


def add_arguments(parser, cls, groups=None):
    """One command-line flag per field of the dataclass `cls` (those with cli=True), under the
    declared headings. `groups`: the headings made so far (shared between several dataclasses)."""
    groups = {} if groups is None else groups
    group = parser
    for f in dataclasses.fields(cls):
        m = f.metadata
        if m.get("group"):
            if m["group"] not in groups:
                groups[m["group"]] = parser.add_argument_group(m["group"])
            group = groups[m["group"]]
        if not m.get("cli", True):
            continue
        kw = {"dest": f.name, "default": f.default, "help": _help(f)}
        if f.type is bool:                        # default True: --name and --no-name
            kw["action"] = argparse.BooleanOptionalAction if f.default else "store_true"
        elif f.type is list:
            kw["action"] = "append"
        else:
            kw["type"] = int_list if f.type is tuple else f.type
            kw["choices"] = m.get("choices")
        group.add_argument(flag(f.name), **kw)
    return groups


def _help(f):
    help = f.metadata["help"]
    if "default" in help or f.default is None or isinstance(f.default, bool):
        return help
    default = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
    return f"{help} (default: {default})"


def from_args(cls, args, **override):
    """An instance of `cls` from the parsed arguments (its fields only), with `override` on top."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{**{k: v for k, v in vars(args).items() if k in names}, **override})


def given_flags(parser, argv):
    """The destinations of the flags actually on the command line (however they were spelled:
    --max-steps=5, a prefix, ...): `parser` parses again with every default suppressed."""
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))
