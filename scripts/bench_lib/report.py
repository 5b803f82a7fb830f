"""The figures, their vdisk/qsd ratios, the issue's targets, the table, JSON and plot."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench_lib.paths import JOB_LABELS, PATHS, figure_key


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    unit: str
    better: str  # "higher" or "lower"
    throughput: bool = False


FIGURES = [
    Figure("seq_read_1m_mbps", "seq read 1M", "MiB/s", "higher", True),
    Figure("seq_write_1m_mbps", "seq write 1M", "MiB/s", "higher", True),
    Figure("randread_4k_j1_iops", "rand read 4K, 1 job", "IOPS", "higher", True),
    Figure("randread_4k_j4_iops", "rand read 4K, 4 jobs", "IOPS", "higher", True),
    Figure("randwrite_4k_j1_iops", "rand write 4K, 1 job", "IOPS", "higher", True),
    Figure("randwrite_4k_j4_iops", "rand write 4K, 4 jobs", "IOPS", "higher", True),
]
FIGURES += [  # the I/O matrix on the other access paths (fuse-direct's are above)
    Figure(figure_key(p, job), p.label + JOB_LABELS[job.name],
           "MiB/s" if job.bs == "1M" else "IOPS", "higher", True)
    for p in PATHS.values() if p.prefix for job in p.jobs
]
FIGURES += [
    Figure("randread_4k_p50_us", "rand read 4K p50", "us", "lower"),
    Figure("randread_4k_p99_us", "rand read 4K p99", "us", "lower"),
    Figure("cor_first_read_mbps", "copy-on-read first-touch seq read 1M", "MiB/s", "higher", True),
    Figure("stream_s", "stream whole chain (unthrottled)", "s", "lower"),
    Figure("idle_p99_us", "rand read 4K p99, idle (stream test)", "us", "lower"),
    Figure("stream_p99_us", "rand read 4K p99, during stream", "us", "lower"),
    Figure("stream_p99_over_idle", "p99 during stream / idle p99", "x", "lower"),
    Figure("rss_idle_mib", "RSS idle", "MiB", "lower"),
    Figure("rss_after_stream_mib", "RSS after stream", "MiB", "lower"),
    Figure("hwm_after_stream_mib", "peak RSS (VmHWM) after stream", "MiB", "lower"),
    Figure("rss_sparse_mib", "RSS serving 2 TiB sparse", "MiB", "lower"),
    Figure("hwm_sparse_mib", "peak RSS (VmHWM) serving 2 TiB sparse", "MiB", "lower"),
    Figure("nbd_stream_s", "stream over NBD, 20 ms a read (256 MiB)", "s", "lower"),
    Figure("http_stream_s", "stream over HTTP, nginx (256 MiB)", "s", "lower"),
    Figure("http_cor_read_mbps", "copy-on-read first touch over HTTP, seq 1M", "MiB/s",
           "higher", True),
    Figure("rss_after_remote_stream_mib", "RSS after the NBD stream", "MiB", "lower"),
]


def ratio(v: float | None, q: float | None) -> float | None:
    if v is None or q is None or q == 0:
        return None
    return v / q


def figures(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {}
    for f in FIGURES:
        v = results["vdisk"].get(f.key)
        q = results["qsd"].get(f.key)
        out[f.key] = {"label": f.label, "unit": f.unit, "better": f.better,
                      "vdisk": v, "qsd": q, "ratio": ratio(v, q)}
    return out


def targets(figs: dict[str, dict[str, Any]], ref: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured ratio and whether it is met."""
    out = []

    def add(name: str, measured: float | None, limit: float, higher_ok: bool) -> None:
        met = None if measured is None else (measured >= limit if higher_ok else measured <= limit)
        out.append({"target": name, "measured": measured, "limit": limit,
                    "rule": ">=" if higher_ok else "<=", "met": met})

    def measured(key: str) -> bool:
        return figs[key]["vdisk"] is not None or figs[key]["qsd"] is not None

    for f in FIGURES:
        if f.throughput and measured(f.key):
            add(f"{f.label}: vdisk/qsd", figs[f.key]["ratio"], 1.0, True)
    if measured("rss_idle_mib"):
        add("RSS idle: vdisk/qsd", figs["rss_idle_mib"]["ratio"], 2.0, False)
    add("stream time: vdisk/qsd", figs["stream_s"]["ratio"], 1.0, False)
    v_stream = figs["stream_s"]["vdisk"]
    rebase = ref.get("qemu_img_rebase_s")
    add("stream time: vdisk/qemu-img rebase", ratio(v_stream, rebase), 1.3, False)
    add("vdisk p99 during stream / idle p99", figs["stream_p99_over_idle"]["vdisk"], 2.0, False)
    add("vdisk RSS serving 2 TiB sparse (MiB)", figs["rss_sparse_mib"]["vdisk"], 100.0, False)
    add("vdisk RSS after streaming (MiB)", figs["rss_after_stream_mib"]["vdisk"], 100.0, False)
    if figs["nbd_stream_s"]["vdisk"] is not None:
        add("NBD stream: qsd time / vdisk time", ratio(figs["nbd_stream_s"]["qsd"],
                                                       figs["nbd_stream_s"]["vdisk"]), 10.0, True)
        add("HTTP stream: qsd time / vdisk time", ratio(figs["http_stream_s"]["qsd"],
                                                        figs["http_stream_s"]["vdisk"]), 1.0, True)
        add("vdisk RSS after the NBD stream (MiB)",
            figs["rss_after_remote_stream_mib"]["vdisk"], 100.0, False)
    return out


def _num(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.2f}"


def table(figs: dict[str, dict[str, Any]], ref: dict[str, Any],
          tgts: list[dict[str, Any]]) -> str:
    """A Markdown table (also readable on a terminal)."""
    rows = ["| figure | unit | vdisk | qsd | vdisk/qsd | better |",
            "|---|---|---:|---:|---:|---|"]
    for f in figs.values():
        if f["vdisk"] is None and f["qsd"] is None:
            continue  # not measured in this run (--paths, --no-remote, --only-remote)
        rows.append(f"| {f['label']} | {f['unit']} | {_num(f['vdisk'])} | {_num(f['qsd'])} | "
                    f"{_num(f['ratio'])} | {f['better']} |")
    rows.append(f"| qemu-img rebase -b '' (offline flatten) | s | "
                f"{_num(ref.get('qemu_img_rebase_s'))} | | | lower |")
    rows += ["", "| target | measured | limit | met |", "|---|---:|---:|---|"]
    for t in tgts:
        met = "?" if t["met"] is None else ("MET" if t["met"] else "NOT MET")
        rows.append(f"| {t['target']} | {_num(t['measured'])} | {t['rule']} {_num(t['limit'])} "
                    f"| {met} |")
    return "\n".join(rows)


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")


def plot(path: Path, figs: dict[str, dict[str, Any]]) -> None:
    """A bar chart of vdisk/qsd per figure (1.0 = parity); needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = [f for f in figs.values() if f["ratio"] is not None]
    labels = [f"{f['label']} ({f['better']} is better)" for f in items]
    values = [f["ratio"] for f in items]
    colors = ["tab:green" if (v >= 1) == (f["better"] == "higher") else "tab:red"
              for v, f in zip(values, items, strict=True)]
    fig, ax = plt.subplots(figsize=(10, 0.4 * len(items) + 1.5))
    ax.barh(labels, values, color=colors)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("vdisk / qemu-storage-daemon (log scale; green = vdisk better)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
