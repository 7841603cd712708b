"""Run one benchmark and keep its raw output: every figure in RESULTS.md points at such a file.

    .venv/bin/python benchmarks/record.py bench_train.py --steps 5

writes benchmarks/runs/<UTC date-time>_<benchmark>.txt holding the command, the date, the commit,
the machine (cores, load average before and after) and everything the benchmark printed.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    script, args = sys.argv[1], sys.argv[2:]
    cmd = [sys.executable, str(HERE / script), *args]
    stamp = time.strftime("%Y-%m-%dT%H%M", time.gmtime())
    out = HERE / "runs" / f"{stamp}_{Path(script).stem}.txt"
    out.parent.mkdir(exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
    head = [f"command: .venv/bin/python benchmarks/{script} {' '.join(args)}".rstrip(),
            f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", f"commit: {commit}",
            f"machine: {os.cpu_count()} cores, load average before {os.getloadavg()[0]:.1f}"]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    head += [f"load average after {os.getloadavg()[0]:.1f}; wall time {time.time() - t0:.0f} s; exit {proc.returncode}",
             "-" * 80]
    out.write_text("\n".join(head) + "\n" + proc.stdout + (("\n[stderr]\n" + proc.stderr[-4000:]) if proc.returncode else ""))
    print(out.read_text())
    print(f"recorded: {out.relative_to(HERE.parent)}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
