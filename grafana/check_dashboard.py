#!/usr/bin/env python3
"""Sanity-check the fleetsql Grafana dashboard (stdlib only).

Usage: python3 grafana/check_dashboard.py [path/to/dashboard.json]

Checks:
  * the file is valid JSON with a top-level "panels" list
  * every panel id (including panels nested in collapsed rows) is unique
  * every gridPos fits the 24-column grid and no two panels overlap
Then prints every metric name starting with "fleetsql_" referenced by a
target expression, sorted and unique, one per line on stdout. Histogram
series are printed as referenced (e.g. fleetsql_query_duration_seconds_bucket),
i.e. exactly as they appear in the /metrics exposition.

Exit status is non-zero (AssertionError) if a check fails.
"""
import json
import os
import re
import sys

GRID_WIDTH = 24
METRIC_RE = re.compile(r"\bfleetsql_[A-Za-z0-9_:]*")


def iter_panels(panels):
    for p in panels:
        yield p
        # Collapsed rows carry their children in "panels".
        yield from iter_panels(p.get("panels", []) or [])


def cells(gp):
    for x in range(gp["x"], gp["x"] + gp["w"]):
        for y in range(gp["y"], gp["y"] + gp["h"]):
            yield (x, y)


def main(argv):
    default = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dashboards", "fleetsql.json")
    path = argv[1] if len(argv) > 1 else default
    with open(path, encoding="utf-8") as f:
        dash = json.load(f)
    assert isinstance(dash.get("panels"), list), "dashboard has no 'panels' list"

    panels = list(iter_panels(dash["panels"]))
    assert panels, "dashboard has no panels"

    seen_ids = {}
    occupied = {}
    metrics = set()
    for p in panels:
        pid = p.get("id")
        title = p.get("title", "<untitled>")
        assert isinstance(pid, int), f"panel {title!r} has no integer id"
        assert pid not in seen_ids, f"duplicate panel id {pid}: {seen_ids[pid]!r} and {title!r}"
        seen_ids[pid] = title

        gp = p.get("gridPos")
        assert gp, f"panel {title!r} has no gridPos"
        for k in ("x", "y", "w", "h"):
            assert isinstance(gp.get(k), int) and gp[k] >= 0, f"panel {title!r} bad gridPos.{k}"
        assert gp["w"] > 0 and gp["h"] > 0, f"panel {title!r} has empty gridPos"
        assert gp["x"] + gp["w"] <= GRID_WIDTH, f"panel {title!r} exceeds {GRID_WIDTH} columns"
        for c in cells(gp):
            assert c not in occupied, f"panels {occupied[c]!r} and {title!r} overlap at {c}"
            occupied[c] = title

        for t in p.get("targets", []) or []:
            expr = t.get("expr", "")
            metrics.update(METRIC_RE.findall(expr))

    for m in sorted(metrics):
        print(m)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
