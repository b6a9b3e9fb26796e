"""The former single-file reporter, kept so `from taskcast_reporter import Reporter` and the
CLI keep working; the code is in the `taskcast` package.

CLI (used by the tests): python3 taskcast_reporter.py --url U --key K --task T [--stage S]
walks task T to completed, then exits 0 after flush whether or not progress got through.
"""

import argparse
import json
import os
import sys
import time

from taskcast import FINAL, Reporter
from taskcast._delivery import note

__all__ = ["FINAL", "Reporter", "main"]


def main() -> int:
    p = argparse.ArgumentParser(description="Walk a task to completed through taskcast.")
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("--key", default=os.environ.get("TASK_PROCESS_SECRET_KEY", "development-key"))
    p.add_argument("--task", required=True)
    p.add_argument("--stage", default="done", help="stage text of the final update")
    p.add_argument("--delay", type=float, default=0.02, help="seconds between updates")
    args = p.parse_args()
    task = args.task
    reporter = Reporter(args.url, args.key)
    reporter.report(task, status="pending", stage="queued")
    for percent in range(0, 101, 10):
        reporter.report(task, status="processing", stage="generating", progress=percent)
        time.sleep(args.delay)
    reporter.report(task, stage="uploading")
    url = f"https://cdn.example.com/taskcast/{task}.png"
    reporter.report(task, status="completed", progress=100, stage=args.stage, image_url=url)
    if not reporter.flush(10):
        note("some progress was not delivered; the generation itself is not affected")
    print(json.dumps(reporter.stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
