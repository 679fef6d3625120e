"""Paired before/after: one benchmark script run alternately on a past commit and on the working tree.

    python bench/ab_trees.py --before REV [--after REV] [--rounds 3] [--same-script] -- bench/X.py [its arguments]

The past commit is checked out as a git worktree and importable as ``grokwatch`` through a link tree of
its own (the layout the editable install builds: grokwatch/{agent,collector,wire} from the top-level
folders), so each side runs its own copy of the script against its own code (``--same-script``: the
working tree's copy on both sides, for a script that is new). Rounds alternate
(before, after, before, after, ...) so that drift of the machine falls on both sides alike; every
output line is printed with its side and round, for the medians to be taken from.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("agent", "collector", "wire")


def link_tree(tree: str, into: str) -> str:
    """``into``/grokwatch: the files of ``tree``/grokwatch, and ``tree``'s package folders beneath it."""
    pkg = os.path.join(into, "grokwatch")
    os.makedirs(pkg)
    for name in os.listdir(os.path.join(tree, "grokwatch")):
        os.symlink(os.path.join(tree, "grokwatch", name), os.path.join(pkg, name))
    for name in PACKAGES:
        os.symlink(os.path.join(tree, name), os.path.join(pkg, name))
    return into


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="the commit to compare the working tree with")
    parser.add_argument("--after", help="a commit for the after side too (default: the working tree), so that "
                        "the tree can change while the benchmark runs")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--same-script", action="store_true",
                        help="run the working tree's script on both sides (one that exists only now)")
    parser.add_argument("script", nargs=argparse.REMAINDER, help="-- script.py [its arguments]")
    args = parser.parse_args()
    script = [a for a in args.script if a != "--"]
    if not script:
        parser.error("name the benchmark script after --")
    with tempfile.TemporaryDirectory(prefix="grokwatch-ab-") as tmp:
        trees = {"before": args.before, "after": args.after}
        sides: dict = {}
        try:
            for side, rev in trees.items():
                if rev is None:
                    sides[side] = (ROOT, None)
                    continue
                tree = os.path.join(tmp, side)
                subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", "-q", tree, rev], check=True)
                sides[side] = (tree, link_tree(tree, os.path.join(tmp, side + "-links")))
            for round_ in range(args.rounds):
                for side, (tree, path) in sides.items():
                    env = dict(os.environ)
                    if path is not None:
                        env["PYTHONPATH"] = path + os.pathsep + env.get("PYTHONPATH", "")
                    where = ROOT if args.same_script else tree
                    out = subprocess.run([sys.executable, os.path.join(where, script[0]), *script[1:]], env=env,
                                         cwd=tree, capture_output=True, text=True)
                    for line in (out.stdout + out.stderr).splitlines():
                        print(f"{side:<6} {round_} | {line}", flush=True)
        finally:
            for tree, _ in sides.values():
                if tree != ROOT:
                    subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", tree], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
