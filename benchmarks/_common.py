"""Shared helpers for the benchmark scripts: timing, extra peak memory, machine description, JSON output.

Deliberately generic (no ``mtlora`` imports, no benchmark-specific shapes) so every script under
``benchmarks/`` can reuse it. A script imports it as ``import _common`` / ``from _common import ...``: when
run as ``python benchmarks/<name>.py`` the script's folder is first on ``sys.path``; tests put it there.

Why these choices:

* **Timing** runs the candidates round-robin (``time_interleaved``): on a shared 2-core machine the
  background load drifts over seconds, and interleaving makes it hit every candidate alike, so ratios measured
  in one process stay meaningful even when absolute times wobble. The median of the repeats is reported.
* **Peak memory on CPU** has no ``torch.cuda.max_memory_allocated`` equivalent and process RSS is far too
  noisy (allocator caching, page reuse, other threads). :func:`peak_extra_memory` instead replays the exact
  allocation/free events that PyTorch's CPU allocator reports to the profiler (``profile_memory=True``),
  in time order, and returns the highest running total above the level at the start: the *extra* bytes the
  function needed at its worst moment, temporaries included, inputs and parameters excluded. On CUDA it is
  ``max_memory_allocated() - memory_allocated()`` around the call.
* :func:`saved_tensor_bytes` is a second, allocator-independent view: the bytes autograd keeps alive for
  backward (via ``saved_tensors_hooks``), which is what dominates training memory at scale.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_device(name: str) -> torch.device:
    """``torch.device(name)``, failing early with a clear message if CUDA was asked for but is absent."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    return device


def resolve_dtype(name: str) -> torch.dtype:
    """Map a CLI dtype name (``float32``/``bfloat16``/``float16``) to the torch dtype."""
    try:
        return DTYPES[name]
    except KeyError:
        raise SystemExit(f"unknown dtype {name!r}; choose from {sorted(DTYPES)}") from None


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so that wall-clock time covers the work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Wall-clock statistics of one candidate, in seconds."""

    median_s: float
    min_s: float
    max_s: float
    times_s: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def time_interleaved(
    fns: Mapping[str, Callable[[], object]],
    *,
    repeats: int,
    warmup: int = 1,
    device: torch.device | str = "cpu",
) -> dict[str, Timing]:
    """Median wall-clock time of each callable, run round-robin ``warmup`` + ``repeats`` times.

    Round-robin rather than one candidate after the other so that slow drifts in background load affect all
    candidates equally (see the module docstring). Warm-up runs (allocator, thread pool, lazy init) are not
    counted. ``torch.set_num_threads`` is left alone on purpose: results are for the default configuration.
    """
    device = torch.device(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {
        name: Timing(statistics.median(ts), min(ts), max(ts), [round(t, 6) for t in ts])
        for name, ts in times.items()
    }


def time_fn(
    fn: Callable[[], object], *, repeats: int, warmup: int = 1, device: torch.device | str = "cpu"
) -> Timing:
    """:func:`time_interleaved` for a single callable."""
    return time_interleaved({"fn": fn}, repeats=repeats, warmup=warmup, device=device)["fn"]


def _cpu_peak_from_profiler(fn: Callable[[], object]) -> int:
    """Highest running total of CPU allocator bytes above the starting level while ``fn`` runs."""
    from torch._C._profiler import _EventType  # private, hence imported here; see peak_extra_memory

    # The autograd-level profiler rather than torch.profiler.profile: the latter imports torch._inductor on
    # start (seconds), which a memory count does not need.
    with torch.autograd.profiler.profile(profile_memory=True) as prof:
        fn()
    events: list[tuple[int, int]] = []
    stack = list(prof.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and str(node.extra_fields.device).startswith("cpu"):
            events.append((node.start_time_ns, int(node.extra_fields.alloc_size)))
        stack.extend(node.children)
    events.sort()
    current = peak = 0
    for _, size in events:
        current += size
        peak = max(peak, current)
    return peak


def peak_extra_memory(fn: Callable[[], object], device: torch.device | str = "cpu") -> tuple[int, str]:
    """``(bytes, method)``: the extra peak memory ``fn`` needs beyond what is allocated when it starts.

    CUDA: the caching allocator's own peak counter. CPU: allocation events recorded by the profiler
    (``profile_memory=True``), replayed in time order (see the module docstring). That reads a private
    profiler structure; if a future torch changes it, this falls back to :func:`saved_tensor_bytes`
    (a lower bound) and says so in ``method``.
    """
    device = torch.device(device)
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base, "torch.cuda.max_memory_allocated"
    try:
        return _cpu_peak_from_profiler(fn), "cpu allocator events (torch.profiler profile_memory)"
    except (ImportError, AttributeError, RuntimeError):  # pragma: no cover - depends on torch internals
        return saved_tensor_bytes(fn), "saved-for-backward bytes (profiler fallback, lower bound)"


def saved_tensor_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of distinct storages autograd saves for backward while ``fn`` runs its forward.

    Storages of ``exclude`` (inputs, parameters: they exist anyway) are not counted, and a storage saved by
    several ops counts once, as in memory.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in skip:
            seen[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def kernel_thp_mode() -> str | None:
    """The kernel's transparent huge page mode (``always``/``madvise``/``never``), None where not Linux."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text(encoding="utf-8")
    except OSError:
        return None
    chosen = [w[1:-1] for w in text.split() if w.startswith("[") and w.endswith("]")]
    return chosen[0] if chosen else text.strip()


def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """What the numbers were measured on (CPU model, cores, threads, versions, load average, GPU if any)."""
    device = torch.device(device)
    info: dict[str, Any] = {
        "device": str(device),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    # glibc malloc tuning changes CPU results a lot (fresh >= 32 MiB tensors are mmap'd and page-faulted in)
    info["malloc_env"] = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    # ... and so do 2 MiB pages: PyTorch madvises allocations >= 2 MiB as huge pages when THP_MEM_ALLOC_ENABLE=1
    # and the kernel's transparent_hugepage mode is "madvise" or "always" (see layer_speed.py)
    info["thp_mem_alloc_enable"] = os.environ.get("THP_MEM_ALLOC_ENABLE")
    info["kernel_transparent_hugepage"] = kernel_thp_mode()
    if hasattr(os, "getloadavg"):  # other users' load explains noisy numbers on a shared machine
        info["load_average_1_5_15min"] = [round(v, 2) for v in os.getloadavg()]
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def write_json(path: str | Path, data: Mapping[str, Any]) -> Path:
    """Write ``data`` as indented JSON (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def journal_read(path: Path) -> dict[str, dict[str, Any]]:
    """The finished runs of a benchmark's journal (one JSON object per line, with a ``key``), by key.

    A torn last line (the process was killed while writing it) is skipped: that run is simply redone.
    """
    done: dict[str, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[entry["key"]] = entry
    return done


def journal_append(path: Path, entry: Mapping[str, Any]) -> None:
    """Append one finished run (already JSON-safe) as one line: a crash loses at most that run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(dict(entry)) + "\n")
