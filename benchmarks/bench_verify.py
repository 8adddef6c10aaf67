"""The cost of verified reads (issue 28): checking a committed token-features pool against its manifests.

Writes N sentences x L tokens x d float32 features as S "token_features_shard"-shaped artifacts through the
store's writer (1,000,000 x 32 x 64 = 8.2 GB in 16 shards by default, as `bench_fisher_million.py`), then
times `infra.store.artifact_damage` over every shard three ways:

- first check: every file hashed (the verified-at records and this process's memory cleared first);
- next process: the records under $SFTCURATE_HOME/cache/verified are found (size + identity only, no hash);
- same process: remembered in memory.

The hash pass reads every byte, so its time depends on whether the files are in the page cache (they are just
after writing, when they fit in memory); the other two only stat the files. The store and the records live in
a temporary folder, deleted at the end.

    python benchmarks/bench_verify.py                  # 10^6 sentences (8.2 GB of disk, ~2 minutes here)
    python benchmarks/bench_verify.py --n 100000       # a quick check of the same path
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="sentences")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per sentence (L)")
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--shards", type=int, default=16)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-verify-"))
    os.environ["SFTCURATE_HOME"] = str(work / "home")
    os.environ["SFTCURATE_STORE"] = str(work / "home" / "artifacts")
    from sftcurate.data_contracts import TOKEN_FEATURES
    from sftcurate.infra import store

    try:
        per = -(-args.n // args.shards)
        uris, total = [], 0
        started = time.perf_counter()
        for k in range(args.shards):
            n = min(per, args.n - k * per)
            features = np.full((n * args.tokens, args.d), 0.5 + k, dtype=np.float32)
            offsets = np.arange(0, n * args.tokens + 1, args.tokens, dtype=np.int64)
            writer = store.ArtifactStore().begin("token_features_shard", f"bench{k:05d}")
            writer.write_tensors("features.safetensors", {"features": features, "offsets": offsets}, TOKEN_FEATURES)
            writer.commit()
            uris.append(writer.uri)
            total += writer.files["features.safetensors"]["bytes"]
            del features
        print(f"wrote {args.shards} shards, {total / 1e9:.2f} GB, in {time.perf_counter() - started:.1f} s")

        def check_all() -> float:
            t = time.perf_counter()
            assert all(store.artifact_damage(u) is None for u in uris)
            return time.perf_counter() - t

        shutil.rmtree(work / "home" / "cache" / "verified", ignore_errors=True)
        store._verified_here.clear()
        first = check_all()
        store._verified_here.clear()
        next_process = check_all()
        same_process = check_all()
        print(f"first check (every byte hashed): {first:.2f} s = {total / 1e9 / first:.2f} GB/s")
        print(f"next process (verified-at records): {next_process * 1e3:.1f} ms")
        print(f"same process (remembered): {same_process * 1e3:.1f} ms")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
