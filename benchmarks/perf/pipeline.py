"""The transform pipeline against h alone, with and without read-ahead; a 10M-item stream.

    python benchmarks/perf/pipeline.py overlap            # transform / h-only, read-ahead off vs on
    python benchmarks/perf/pipeline.py stream --items 10000000 --dim 32

overlap: for each pair of benchmarks/perf/backfill.py (random weights, timing only), a gallery_store
of N random vectors, then rounds of (a) the transform backfill (`backfill_version`: LanceDB read
-> h -> one LanceDB commit) with `pages_ahead=0` (each page read after h
finished the previous one: the pipeline before read-ahead), (b) the same with read-ahead on (the
default), (c) h alone over the vectors in memory; the three alternate within each round, so that
they share whatever load the machine has. Reports the median of the rounds.

stream: a gallery_store of `--items` random vectors of `--dim` dimensions (old and side-info),
written in one streamed commit, then ONE transform backfill of it in a subprocess, which records
the time and its peak RSS (VmHWM) when it has passed 1M, 5M and 10M items. `--dim` below 128
keeps the 10M-item tables within the disk (at 128-d they take ~16 GB); h's inner MLP, which
dominates its cost, is the cpu preset's (benchmarks/perf/backfill.py's default pair).

Writes benchmarks/results/pipeline.{json,md} (each part its own key; a part not run keeps its
earlier result) and, for a 10M stream, `stream_10m` in benchmarks/results/backfill.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).parent))
import backfill as bench  # noqa: E402  (benchmarks/perf/backfill.py: the pairs and their helpers)

os.environ.setdefault("LANCE_LOG", "error")
sys.path.insert(
    0, str(Path(__file__).resolve().parents[2])
)  # the repository root: benchmarks.common
from benchmarks.common import machine, write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"
MARKS = (1_000_000, 5_000_000, 10_000_000)
TARGET_TRANSFORM_OVER_H = 0.85


def _time_transform(fct, store, h, checkpoint, batch_size: int, read_ahead: int) -> float:
    from fct_assets.upgrade import backfill

    t0 = time.perf_counter()
    out = backfill.backfill_version(
        fct, "v2", store, h, checkpoint, 0.0, batch_size, log=lambda _: None, pages_ahead=read_ahead
    )
    seconds = time.perf_counter() - t0
    assert out.rows == store.rows, out
    return seconds


def overlap_pair(name: str, n: int, batch_size: int, rounds: int, seed: int = 0) -> dict:
    import torch

    from fct_assets.lib import storage
    from fct_ml.backfill import apply_transformation

    model_kwargs, _, inner = bench.PAIRS[name]
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    h, model = bench.make_h(inner), bench.make_new_model(model_kwargs)
    times: dict[str, list[float]] = {"no_read_ahead": [], "read_ahead": [], "h_only": []}
    with tempfile.TemporaryDirectory(prefix="fct-pipeline-") as tmp:
        fct = bench.fct_resource(tmp)
        db = fct.connect()
        batches = [
            bench.store_batch(s, min(batch_size, n - s), rng, None) for s in range(0, n, batch_size)
        ]
        info = storage.publish(db, storage.GALLERY_STORE, bench.store_schema(), iter(batches))
        store, checkpoint = bench.store_records(info["version"], n, model)
        old = torch.from_numpy(
            np.concatenate([storage.vectors(b.column("old_embedding")) for b in batches])
        )
        side = torch.from_numpy(
            np.concatenate([storage.vectors(b.column("side_info")) for b in batches])
        )
        _time_transform(fct, store, h, checkpoint, batch_size, 2)  # warm-up
        for _ in range(rounds):
            times["no_read_ahead"].append(_time_transform(fct, store, h, checkpoint, batch_size, 0))
            times["read_ahead"].append(_time_transform(fct, store, h, checkpoint, batch_size, 2))
            t0 = time.perf_counter()
            apply_transformation(h, old, side, batch_size=batch_size)
            times["h_only"].append(time.perf_counter() - t0)
    rate = {k: n / statistics.median(v) for k, v in times.items()}
    return {
        "n_items": n,
        "batch_size": batch_size,
        "rounds": rounds,
        "items_per_s": {k: round(v, 1) for k, v in rate.items()},
        "transform_over_h_only": {
            "no_read_ahead": round(rate["no_read_ahead"] / rate["h_only"], 3),
            "read_ahead": round(rate["read_ahead"] / rate["h_only"], 3),
        },
        "read_ahead_speedup": round(rate["read_ahead"] / rate["no_read_ahead"], 3),
        "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
    }


def _stream_schema(dim: int) -> pa.Schema:
    from fct_assets.lib import storage

    return storage.gallery_store_schema(dim, dim, bench.OLD_SPACE, bench.SIDE_SPACE)


def write_store(uri: str, n: int, dim: int, batch: int = 65536, seed: int = 1) -> dict:
    """A gallery_store of n items of `dim`-d random vectors, streamed in one commit."""
    from fct_assets.lib import storage

    rng = np.random.default_rng(seed)
    schema = _stream_schema(dim)

    def batches():
        for s in range(0, n, batch):
            m = min(batch, n - s)
            yield pa.record_batch(
                [
                    pa.array(np.arange(s, s + m, dtype=np.int64)),
                    pa.array(rng.integers(0, 10, m, dtype=np.int32)),
                    pa.array([b""] * m, type=pa.binary()),
                    bench.vec_array(rng.random((m, dim), dtype=np.float32)),
                    bench.vec_array(rng.random((m, dim), dtype=np.float32)),
                    pa.array([bench.OLD_SPACE] * m),
                    pa.array([bench.SIDE_SPACE] * m),
                ],
                schema=schema,
            )

    return storage.publish(
        bench.fct_resource(uri).connect(), storage.GALLERY_STORE, schema, batches()
    )


def _rss_mb(key: str) -> float:
    found = re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text())
    return int(found.group(1)) / 1024 if found else float("nan")


def child_stream(uri: str, version: int, n: int, dim: int, batch_size: int) -> dict:
    """One transform backfill of the whole store; time and peak RSS when passing each mark."""
    import torch

    from fct_assets.lib.records import Checkpoint, GalleryStore
    from fct_assets.upgrade.backfill import backfill_version
    from fct_ml.transformation import Transformation, TransformationConfig

    torch.set_num_threads(2)
    h = Transformation(
        TransformationConfig(
            old_dim=dim,
            side_info_dim=dim,
            new_dim=dim,
            branch_width=256,
            inner_width=bench.PAIRS["cpu_default"][2],
            uncertainty=True,
        )
    ).eval()
    store = GalleryStore(
        table="gallery_store",
        version=version,
        rows=n,
        old_space_id=bench.OLD_SPACE,
        old_dim=dim,
        side_info_space_id=bench.SIDE_SPACE,
        side_info_dim=dim,
        old_model_sha256="",
        side_info_model_sha256="",
        dataset_fingerprint="random",
    )
    model = bench.make_new_model({**bench.PAIRS["cpu_default"][0], "embed_dim": dim})
    checkpoint = Checkpoint(model, sha256="", space_id=bench.NEW_SPACE, recorded={})
    marks = [m for m in MARKS if m <= n] or [n]
    seen: dict[int, dict] = {}
    t0 = time.perf_counter()

    def log(line: str) -> None:
        found = re.search(r": (\d+)/\d+ items", line)
        if not found:
            return
        done = int(found.group(1))
        for m in marks:
            if m not in seen and done >= m:
                seen[m] = {
                    "items": done,
                    "seconds": round(time.perf_counter() - t0, 2),
                    "peak_rss_mb": round(_rss_mb("VmHWM"), 1),
                    "rss_mb": round(_rss_mb("VmRSS"), 1),
                }
                print(f"  {m:,}: {seen[m]}", file=sys.stderr, flush=True)

    out = backfill_version(
        fct := bench.fct_resource(uri), "v2", store, h, checkpoint, 0.0, batch_size, log=log
    )
    seconds = time.perf_counter() - t0
    assert out.rows == n, out
    del fct
    per_million = {}
    previous = (0, 0.0)
    for m in marks:
        s = seen[m]
        # The time per million items of the stretch up to this mark: the rate at that point of
        # the stream, not an average that hides a slow-down.
        per_million[str(m)] = round(
            (s["seconds"] - previous[1]) / ((s["items"] - previous[0]) / 1e6), 2
        )
        previous = (s["items"], s["seconds"])
    return {
        "n_items": n,
        "dim": dim,
        "batch_size": batch_size,
        "seconds": round(seconds, 1),
        "items_per_s": round(n / seconds, 1),
        "peak_rss_mb": round(_rss_mb("VmHWM"), 1),
        "marks": {str(m): seen[m] for m in marks},
        "seconds_per_million": per_million,
    }


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def markdown(result: dict) -> str:
    lines = [
        "# The transform pipeline: read-ahead, and a 10M-item stream",
        "",
        f"Machine: {result.get('machine', '?')}.",
        "",
    ]
    ov = result.get("overlap")
    if ov:
        lines += [
            "## transform / h-only, read-ahead off and on (one run, rounds alternating)",
            "",
            f"Load average during the run: {ov['load_average_1m']} (wall times move with it;"
            " the ratios compare passes that alternated within each round).",
            "",
            "| pair | N | h only items/s | transform items/s, no read-ahead | transform items/s,"
            " read-ahead | transform / h only, before | after | after / before |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, p in ov["pairs"].items():
            r, t = p["items_per_s"], p["transform_over_h_only"]
            lines.append(
                f"| {name} | {p['n_items']} | {r['h_only']:.0f} | {r['no_read_ahead']:.0f} |"
                f" {r['read_ahead']:.0f} | {t['no_read_ahead']:.2f} | {t['read_ahead']:.2f} |"
                f" {p['read_ahead_speedup']:.2f} |"
            )
        lines += ["", "| target | goal | measured | met |", "|---|---|---|---|"]
        for name, p in ov["pairs"].items():
            got = p["transform_over_h_only"]["read_ahead"]
            met = "yes" if got >= TARGET_TRANSFORM_OVER_H else "no"
            lines.append(
                f"| {name}: transform / h only | >= {TARGET_TRANSFORM_OVER_H} | {got} | {met} |"
            )
        lines.append("")
    st = result.get("stream")
    if st:
        lines += [
            f"## Stream: {st['n_items']:,} items, {st['dim']}-d, batch {st['batch_size']}",
            "",
            f"Store written in {st['write_seconds']} s; backfill {st['seconds']} s"
            f" ({st['items_per_s']:.0f} items/s) in a subprocess, peak RSS {st['peak_rss_mb']} MB."
            f" Load average at the end: {st['load_average_1m']}.",
            "",
            "| items passed | s since start | s per million (that stretch) | peak RSS (MB) |",
            "|---:|---:|---:|---:|",
        ]
        for m, s in st["marks"].items():
            lines.append(
                f"| {int(m):,} | {s['seconds']} | {st['seconds_per_million'][m]} |"
                f" {s['peak_rss_mb']} |"
            )
        lines.append("")
    lines += ["## Command", "", "```", *result.get("commands", []), "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["overlap", "stream", "child-stream"])
    # Large enough that the backfill's fixed costs (the lease, the plan, opening and creating
    # tables: a 64-item backfill takes 36 ms) do not decide a ratio about its per-item pace: at
    # 10,000 items h alone takes about 0.05 s.
    parser.add_argument("--n-cpu", type=int, default=200_000)
    parser.add_argument("--n-resnet", type=int, default=20_000)
    parser.add_argument(
        "--batch-size", type=int, default=4096, help="rows per batch (the backfill's default)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--items", type=int, default=10_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--uri", help=argparse.SUPPRESS)
    parser.add_argument("--version", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS / "pipeline"), help="path without suffix")
    args = parser.parse_args(argv)
    if args.part == "child-stream":
        print(json.dumps(child_stream(args.uri, args.version, args.items, args.dim, 8192)))
        return 0
    import torch

    torch.set_num_threads(2)
    out = Path(args.out)
    result = _load(out.with_suffix(".json"))
    result["machine"] = machine(f"lancedb {__import__('lancedb').__version__}")
    command = f"python benchmarks/perf/pipeline.py {' '.join(argv or sys.argv[1:])}"
    if args.part == "overlap":
        pairs = {}
        for name, n in (("cpu_default", args.n_cpu), ("resnet50-128_vs_h2048", args.n_resnet)):
            print(f"overlap {name}: N={n} ...", file=sys.stderr, flush=True)
            pairs[name] = overlap_pair(name, n, args.batch_size, args.rounds)
            print(f"  {pairs[name]}", file=sys.stderr, flush=True)
        result["overlap"] = {"pairs": pairs, "load_average_1m": round(os.getloadavg()[0], 2)}
    else:
        with tempfile.TemporaryDirectory(prefix="fct-stream10m-") as tmp:
            print(f"stream: writing {args.items:,} items ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            info = write_store(tmp, args.items, args.dim)
            write_seconds = time.perf_counter() - t0
            print(f"  written in {write_seconds:.0f} s; backfill ...", file=sys.stderr, flush=True)
            child = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "child-stream",
                    "--uri",
                    tmp,
                    "--version",
                    str(info["version"]),
                    "--items",
                    str(args.items),
                    "--dim",
                    str(args.dim),
                ],
                stdout=subprocess.PIPE,
                text=True,
                check=True,
            )
        stream = json.loads(child.stdout.strip().splitlines()[-1])
        stream["write_seconds"] = round(write_seconds, 1)
        stream["load_average_1m"] = round(os.getloadavg()[0], 2)
        result["stream"] = stream
        if args.items >= 10_000_000:
            backfill_json = RESULTS / "backfill.json"
            data = _load(backfill_json)
            data["stream_10m"] = {
                "n_items": stream["n_items"],
                "peak_rss_mb": stream["peak_rss_mb"],
                "seconds_per_million": stream["seconds_per_million"],
                "dim": stream["dim"],
                "measured_by": command,
            }
            if "pairs" in data:  # the targets table there gains the stream's rows
                data["targets"] = bench.check_targets(data)
            write_results("backfill", data, bench.markdown(data) if "pairs" in data else None)
    result["commands"] = sorted({*result.get("commands", []), command})
    write_results(out.name, result, markdown(result), out.parent)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
