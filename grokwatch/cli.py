"""The ``grokwatch`` command line. Only ``main()`` exits.

    grokwatch collector --listen tcp://0.0.0.0:5557 --metrics-port 9464 --state-dir /var/lib/grokwatch
    grokwatch collector --check-config collector.toml
    grokwatch demo
    grokwatch report --state-dir DIR --out DIR
    grokwatch replay --checkpoints ckpt/* --samples samples.jsonl --endpoint tcp://127.0.0.1:5557
    grokwatch correlate --state-dir DIR --scores scores.csv
    grokwatch version

Each subcommand imports its side lazily: the collector's commands never import
torch, so they run in the torch-free sidecar image.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Callable, Optional, Sequence

from grokwatch._version import __version__

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")


def _log_level(value: str) -> str:
    level = str(value).strip().upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{value!r} is not one of {', '.join(LOG_LEVELS)}")
    return level


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (RFC 3339, UTC), level, logger, message (and the exception, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def _global_flags(parser: argparse.ArgumentParser, top: bool) -> None:
    """--log-level and --log-format, accepted before or after the subcommand (the later one wins). On the
    subcommands their default is SUPPRESS, so an absent flag there leaves the top level's value."""
    default = (lambda v: v) if top else (lambda v: argparse.SUPPRESS)
    parser.add_argument("--log-level", type=_log_level, metavar="LEVEL",
                        default=default(os.environ.get("GROKWATCH_LOG_LEVEL", "INFO")),
                        help=f"logging level: {', '.join(LOG_LEVELS)} (default INFO, or GROKWATCH_LOG_LEVEL)")
    parser.add_argument("--log-format", choices=LOG_FORMATS,
                        default=default(os.environ.get("GROKWATCH_LOG_FORMAT", "text")),
                        help="text, or json (one object a line, for log pipelines); default GROKWATCH_LOG_FORMAT "
                             "or text")


def _cmd_version(args: argparse.Namespace) -> int:
    print(f"grokwatch {__version__}")
    return 0


def _cmd_collector(args: argparse.Namespace) -> int:
    from grokwatch.collector.service import run_from_args

    return run_from_args(args)


def _cmd_keygen(args: argparse.Namespace) -> int:
    from grokwatch.keys import generate

    public, secret = generate(args.out, args.name)
    print(f"public key: {public}\nsecret key: {secret} (mode 0600: give it only to whoever connects or binds as {args.name})")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from grokwatch.demo import run_demo

    return run_demo(args)


def _cmd_report(args: argparse.Namespace) -> int:
    from grokwatch.collector.report import run_report

    return run_report(args)


def _cmd_replay(args: argparse.Namespace) -> int:
    from grokwatch.agent.replay import run_from_args

    return run_from_args(args)


def _cmd_correlate(args: argparse.Namespace) -> int:
    from grokwatch.collector.report import run_correlate

    return run_correlate(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grokwatch",
        description="Memorization-to-generalization telemetry for MoE pretraining.",
    )
    parser.add_argument("--version", action="version", version=f"grokwatch {__version__}")
    _global_flags(parser, top=True)
    common = argparse.ArgumentParser(add_help=False)  # every subcommand takes the global flags too
    _global_flags(common, top=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("version", parents=[common], help="print the version")
    p.set_defaults(func=_cmd_version)

    p = sub.add_parser("collector", parents=[common], help="run the collector sidecar (ZeroMQ in, /metrics out)")
    p.add_argument("--listen", action="append", metavar="ENDPOINT",
                   help="ZeroMQ endpoint to bind, tcp://HOST:PORT or ipc://PATH (repeatable)")
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="port of the Prometheus /metrics endpoint; 0 picks a free one and logs it")
    p.add_argument("--metrics-addr", metavar="ADDR", help="bind address of /metrics (default 0.0.0.0)")
    p.add_argument("--state-dir", metavar="DIR", help="directory for snapshots and the journal")
    p.add_argument("--tensorboard", metavar="DIR", help="also write TensorBoard event files, one directory a run "
                                                          "(the tensorboard extra; config key tensorboard_dir)")
    p.add_argument("--config", metavar="FILE", help="TOML file with every other setting")
    p.add_argument("--check-config", metavar="FILE", help="validate FILE, print the result, and exit")
    p.set_defaults(func=_cmd_collector)

    p = sub.add_parser("keygen", parents=[common], help="make a ZeroMQ CURVE key pair (NAME.key, NAME.key_secret) for the collector "
                                      "or an agent")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the key files")
    p.add_argument("--name", required=True, help="file name stem, e.g. collector or job-a")
    p.set_defaults(func=_cmd_keygen)

    p = sub.add_parser("demo", parents=[common], help="the main job: a small MoE trains under the agent, a collector "
                                    "watches it, a report is written")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the benchmark's)")
    p.add_argument("--out", default="out/demo", help="output directory (default out/demo)")
    p.add_argument("--metrics-port", type=int, default=9464, help="/metrics port while it runs (0: any)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a benchmark setting (grokwatch/demo/train.py BenchConfig), e.g. num_experts=16")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("report", parents=[common], help="write an HTML report with PNGs from a collector's journal")
    p.add_argument("--state-dir", required=True, help="the collector's state directory")
    p.add_argument("--out", required=True, help="directory for report.html and the PNG files")
    p.add_argument("--run", default=None, help="only this run (default: all)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("replay", parents=[common], help="the paper's offline protocol: probe saved checkpoints into a collector")
    p.add_argument("--checkpoints", nargs="+", required=True,
                   help="save_pretrained directories or .pt checkpoints (see docs/agent.md)")
    p.add_argument("--samples", required=True, help="JSON lines {id, group, input_ids}")
    p.add_argument("--endpoint", required=True, help="the collector's ZeroMQ endpoint")
    p.add_argument("--run", default="replay")
    p.add_argument("--batch-size", type=int, default=16)
    p.set_defaults(func=_cmd_replay)

    p = sub.add_parser("correlate", parents=[common], help="Table-1 correlations of a journal with benchmark scores per checkpoint")
    p.add_argument("--state-dir", required=True, help="the collector's state directory (its journal)")
    p.add_argument("--scores", required=True, help="CSV: a 'step' column and one column of scores per group")
    p.add_argument("--source", default="replay", choices=["train", "probe", "replay"])
    p.add_argument("--run", default=None)
    p.set_defaults(func=_cmd_correlate)
    return parser


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level), handlers=[handler], force=True)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = build_parser()
    for name in ("GROKWATCH_LOG_LEVEL", "GROKWATCH_LOG_FORMAT"):  # a bad default is refused like a bad flag
        value = os.environ.get(name)
        try:
            if value is not None and name.endswith("LEVEL"):
                _log_level(value)
            elif value is not None and value not in LOG_FORMATS:
                raise argparse.ArgumentTypeError(f"{value!r} is not one of {', '.join(LOG_FORMATS)}")
        except argparse.ArgumentTypeError as exc:
            parser.error(f"{name}: {exc}")
    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    from grokwatch.envvars import warn_unknown

    warn_unknown(os.environ)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        code = func(args)
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
