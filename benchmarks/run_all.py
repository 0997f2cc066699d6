"""Run every benchmark, each in its own process, into runs/bench/results.json, and print the table.

    python benchmarks/run_all.py [--small] [--only search,gradcache]      # `make bench` runs it plain

Each script writes its entries to runs/bench/parts/NAME.json; they are merged (with the
machine's description and each script's time) into results.json through a temporary file
and a rename, so the file is never half-written. With --only, the other scripts' entries
already in results.json are kept. A script that fails or runs out of time is an entry that
says so, and the others still run. Each script has a time limit (about twice its expected
time), and all of them together a budget (--budget, 20 minutes full size): a script left
without time is an entry saying so. Full-size runs copy the plots to docs/.
Expected time on a 2-core CPU: about 14 minutes full size (measured with one thread: an
upper bound), 5 small.

Before and after each script a one-second probe (`common.load_probe`) measures how much of the
machine other processes use and how fast a matmul runs; a script whose probes show other work
on more than 15% of the cores, or a matmul below 85% of the run's best probe, has its figures
marked "taken under load" in results.json and in the table, with the reason.
"""

from __future__ import annotations

import datetime
import json
import shutil
import time
from pathlib import Path

import common

# Script name -> time limit in seconds, full size (about twice the expected time here) and small.
SCRIPTS = {
    "train_throughput": (720, 420),
    "data_loading": (180, 120),
    "generation": (180, 120),
    "search": (420, 180),
    "gradcache": (480, 180),
    "pdf_render": (240, 120),
}
PLOTS = {"train_throughput": "bench_throughput.png", "gradcache": "bench_gradcache_memory.png"}


def run_one(name: str, small: bool, parts: Path, left: float) -> tuple[list[dict], dict]:
    """One script's entries (or one saying why there are none) and its time; at most `left` seconds."""
    part = parts / f"{name}.json"
    part.unlink(missing_ok=True)
    limit = min(SCRIPTS[name][1 if small else 0], left)
    if limit < 10:
        return [common.entry(f"{name} NOT RUN", None, "", None, "", note="the time budget was used up")], {}
    args = [str(Path(__file__).with_name(f"{name}.py")), "--out", str(part), *(["--small"] if small else [])]
    print(f"== {name} (limit {limit:.0f} s)", flush=True)
    code, output, seconds = common.run_python(args, timeout=limit, own_group=True)
    status = {"seconds": seconds, "exit": code}
    if code == 0 and part.is_file():
        entries = json.loads(part.read_text())["entries"]
    else:
        why = f"ran out of its {limit:.0f} s" if code is None else f"failed (exit {code})"
        last = output.strip().splitlines()[-1] if output.strip() else ""
        print(output[-3000:], flush=True)
        entries = [common.entry(f"{name} FAILED", None, "", None, "", note=f"{why}: {last}")]
    print(f"   {seconds:.0f} s", flush=True)
    return entries, status


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--only", help="comma-separated script names, from: " + ", ".join(SCRIPTS))
    parser.add_argument("--budget", type=float, help="seconds for all of them (default 1200, small 600)")
    args = parser.parse_args()
    out = args.out or common.OUT_DIR / "results.json"
    names = args.only.split(",") if args.only else list(SCRIPTS)
    unknown = sorted(set(names) - set(SCRIPTS))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(SCRIPTS)}")

    started = time.perf_counter()
    deadline = started + (args.budget or (600 if args.small else 1200))
    entries, scripts = [], {}
    probe = common.load_probe()
    for name in names:
        before = probe
        got, scripts[name] = run_one(name, args.small, out.parent / "parts", deadline - time.perf_counter())
        probe = common.load_probe()
        scripts[name]["load_probes"] = [before, probe]
        entries += [{**e, "script": name} for e in got]
    best = max(p["matmul_gflops"] for s in scripts.values() for p in s.get("load_probes", []))
    for name, status in scripts.items():
        problem = common.load_problem(status.get("load_probes", []), best)
        status["under_load"] = problem
        for e in entries:
            if e.get("script") == name and problem:
                e["loaded"] = True
                e["note"] = "; ".join(n for n in (e["note"], f"taken under load: {problem}") if n)
    if args.only and out.is_file():  # keep the figures of the scripts not run this time
        previous = json.loads(out.read_text())
        entries = [e for e in previous["entries"] if e.get("script") not in names] + entries
        scripts = {k: v for k, v in previous.get("scripts", {}).items() if k not in names} | scripts
    results = {"machine": common.machine(), "small": args.small, "finished": datetime.datetime.now().isoformat(),
               "seconds": time.perf_counter() - started, "scripts": scripts, "entries": entries}
    common.write_json_atomic(out, results)
    for name, plot in PLOTS.items():  # a full-size run's fresh plots only
        if not args.small and scripts.get(name, {}).get("exit") == 0 and name in names:
            shutil.copyfile(common.OUT_DIR / plot, common.ROOT / "docs" / plot)
    common.print_table(entries, title=f"vlmkit benchmarks ({common.machine_line()})")
    print(f"{len(entries)} figures in {out} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
