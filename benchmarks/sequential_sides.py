"""The CPU benchmarks too big to hold both sides in memory at once (sdxl_unet_cpu.py, upscaler_cpu.py,
lora_memory.py): each side is the script run again in its own process, `--side NAME`, started only once the
previous one has exited and the host has enough available memory; a side prints its results as one last line
`JSON {...}`, with its peak resident memory (`ru_maxrss`, Linux's VmHWM, which counts the pages of memory-mapped
files) and its own and file-backed resident memory at the end (`resident_gib`). Free of PyTorch, so that a jaxdiff side
needs none; the versions of torch and diffusers are read from their installed metadata."""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import resource
import subprocess
import sys
import time

from jaxdiff.training.memory import host_available

GIB = 2**30
MEMORY_WAIT_S = 600  # how long a side waits for the memory it needs before the run stops
RESULT_PREFIX = "JSON "


def add_side_options(parser: argparse.ArgumentParser, sides: tuple[str, ...]) -> None:
    """The hidden options a side is run with: --side NAME and --folder (the run's temporary folder)."""
    parser.add_argument("--side", choices=sides, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)


def check_side_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.side is not None and args.folder is None:
        parser.error("--side needs --folder")


def peak_rss_gib() -> float:
    """This process's peak resident memory in GiB (`ru_maxrss`, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def reset_peak_rss() -> None:
    """Restart the peak of `resident_gib()["peak"]` (VmHWM) from the present RSS (Linux: /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")


def resident_gib() -> dict[str, float]:
    """This process's resident memory now, in GiB: "rss" (all), "anon" (its own pages), "file" (mapped file pages,
    e.g. a memory-mapped safetensors file, which count in RSS and its peak but are the page cache's to reclaim) and
    "peak" (VmHWM, since the start or `reset_peak_rss`); empty where /proc/self/status does not say."""
    fields = {"VmRSS:": "rss", "RssAnon:": "anon", "RssFile:": "file", "VmHWM:": "peak"}
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return {fields[line.split()[0]]: int(line.split()[1]) / 2**20 for line in f if line.split()[0] in fields}
    except OSError:
        return {}


def print_result(result: dict) -> None:
    """A side's last output line: its results with its peak RSS and its resident memory at the end."""
    final = {f"final_rss_{kind}_gib": gib for kind, gib in resident_gib().items() if kind in ("anon", "file")}
    print(RESULT_PREFIX + json.dumps({**result, "peak_rss_gib": peak_rss_gib(), **final}), flush=True)


def wait_for_memory(need_gib: float, what: str) -> None:
    """Return once the host has `need_gib` GiB available (MemAvailable, or the cgroup's room); stop the run
    (SystemExit naming `what`) when it has not after MEMORY_WAIT_S seconds."""
    deadline = time.monotonic() + MEMORY_WAIT_S
    while (available := host_available()) is not None and available < need_gib * GIB:
        if time.monotonic() > deadline:
            raise SystemExit(f"{what}: {available / GIB:.1f} GiB available after {MEMORY_WAIT_S} s of waiting, "
                             f"{need_gib} GiB needed; not started")  # fmt: skip
        print(f"{what}: {available / GIB:.1f} GiB available, waiting for {need_gib} GiB", flush=True)
        time.sleep(15)


def run_side(script: str, side: str, arguments: list[str], *, need_gib: float) -> dict:
    """The result dict of `script --side side *arguments`, run by this interpreter once `need_gib` GiB are
    available; its other output is passed through."""
    wait_for_memory(need_gib, f"side {side}")
    completed = subprocess.run([sys.executable, script, "--side", side, *arguments], stdout=subprocess.PIPE,
                               text=True, check=False)  # fmt: skip
    lines = completed.stdout.splitlines()
    passed = [line for line in lines if not line.startswith(RESULT_PREFIX)]
    if passed:
        print("\n".join(passed), flush=True)
    results = [line for line in lines if line.startswith(RESULT_PREFIX)]
    if completed.returncode or not results:
        raise SystemExit(f"side {side} failed (exit status {completed.returncode})")
    return json.loads(results[-1][len(RESULT_PREFIX):])


def machine() -> dict:
    """The CPU model and cores, the date (UTC), the 1-minute load average and the versions of Python, JAX, torch
    and diffusers."""
    model = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass

    def version(package):
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    now = datetime.datetime.now(datetime.timezone.utc)
    return {"cpu": model, "cores": len(os.sched_getaffinity(0)), "date": now.strftime("%Y-%m-%d %H:%M UTC"),
            "load": os.getloadavg()[0], "python": platform.python_version(),
            **{p: version(p) for p in ("jax", "jaxlib", "torch", "diffusers")}}  # fmt: skip
