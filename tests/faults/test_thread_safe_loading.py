"""Issue 11, fault 4: model loading is safe under the thread runner.

Measured before the fix: S2L with several trajectory shards under the default thread runner failed with
"NotImplementedError: Cannot copy out of meta tensor; no data!" (transformers builds on the meta device by
patching torch process-wide, so a model loaded in another thread at the same time came out half on meta) and
"ImportError: cannot import name ... from 'transformers'" (threads resolving transformers' lazy names at once).
"""
from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from sftcurate.data_contracts import TRAJECTORIES
from sftcurate.infra.store import join, read_tensors
from tests.test_proxy import TINY, group_rows, make_examples

pytestmark = pytest.mark.faults
SHARDS, SHARD_SIZE, LOOPS = 4, 7, 5

# The shards of a committed proxy on 4 threads in a fresh interpreter, where no transformers name is resolved yet.
FRESH_PROCESS = """
import sys
from concurrent.futures import ThreadPoolExecutor

import torch

from sftcurate.core.trajectories import trajectory_shard

torch.set_num_threads(1)
proxy, examples, root = sys.argv[1:4]
with ThreadPoolExecutor(4) as pool:
    futures = [pool.submit(trajectory_shard, proxy, examples, i, 7, 256, store_root=root) for i in range(4)]
    print("\\n".join(f.result() for f in futures))
"""


@pytest.fixture(scope="module")
def proxy_and_examples(tmp_path_factory):
    from sftcurate.core.proxy import train_proxy

    root = str(tmp_path_factory.mktemp("proxy"))
    examples = make_examples(group_rows(10, 10, 5), root)  # 25 rows: shards of 7, 7, 7, 4
    proxy = train_proxy(examples, TINY, {"steps": 8, "checkpoints": 2, "learning_rate": 1e-2, "batch_size": 8}, 64,
                        store_root=root)
    return proxy, examples


def shard_losses_of(uris: list[str]) -> np.ndarray:
    return np.concatenate([read_tensors(join(u, "losses.safetensors"), TRAJECTORIES)[0]["losses"] for u in uris])


def test_trajectory_shards_on_four_threads_load_their_models_safely(proxy_and_examples, tmp_path):
    from sftcurate.core.trajectories import trajectory_shard

    proxy, examples = proxy_and_examples
    reference = shard_losses_of([trajectory_shard(proxy, examples, i, SHARD_SIZE, 256, store_root=str(tmp_path / "one"))
                                 for i in range(SHARDS)])
    for loop in range(LOOPS):
        root = str(tmp_path / f"loop{loop}")  # a fresh store: every shard loads its checkpoints again
        with ThreadPoolExecutor(SHARDS) as pool:
            futures = [pool.submit(trajectory_shard, proxy, examples, i, SHARD_SIZE, 256, store_root=root)
                       for i in range(SHARDS)]
            uris = [f.result() for f in futures]
        assert all(not u.reused for u in uris)
        # a model loaded while another thread loaded would be half random (weights "newly initialized")
        np.testing.assert_allclose(shard_losses_of(uris), reference, rtol=1e-5, atol=1e-5, err_msg=f"loop {loop}")


def test_first_transformers_imports_on_threads_in_a_fresh_process(proxy_and_examples, tmp_path):
    proxy, examples = proxy_and_examples
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS, proxy, examples, str(tmp_path / "store")],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len(proc.stdout.split()) == SHARDS
