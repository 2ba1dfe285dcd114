"""Headline figures of every benchmark's results JSON, as a short markdown summary.

Run from the repository root (``make bench`` runs it last)::

    .venv/bin/python benchmarks/summarize.py                                       # prints the summary
    .venv/bin/python benchmarks/summarize.py --out benchmarks/results/SUMMARY.md   # and writes it

One entry per results JSON present in ``--results`` (default ``benchmarks/results``):
the run's date and load average (1-minute, at its start and end), then one line per
headline figure. Known benchmarks that have no JSON yet get a one-line note; a JSON
this script does not know gets its date, load and any ratio or slowdown figures.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
# results file -> the script that writes it (in make bench's order)
KNOWN = {
    "bench_startup.json": "bench_startup.py",
    "bench_extract.json": "bench_extract.py",
    "bench_search.json": "bench_search.py",
    "bench_methods.json": "bench_search.py --methods-cost",
    "scale.json": "bench_scale.py",
    "bench_guard.json": "bench_guard.py",
    "bench_peers.json": "bench_peers.py",
    "bench_load.json": "bench_load.py",
}
UNREADABLE = (KeyError, TypeError, IndexError, ValueError, AttributeError, ZeroDivisionError)


def _f(value, digits=2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def load_of(result: dict) -> str:
    """The 1-minute load average at the start and the end of a run, as each benchmark records it."""

    def at(*keys):  # result[k0][k1]..., or None where a level is missing or not a mapping
        node = result
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
        return node

    pairs = [(at("machine", "loadavg_start"), at("machine", "loadavg_end")),
             (at("load_average", "before"), at("load_average", "after")),
             (at("code", "load_average", "before"), at("code", "load_average", "after"))]
    for start, end in pairs:
        if isinstance(start, list) and isinstance(end, list) and start and end:
            return f"load {start[0]:.2f} -> {end[0]:.2f}"
    return "load not recorded"


def startup(r: dict) -> list[str]:
    code = r["code"]
    imports = ", ".join(f"{cmd} {row['import_s']:.2f}" for cmd, row in code["commands"].items())
    starts = ", ".join(f"{cmd} {row['start_s']:.2f}" for cmd, row in code["commands"].items() if "start_s" in row)
    runs = ", ".join(f"{cmd} {row['run_s']:.2f}" for cmd, row in code["commands"].items() if row["run_s"] is not None)
    torch_free = [cmd for cmd, row in code["commands"].items() if not row["torch"]]
    return [f"start-up s (`python -c 'import stages.<x>'`): {imports}",
            (f"start s (the same imports, then the command's quick exit; goal < 1.5 s, extract within 1 s of torch): "
            f"{starts or 'not measured'}"),
            (f"reference s: `import torch` {code['references']['import torch']:.2f}, "
            f"`python -c pass` {code['references']['python -c pass']:.2f}"),
            f"real commands s: {runs or 'none measured'}; commands that import no torch: {', '.join(torch_free)}"]


def extract(r: dict) -> list[str]:
    t = r["throughput"]
    lines = [(f"extract / forward: {t['ratio_extract_median']:.3f} (median), {t['ratio_extract_best']:.3f} (best); "
             f"goal >= 0.9"),
             f"img/s (median): forward {t['forward']['median_img_s']:.0f}, extract {t['extract']['median_img_s']:.0f}"]
    if "ratio_extract_with_grads_median" in t:
        lines.append(f"extract with grad_layers / forward: {t['ratio_extract_with_grads_median']:.3f}")
    return lines


def search(r: dict) -> list[str]:
    c, u, ratio = r["cached"], r["uncached"], r["ratio"]
    return [(f"search: {c['rows']} configurations in {c['wall']['median']:.2f} s, "
            f"{c['per_config_seconds'] * 1000:.1f} ms per configuration (cold: {c['cold_per_config_seconds'] * 1000:.1f})"),
            (f"uncached (re-extract + fit + score) per configuration: {u['total']['median']:.2f} s; "
            f"ratio uncached / cached {ratio['median']:.0f}x (goal >= {ratio['goal']}x)")]


def methods(r: dict) -> list[str]:
    lines = []
    for key, what in (("detect_seconds", "detect s per method"), ("fit_seconds", "fit s per detector")):
        values = r[key]
        slowest = sorted(values, key=values.get, reverse=True)[:3]
        lines.append(f"{what}: {len(values)} timed, slowest " + ", ".join(f"{m} {values[m]:.2f}" for m in slowest))
    return lines


def scale(r: dict) -> list[str]:
    runs = r["runs"]
    walls = ", ".join(f"{name} fit {run['fit_s']:.1f} / detect {run['detect_s']:.1f}" for name, run in runs.items())
    return [(f"peak RSS 10N / N: fit {r['rss_ratio_10n_over_n']['fit']:.2f}, detect "
            f"{r['rss_ratio_10n_over_n']['detect']:.2f} (goal < 1.3)"),
            f"fit / detect wall s (N = {r['n']} ID-train rows, 10N = {10 * r['n']}): {walls}"]


def guard(r: dict) -> list[str]:
    timing = r["splits"]["id_test"]["timing"]
    ood = r["ood_mean"]
    lines = [(f"guard / plain on ID (`id_test`): {_f(timing['256']['speedup'])}x at batch 256 (goal >= 1.0), "
              f"{_f(timing['1']['speedup'])}x at batch 1 (goal >= 0.9)"),
             (f"guard / plain on OOD (mean of sets): {_f(ood['speedup_batch_256'])}x at batch 256, "
              f"{_f(ood['speedup_batch_1'])}x at batch 1 (goal >= 1.5); FLOPs saved {ood['flops_saved']:.0%}")]
    w = r.get("work_breakdown")
    if w:  # older results have none
        lines.append(f"a batch of {w['batch']} ID inputs, ms: plain {w['plain_ms']:.2f}, guard {w['guard_ms']:.2f} "
                     f"(network {w['network_ms']:.2f}); the guard's own work {w['own_work_ms']:.2f} (pooling "
                     f"{w['pooling_ms']:.2f}, scoring {w['scoring_ms']:.2f}, drops {w['drops_ms']:.2f}, rest "
                     f"{w['rest_ms']:.2f}) against at most {w['saving_at_most_ms']:.2f} its exits can save")
    return lines


def peers(r: dict) -> list[str]:
    lines = []
    for name, row in r["rows"].items():
        cells = [f"{col} {c['median_s']:.1f} s [{c['min_s']:.1f}-{c['max_s']:.1f}]"
                 + (f" ({row['ratios'][f'{col}/pytorch_ood_examples']:.2f}x)"
                    if f"{col}/pytorch_ood_examples" in row["ratios"] else "")
                 for col, c in row["columns"].items()]
        worst = max(v for pair in row["auroc_max_abs_diff"].values() for v in pair.values())
        lines.append(f"peers, {name} ({row['images']} images, {row['splits']} splits): " + "; ".join(cells)
                     + f"; AUROCs agree to {worst:.1e}")
    return lines + [f"pytorch-ood {r['pytorch_ood']}, {r['repeats']} interleaved round(s)"
                    + (" (--quick)" if r.get("quick") else "")]


def load(r: dict) -> list[str]:
    lines = []
    for name, run in r["runs"].items():
        quiet, loaded = run["quiet"], run["loaded"]
        lines.append(f"dvc repro ({name}, {run['commit']}): quiet {quiet['seconds']:.0f} s, beside "
                     f"{r['config']['load']} busy process(es) {loaded['seconds']:.0f} s"
                     f"{' (stopped at the timeout)' if loaded['timed_out'] else ''} -> {run['slowdown']:.2f}x "
                     f"(goal <= {r['config']['goal_max_slowdown']}x); load {quiet['loadavg_before'][0]:.2f} quiet, "
                     f"{loaded['loadavg_after'][0]:.2f} loaded")
    return lines


def generic(r: dict) -> list[str]:
    """A JSON of an unknown layout: every number under a key that names a ratio or a slowdown (at most 8)."""
    found = []

    def walk(node, path):
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{path}.{key}" if path else str(key))
        elif isinstance(node, (int, float)) and not isinstance(node, bool) and any(
                word in path.lower() for word in ("ratio", "slowdown", "speedup")):
            found.append(f"{path} = {node:.3g}")

    walk(r, "")
    return found[:8] or ["no headline extractor for this file; no ratio, slowdown or speedup figure found"]


HEADLINES = {"bench_startup.json": startup, "bench_extract.json": extract, "bench_search.json": search,
             "bench_methods.json": methods, "scale.json": scale, "bench_guard.json": guard,
             "bench_peers.json": peers, "bench_load.json": load}
# a later run of some rows only (e.g. `bench_peers.py --rows tiny --out results/bench_peers_tiny.json`)
HEADLINES["bench_peers_tiny.json"] = peers


def entry(path: Path) -> list[str]:
    """Markdown lines of one results file: a heading line with date and load, then its headline figures."""
    result = json.loads(path.read_text())
    head = f"- `{path.name}` ({result.get('date', 'date not recorded')}, {load_of(result)})"
    try:
        lines = HEADLINES.get(path.name, generic)(result)
    except UNREADABLE as exc:  # reported, not hidden: the file's layout changed
        lines = [f"headline figures not readable ({type(exc).__name__}: {exc}); the file's layout changed?"]
    return [head] + [f"  - {line}" for line in lines]


def summary(results: Path) -> str:
    present = sorted(results.glob("*.json"))
    names = {p.name for p in present}
    order = [results / name for name in KNOWN if name in names] + [p for p in present if p.name not in KNOWN]
    lines = ["# Benchmark summary", "",
             (f"Written {dt.datetime.now().isoformat(timespec='minutes')} by `benchmarks/summarize.py` from "
             f"`{results.relative_to(REPO) if results.is_relative_to(REPO) else results}`. Load: the 1-minute "
             "load average at the start and the end of each run (2 cores: above 2, other work was competing). "
             "Details and caveats: `benchmarks/README.md`."), ""]
    for path in order:
        lines += entry(path)
    for name, script in KNOWN.items():
        if name not in names:
            lines.append(f"- `{name}`: absent, skipped (run `python benchmarks/{script}`)")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="directory of results JSON files")
    parser.add_argument("--out", type=Path, help="also write the summary to this markdown file")
    args = parser.parse_args(argv)
    text = summary(args.results.resolve())
    print(text, end="")
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
