"""The ``grokwatch`` command line. Only ``main()`` exits.

    grokwatch collector --listen tcp://0.0.0.0:5557 --metrics-port 9464 --state-dir /var/lib/grokwatch
    grokwatch collector --check-config collector.toml
    grokwatch collector --config collector.toml --state-dir /var/lib/grokwatch --print-config
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
import signal
import sys
import time
from typing import Callable, Mapping, Optional, Sequence

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


def _flag_overrides(args: argparse.Namespace) -> dict:
    """The config keys ``grokwatch collector``'s own flags set (None: the flag was not given)."""
    return dict(listen=tuple(args.listen) if args.listen else None, metrics_port=args.metrics_port,
                metrics_addr=args.metrics_addr, state_dir=args.state_dir,
                tensorboard_dir=getattr(args, "tensorboard", None))


def config_from_args(args: argparse.Namespace, environ: Optional[Mapping[str, str]] = None):
    """The settings ``grokwatch collector`` runs with: flags over GROKWATCH_* variables over --config."""
    from grokwatch.collector.config import load_config

    return load_config(args.config, environ=environ, overrides=_flag_overrides(args))


def _cmd_collector(args: argparse.Namespace) -> int:
    """``grokwatch collector``: runs until SIGTERM/SIGINT; bad config is one line and exit 2."""
    from grokwatch.collector.config import ConfigError
    from grokwatch.collector.service import Collector

    if args.check_config:
        return _check_config(args.check_config, "grokwatch collector")
    if args.print_config:
        return _print_config(args.config, _flag_overrides(args), "grokwatch collector")
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"grokwatch collector: {exc}", flush=True)
        return 2
    try:
        collector = Collector(config)
    except (OSError, ConfigError) as exc:  # an unwritable state directory; more memory than the limit
        print(f"grokwatch collector: cannot start: {exc}", flush=True)
        return 2
    try:
        collector.start()
    except Exception as exc:  # e.g. an endpoint or port already in use
        print(f"grokwatch collector: cannot start: {exc}", flush=True)
        return 2
    print(f"grokwatch collector: listening on {', '.join(collector.endpoints)}; "
          f"/metrics on port {collector.metrics_port}", flush=True)

    def on_signal(signum, frame):
        collector.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    collector.wait()
    collector.stop()
    return 0


def _check_config(path: str, command: str) -> int:
    from grokwatch.collector.config import ConfigError, load_config
    from grokwatch.collector.service import check_memory, memory_limit_mb

    try:
        config = load_config(path)
        check_memory(config, memory_limit_mb())  # as at start: the same refusals, the same line
    except ConfigError as exc:
        print(f"{command}: {exc}", flush=True)
        return 2
    print(f"{path}: ok")
    return 0


def _cmd_config_check(args: argparse.Namespace) -> int:
    return _check_config(args.file, "grokwatch config check")


def _toml_value(value) -> str:
    import math

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(str(value))


def _print_config(path: Optional[str], overrides: Mapping[str, object], command: str) -> int:
    """Every key with the value the collector would use and where it comes from (flag, environment, file,
    default), as a TOML file it reads back (keys left unset by default, None, are comments). Settings that do
    not load are refused in one line, as at start (the memory check is check-config's)."""
    import dataclasses

    from grokwatch.collector.config import ConfigError, config_sources, load_config

    try:
        config = load_config(path, overrides=overrides)
    except ConfigError as exc:
        print(f"{command}: {exc}", flush=True)
        return 2
    sources = config_sources(path, overrides)
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        print(f"# {field.name} = (unset)" if value is None
              else f"{field.name} = {_toml_value(value)}  # {sources[field.name]}")
    return 0


def _cmd_config_show(args: argparse.Namespace) -> int:
    return _print_config(args.config, {}, "grokwatch config show")


def _cmd_keygen(args: argparse.Namespace) -> int:
    from grokwatch.keys import generate

    public, secret = generate(args.out, args.name)
    print(f"public key: {public}\nsecret key: {secret} (mode 0600: give it only to whoever connects or binds as {args.name})")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from grokwatch.demo import run_demo

    return run_demo(args)


def _cmd_report(args: argparse.Namespace) -> int:
    from grokwatch.collector.report import build_report

    if not os.path.isdir(args.state_dir):
        print(f"grokwatch report: {args.state_dir} is not a directory")
        return 2
    path = build_report(args.state_dir, args.out, args.run)
    print(f"report: {path}")
    return 0


def _cmd_replay(args: argparse.Namespace) -> int:
    from grokwatch.agent.replay import load_samples, replay

    try:
        samples = load_samples(args.samples)
        for c in args.checkpoints:
            if not os.path.exists(c):
                raise ValueError(f"{c}: no such checkpoint")
    except ValueError as exc:
        print(f"grokwatch replay: {exc}")
        return 2
    steps = replay(args.checkpoints, samples, args.endpoint, args.run, args.batch_size,
                   on_checkpoint=lambda p, s: print(f"replayed {p} (step {s})", flush=True))
    print(f"replayed {len(steps)} checkpoints over {len(samples)} samples")
    return 0


def _cmd_correlate(args: argparse.Namespace) -> int:
    from grokwatch.collector.analysis import METRIC_TITLES
    from grokwatch.collector.report import correlate, format_cell

    try:
        rows = correlate(args.state_dir, args.scores, args.source, args.run)
    except (OSError, ValueError) as exc:
        print(f"grokwatch correlate: {exc}")
        return 2
    if not rows:
        print(f"grokwatch correlate: no {args.source} points of the CSV's groups in {args.state_dir}")
        return 1
    head = f"{'run':<14} {'group':<10} {'metric':<22} {'n':>3} {'pearson':>8} {'spearman':>8} {'r(entropy)':>10} " \
           f"{'r(H(g))':>8} {'r(len)':>8} {'r(step)':>8} {'partial':>8} {'p|H(g)':>8} {'p|step':>8}"
    print(head)
    for row in rows:
        print(f"{row['run'][:14]:<14} {row['group'][:10]:<10} {METRIC_TITLES[row['metric']][:22]:<22} {row['n']:>3} "
              f"{format_cell(row['pearson']):>8} {format_cell(row['spearman']):>8} {format_cell(row['vs_entropy']):>10} "
              f"{format_cell(row['vs_mean_entropy']):>8} {format_cell(row['vs_length']):>8} {format_cell(row['vs_step']):>8} "
              f"{format_cell(row['partial_entropy']):>8} {format_cell(row['partial_mean_entropy']):>8} {format_cell(row['partial_step']):>8}")
    return 0


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
    p.add_argument("--check-config", metavar="FILE", help="validate FILE, print the result, and exit (the same as "
                                                          "grokwatch config check FILE)")
    p.add_argument("--print-config", action="store_true",
                   help="print the settings this command line would run with, each with where it came from "
                        "(flag, GROKWATCH_* variable, --config file, default), as TOML, and exit")
    p.set_defaults(func=_cmd_collector)

    p = sub.add_parser("config", parents=[common], help="check a collector config file, or print the effective one")
    verbs = p.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True
    v = verbs.add_parser("check", parents=[common], help="validate FILE as the collector would at start, and exit "
                                                         "(as promtool check config)")
    v.add_argument("file", metavar="FILE")
    v.set_defaults(func=_cmd_config_check)
    v = verbs.add_parser("show", parents=[common], help="print the settings the collector would run with (defaults, "
                                                        "--config FILE, GROKWATCH_* variables) as TOML")
    v.add_argument("--config", metavar="FILE", help="TOML file, as for grokwatch collector")
    v.set_defaults(func=_cmd_config_show)

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
