"""Streamed training from the Hub on 2 processes: each rank reads its own shards of the stream."""

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
from test_pretrain import samples_folder  # noqa: F401  (the module-scoped samples fixture)

from mu0.dataset_builders.statistics import STATISTICS_FILE
from mu0.training.pretrain import load_samples

SCRIPT = Path(__file__).parent / "scripts" / "stream_rows.py"
SHARDS = 4


def test_each_rank_streams_its_own_shards(hub, samples_folder, tmp_path):  # noqa: F811
    samples, statistics = load_samples(samples_folder)
    samples.push_to_hub("user/traces", config_name="samples", num_shards=SHARDS)
    hub.upload("user/traces", {STATISTICS_FILE: json.dumps(statistics)}, repo_type="dataset")
    shard_of_row = {}
    for path, data in hub.files("user/traces", repo_type="dataset").items():
        if path.endswith(".parquet"):
            table = pq.read_table(io.BytesIO(data), columns=["episode_id", "frame_index"]).to_pylist()
            shard_of_row.update({(row["episode_id"], row["frame_index"]): path for row in table})
    assert len(set(shard_of_row.values())) == SHARDS and len(shard_of_row) == len(samples)

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with hub.serve() as endpoint:
        environment = {**hub.subprocess_env(endpoint, home=tmp_path / "home"), "OMP_NUM_THREADS": "1"}
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
             "--master_port", str(port), str(SCRIPT), "user/traces", str(tmp_path), "3"],
            capture_output=True, text=True, timeout=300, env=environment,
        )
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [rank["steps"] for rank in ranks] == [3, 3]
    shards_read = [{shard_of_row[tuple(row)] for row in rank["rows"]} for rank in ranks]
    assert all(len(rank["rows"]) >= 6 for rank in ranks), [len(rank["rows"]) for rank in ranks]  # 3 steps x 2 rows (and prefetch)
    assert shards_read[0] and shards_read[1] and not shards_read[0] & shards_read[1]
