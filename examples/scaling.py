"""Strong scaling: the same training job (scaling.toml) at 1, 2, ... ranks; time per epoch, speed-up.

    python examples/scaling.py                       # 1 and 2 ranks, 1 BLAS thread per rank
    python examples/scaling.py --ranks 1 2 4 --threads 1 --set train.epochs=6

Each run is `python -m distnn train scaling.toml -n P` in a temporary run directory; the time per
epoch is the median of the epochs after the first (which pays for start-up and warm caches).
With one thread per rank the speed-up is what the ranks add; with --threads 0 every run uses all
cores (P ranks x cores/P threads), which compares data parallelism with threaded BLAS instead.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIG = Path(__file__).with_name("scaling.toml")


def seconds_per_epoch(ranks, threads, overrides, root):
    """Train at `ranks` ranks; the median seconds of the epochs after the first."""
    run = Path(root) / f"np{ranks}"
    cmd = [sys.executable, "-m", "distnn", "train", str(CONFIG), "-n", str(ranks), "--out", str(run),
           "--threads", str(threads), *[f"--set={s}" for s in overrides]]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["seconds"] for r in records[1:] or records)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="rank counts (default 1 2)")
    p.add_argument("--threads", type=int, default=1, help="BLAS threads per rank (0: cores/ranks)")
    p.add_argument("--set", action="append", default=[], help="config override, as for distnn")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="distnn-scaling-") as root:
        times = {n: seconds_per_epoch(n, args.threads, args.set, root) for n in args.ranks}
    base = times[args.ranks[0]]
    print(f"{'ranks':>5}  {'s/epoch':>8}  {'speed-up':>8}  {'efficiency':>10}")
    for n, t in times.items():
        speedup = base / t
        print(f"{n:>5}  {t:>8.3f}  {speedup:>8.2f}  {speedup * args.ranks[0] / n:>10.0%}")


if __name__ == "__main__":
    main()
