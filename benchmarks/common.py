"""What every benchmark script shares: the machine's description, a timer, result entries, a table.

A figure is an *entry*: its value and unit, a reference value measured in the same run (the
thing it is compared with), their ratio, and, where vlmkit sets one, a target on that
ratio (reported as met or missed, never asserted: timings are not tests). Scripts write
their entries with `save_entries`; `run_all.py` merges them into runs/bench/results.json.
The scripts live beside this file and import it by name (`python benchmarks/x.py` puts
this folder on sys.path).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "runs" / "bench"


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """What the figures were measured on."""
    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "device": device()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def machine_line(info: dict | None = None) -> str:
    info = info or machine()
    where = info.get("gpu") or f"{info['cpu']}, {info['cores']} cores, {info['torch_threads']} torch threads"
    return f"{where}; torch {info['torch']}"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], warmup: int = 1, repeats: int = 3) -> dict:
    """Median wall time of `fn` over `repeats` runs after `warmup` unmeasured ones (GPU work awaited)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times}


def matmul_peak(dev: str, dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    """This machine's matmul throughput in FLOP/s: the best of `repeats` n x n x n torch.mm."""
    a, b = (torch.randn(n, n, device=dev, dtype=dtype) for _ in range(2))
    result = timed(lambda: torch.mm(a, b), warmup=1, repeats=repeats)
    return 2 * n**3 / result["min_s"]  # the best run: the machine's capability, not its noise


# A figure is flagged as taken under load when, just before or just after its script, other
# processes used more than this share of the machine's cores, or the matmul probe ran below
# this share of the best probe of the run.
LOAD_SHARE, PEAK_SHARE = 0.15, 0.85


def _cpu_busy_seconds() -> float | None:
    """CPU seconds every process on the machine has spent busy since boot (Linux's /proc/stat)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle and iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def load_probe(n: int = 1024, seconds: float = 1.0) -> dict:
    """How free the machine is right now: float32 matmul throughput (median of the products run
    for about `seconds`) and the share of all cores that *other* processes kept busy meanwhile
    (the machine's busy CPU time minus this process's own)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    busy, own, start = _cpu_busy_seconds(), time.process_time(), time.perf_counter()
    times = []
    while time.perf_counter() - start < seconds or len(times) < 3:
        began = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - began)
    elapsed = time.perf_counter() - start
    others = None
    if busy is not None:
        others = max(0.0, (_cpu_busy_seconds() - busy) - (time.process_time() - own)) / (elapsed * os.cpu_count())
    return {"matmul_gflops": 2 * n**3 / statistics.median(times) / 1e9, "others_share": others}


def load_problem(probes: list[dict], best_gflops: float) -> str | None:
    """Why figures taken between these probes were taken under load, or None."""
    for probe in probes:
        if probe["others_share"] is not None and probe["others_share"] > LOAD_SHARE:
            return f"other processes kept {probe['others_share']:.0%} of the cores busy"
        if probe["matmul_gflops"] < PEAK_SHARE * best_gflops:
            return f"the matmul probe ran at {probe['matmul_gflops'] / best_gflops:.0%} of the run's best"
    return None


def _status_mib(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Start this process's resident-memory high-water mark again from now (Linux; False elsewhere).

    So a figure can leave out what setting up took (loading a corpus, building an index).
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """This process's resident-memory high-water mark: VmHWM on Linux (what ru_maxrss reports, but
    resettable by `reset_peak_rss`), else ru_maxrss (KiB on Linux, bytes on macOS)."""
    peak = _status_mib("VmHWM")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def rss_mib() -> float:
    """This process's resident memory now."""
    now = _status_mib("VmRSS")
    return now if now is not None else peak_rss_mib()


def entry(name: str, value: float | None, unit: str, reference: float | None, reference_name: str,
          target_min: float | None = None, target_max: float | None = None, note: str = "", **details) -> dict:
    """One figure. `ratio` is value / reference; a target bounds the ratio (`met` is None without one)."""
    ratio = value / reference if value is not None and reference else None
    met = None
    if ratio is not None and (target_min is not None or target_max is not None):
        met = (target_min is None or ratio >= target_min) and (target_max is None or ratio <= target_max)
    target = " and ".join(t for t in (target_min is not None and f">= {target_min:.3g}",
                                      target_max is not None and f"<= {target_max:.3g}") if t)
    return {"name": name, "value": value, "unit": unit, "reference": reference, "reference_name": reference_name,
            "ratio": ratio, "target": f"ratio {target}" if target else None, "met": met, "note": note,
            "machine": machine_line(), "details": details}


def write_json_atomic(path: Path, data) -> None:
    """Write JSON to a temporary file beside `path`, then rename it over `path` (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def save_entries(path: Path | None, entries: list[dict], started: float) -> None:
    """Print the table; write {"machine", "seconds", "entries"} to `path` when given."""
    print_table(entries)
    if path:
        write_json_atomic(Path(path), {"machine": machine(), "seconds": time.perf_counter() - started,
                                       "entries": entries})


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
    return str(x)


def print_table(entries: list[dict], title: str | None = None) -> None:
    """A table of entries: rich when installed, plain text otherwise."""
    headers = ("figure", "value", "unit", "reference", "ratio", "target", "met")
    rows = [(e["name"] + (" [UNDER LOAD]" if e.get("loaded") else ""), _fmt(e["value"]), e["unit"],
             f"{_fmt(e['reference'])} ({e['reference_name'] or '-'})",
             _fmt(e["ratio"]), e["target"] or "", {True: "yes", False: "MISS", None: ""}[e["met"]])
            for e in entries]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
        print(title or "")
        for r in [headers, *rows]:
            print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    else:
        table = Table(title=title)
        for h in headers:
            table.add_column(h, overflow="fold")
        for r in rows:
            table.add_row(*r)
        Console(width=max(120, len(title or ""))).print(table)
    for e in entries:
        if e["note"]:
            print(f"  note, {e['name']}: {e['note']}")


def parser(doc: str, child_jobs: bool = False) -> argparse.ArgumentParser:
    """An argument parser with the options every script takes: --small and --out (and, for scripts
    that measure in fresh processes, the internal --child JSON job: see `ran_child`)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(doc.splitlines()[1:]))
    p.add_argument("--small", action="store_true", help="the quick sizes (seconds, for a check that it runs)")
    p.add_argument("--out", type=Path, help="write the entries here as JSON (run_all.py passes this)")
    if child_jobs:
        p.add_argument("--child", help="internal: one measurement (a JSON job) in this process")
    return p


def ran_child(args, child: Callable[[dict], dict]) -> bool:
    """When this process was started for one `--child` job: run it, hand its result back, say so."""
    if not getattr(args, "child", None):
        return False
    emit(child(json.loads(args.child)))
    return True


def run_python(args: list[str], timeout: float, env: dict | None = None,
               own_group: bool = False) -> tuple[int | None, str, float]:
    """Run `python ARGS` in a fresh process; (exit code or None on timeout, stdout then stderr, seconds).

    With `own_group` the child leads a process group, and a time-out (or Ctrl-C) kills the
    whole group: the child's own children too. Without it, only the child is killed.
    """
    start = time.perf_counter()
    with subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, **(env or {})}, cwd=ROOT, start_new_session=own_group) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
            code = proc.returncode
        except BaseException as problem:
            if own_group:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
            if not isinstance(problem, subprocess.TimeoutExpired):
                raise
            out, err = proc.communicate()
            code = None
    return code, out + err, time.perf_counter() - start


def child_result(output: str) -> dict:
    """The JSON object a child printed on its last line starting with RESULT (see `emit`)."""
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise RuntimeError("the child printed no RESULT line:\n" + output[-2000:])
    return json.loads(lines[-1][len("RESULT "):])


def emit(result: dict) -> None:
    """Hand a child's result to its parent (`child_result` reads it)."""
    print("RESULT " + json.dumps(result), flush=True)


def synth_train_data(n: int) -> Path:
    """The built-in SFT split (`vlmkit data synth`), n records, made once under runs/bench/data."""
    from vlmkit.data.synth import synth

    out = OUT_DIR / "data" / f"synth-train-{n}"
    if not (out / "train.jsonl").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".synth-", dir=out.parent))  # renamed when complete
        synth(tmp, sizes={"train": n, "captions": 0, "val": 0, "test": 0, "compositional": 0}, workers=1,
              progress=False)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    return out / "train.jsonl"
