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


def _parse_range(spec):
    lo, hi = (x.strip() for x in spec[1:-1].split(","))
    return float(lo), spec[0] == "(", float(hi), spec[-1] == ")"


def check_value(name, value, spec):
    """A ValueError naming the flag when `value` (a number or a tuple of numbers) is not finite or
    not in the interval `spec`."""
    if value is None or spec is None:
        return
    for v in (value if isinstance(value, (tuple, list)) else (value,)):
        lo, lo_open, hi, hi_open = _parse_range(spec)
        bad = not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi)
        if bad:
            raise ValueError(f"{flag(name)} must be in {spec}, got {value}")


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
