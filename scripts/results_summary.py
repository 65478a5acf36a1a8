#!/usr/bin/env python3
"""Load a fapool results file into pandas DataFrames and print the summary
table `fapool analyze` prints (its "summary" section), from h5py alone.

    python3 scripts/results_summary.py results/run.h5

load(path) returns a dict of DataFrames, one row per (strategy, category)
in "summary", per batch in "batches" and per (batch, rank) in "ranks", each
with `strategy`, `kind` and `category` columns; docs/results-schema.md
describes every column.
"""
import math
import sys

import h5py
import pandas as pd


def _ordered(group):
    """Child groups in the order the run began them (attribute `order`)."""
    items = [(g.attrs.get("order", 2**32), name, g) for name, g in group.items() if isinstance(g, h5py.Group)]
    return [(name, g) for _, name, g in sorted(items, key=lambda x: (x[0], x[1]))]


def _decode(df):
    for col in df.columns:
        if df[col].dtype == object:
            df[col] = df[col].map(lambda v: v.decode("utf-8") if isinstance(v, bytes) else v)
    return df


def load(path):
    frames = {"summary": [], "batches": [], "ranks": []}
    with h5py.File(path, "r") as f:
        if f.attrs.get("format") != "fapool-results" or f.attrs.get("schema_version") not in (1, 2, 3, 4):
            raise SystemExit(f"{path}: not a fapool results file of schema version 1 to 4")
        world = int(f["provenance"].attrs["world_size"])
        for s_name, s in _ordered(f["strategies"]):
            gpus = len(s.attrs.get("world_ranks_used", [])) or world
            for c_name, c in _ordered(s):
                keys = {"strategy": s_name, "kind": s.attrs["kind"], "category": c_name}
                for table in frames:
                    if table in c:
                        df = _decode(pd.DataFrame(c[table][()]))
                        for k, v in keys.items():
                            df.insert(0, k, v)
                        if table == "summary":
                            df["gpus"] = gpus
                        frames[table].append(df)
    return {k: pd.concat(v, ignore_index=True) if v else pd.DataFrame() for k, v in frames.items()}


def num(x):
    """The same four-significant-digit formatting as `fapool analyze`."""
    if not math.isfinite(x):
        return "n/a"
    a = abs(x)
    if a == 0:
        return "0"
    if a >= 999.95:
        return f"{x:.0f}"
    if a >= 99.995:
        return f"{x:.1f}"
    if a >= 0.99995:
        return f"{x:.2f}"
    if a < 9.9995e-4:
        mantissa, exponent = f"{x:.2e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    decimals = min(max(int(2 - math.floor(math.log10(a))), 0), 12)
    return f"{x:.{decimals}f}"


HEADER = ["strategy", "category", "batches", "TTFT ms", "TPOT ms", "TPOT p50", "TPOT p99", "TPS", "tok/s/GPU", "peak GB", "est GB", "comm %", "J/token"]


def summary_rows(summary):
    rows = []
    for _, r in summary.iterrows():
        rows.append([
            r["strategy"], r["category"], str(int(r["batches"])),
            num(r["ttft_mean_s"] * 1e3), num(r["tpot_mean_s"] * 1e3), num(r["tpot_p50_s"] * 1e3), num(r["tpot_p99_s"] * 1e3),
            num(r["tps"]), num(r["tps"] / max(int(r["gpus"]), 1)),
            num(r["peak_memory_max_bytes"] / 1e9) if r["peak_memory_max_bytes"] >= 0 else "n/m",
            num(r["memory_estimate_max_bytes"] / 1e9),
            f"{r['comm_share'] * 100:.1f}",
            num(r["energy_j_per_token"]) if r["energy_measured"] else "n/m",
        ])
    return rows


def print_table(header, rows, left=2):
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]

    def line(cells):
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    print(line(header))
    print("-" * (sum(widths) + 2 * (len(widths) - 1)))
    for row in rows:
        print(line(row))


def main():
    if len(sys.argv) != 2:
        raise SystemExit("usage: results_summary.py RESULTS.h5")
    frames = load(sys.argv[1])
    print("summary")
    print_table(HEADER, summary_rows(frames["summary"]))


if __name__ == "__main__":
    main()
