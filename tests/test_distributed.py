"""torch.distributed: 2 gloo processes on the CPU give what one process gives, and a failing rank
ends the run within its timeout."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from manifold_ext import distributed as D
from manifold_ext import models

from test_compare import TINY_TOML

# One thread per process in both runs: the same BLAS code paths, hence bitwise-equal results.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MANIFOLD_EXT_DIST_TIMEOUT": "30",
       # the scripts below run from tmp_path: find the package where this run imports it from
       "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(models.__file__).parents[1]),
                                                   os.environ.get("PYTHONPATH")]))}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(n, *args, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}",
           f"--master-port={_free_port()}", "-m", "manifold_ext.cli", *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)


def _single(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "manifold_ext", *args], env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def _without_timings(d):
    if isinstance(d, dict):
        return {k: _without_timings(v) for k, v in d.items() if k not in ("seconds", "baseline_seconds")}
    if isinstance(d, list):
        return [_without_timings(v) for v in d]
    return d


@pytest.mark.parametrize("world,rank,n,align,expected", [
    (2, 0, 10, 3, (0, 6)), (2, 1, 10, 3, (6, 10)),   # whole groups of 3: [0, 6) and [6, 10)
    (3, 2, 2, 1, (1, 2)), (3, 0, 2, 1, (0, 0)),       # more ranks than items: some get none
    (1, 0, 7, 4, (0, 7)),
])
def test_shard_blocks_are_aligned_and_cover_everything(monkeypatch, world, rank, n, align, expected):
    monkeypatch.setattr(D, "world", lambda: world)
    monkeypatch.setattr(D, "rank", lambda: rank)
    assert D.shard(n, align) == expected
    blocks = []
    for r in range(world):
        monkeypatch.setattr(D, "rank", lambda r=r: r)
        blocks.append(D.shard(n, align))
    assert blocks[0][0] == 0 and blocks[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    assert all(s % align == 0 for s, _ in blocks)


def test_not_distributed_is_a_no_op():
    assert not D.active() and D.rank() == 0 and D.world() == 1 and D.is_main()
    assert D.all_gather({"a": 1}) == [{"a": 1}] and D.broadcast(3) == 3
    t = torch.arange(4)
    assert D.gather_rows(t) is t


def test_local_switches_sharding_off_for_its_own_context_only(monkeypatch):
    import threading

    monkeypatch.setattr(D, "active", lambda: True)
    assert D.sharding()
    seen = {}
    inside, done = threading.Event(), threading.Event()

    def other_thread():
        inside.wait()
        seen["other"] = D.sharding()  # another context: local() of the main thread does not reach it
        done.set()

    t = threading.Thread(target=other_thread)
    t.start()
    with pytest.raises(RuntimeError, match="boom"):
        with D.local():
            assert not D.sharding()
            with D.local():
                assert not D.sharding()
            assert not D.sharding()  # the inner block restored the outer one's value
            inside.set()
            done.wait()
            raise RuntimeError("boom")
    t.join()
    assert seen["other"] is True and D.sharding()  # restored after the error


def test_probe_on_two_processes_equals_one(tmp_path):
    for i in range(2):
        torch.manual_seed(i)
        torch.save(models.mlp((64, 32, 10)).state_dict(), tmp_path / f"m{i}.pt")
    a, b = str(tmp_path / "m0.pt"), str(tmp_path / "m1.pt")
    spec = ["--model", "mlp:64-32-10"]
    one = _single("probe", "barrier", a, b, *spec, "--out", str(tmp_path / "one"), "--no-plot", "--quiet")
    two = _torchrun(2, "probe", "barrier", a, b, *spec, "--out", str(tmp_path / "two"), "--no-plot", "--quiet")
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    r1 = json.loads((tmp_path / "one" / "barrier.json").read_text())
    r2 = json.loads((tmp_path / "two" / "barrier.json").read_text())
    assert _without_timings(r1) == _without_timings(r2)  # bitwise: the same chunks of points
    assert len(r1["path"]["t"]) > 17  # refined: the ranks agreed on where to refine


def test_compare_on_two_processes_equals_one(tmp_path):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY_TOML)
    common = ["compare", "--config", str(cfg), "--quiet"]
    one = _single(*common, "--no-plot", "--out", str(tmp_path / "one"))
    two = _torchrun(2, *common, "--plot", "--out", str(tmp_path / "two"))  # rank 0 alone draws
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    r1 = json.loads((tmp_path / "one" / "results.json").read_text())
    r2 = json.loads((tmp_path / "two" / "results.json").read_text())
    for key in ("bases", "units", "ranking", "correlations"):
        assert _without_timings(r1[key]) == _without_timings(r2[key]), key
    units = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.json"))
    assert units == sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*.json"))
    for rel in units:
        if rel.parts[0] == "units":
            assert _without_timings(json.loads((tmp_path / "one" / rel).read_text())) == \
                _without_timings(json.loads((tmp_path / "two" / rel).read_text())), rel
    assert (tmp_path / "two" / "results.csv").exists() and (tmp_path / "two" / "paths.png").exists()
    # Resumed under torchrun: nothing finished is recomputed, the report is the same.
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "two" / "units").rglob("*.json")}
    again = _torchrun(2, *common, "--no-plot", "--resume", "--out", str(tmp_path / "two"))
    assert again.returncode == 0, again.stderr
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    r3 = json.loads((tmp_path / "two" / "results.json").read_text())
    assert _without_timings(r3["units"]) == _without_timings(r2["units"])


CRASH = textwrap.dedent("""
    import os, sys
    from manifold_ext import distributed as D
    from manifold_ext.cli import main
    D.init()
    if D.rank() == 1:
        os._exit(1)  # a rank that vanishes without a word
    sys.exit(main(sys.argv[1:]))
""")


def test_a_vanished_rank_ends_the_run_within_the_timeout(tmp_path):
    """Launched by hand (no torchrun to stop the others): rank 1 dies after joining; rank 0's
    next collective fails, and the run ends with one clear line, not a hang."""
    script = tmp_path / "crash.py"
    script.write_text(CRASH)
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY_TOML)
    port = _free_port()
    env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
           "MANIFOLD_EXT_DIST_TIMEOUT": "20"}
    args = [sys.executable, str(script), "compare", "--config", str(cfg), "--out", str(tmp_path / "run"),
            "--no-plot", "--quiet"]
    start = time.time()
    procs = [subprocess.Popen(args, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    elapsed = time.time() - start
    assert procs[1].returncode == 1
    assert procs[0].returncode == 3, outs[0][1]
    lines = [line for line in outs[0][1].splitlines() if line.startswith("manifold-ext compare: error:")]
    assert lines and "another rank crashed, vanished or did not arrive within the timeout" in lines[0]
    assert elapsed < 20 + 60  # the timeout, plus start-up


def test_a_failing_rank_under_torchrun_stops_the_run(tmp_path):
    """Under torchrun, a rank that raises makes torchrun stop the other and fail."""
    script = tmp_path / "fail.py"
    script.write_text(textwrap.dedent("""
        import sys
        import manifold_ext.compare as C
        from manifold_ext import distributed as D
        from manifold_ext.cli import main
        D.init()
        if D.rank() == 1:
            def broken(*a, **k):
                raise RuntimeError("rank 1 broke")
            C.run_unit = broken
        sys.exit(main(sys.argv[1:]))
    """))
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY_TOML)
    start = time.time()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={_free_port()}",
           str(script), "compare", "--config", str(cfg), "--out", str(tmp_path / "run"), "--no-plot", "--quiet"]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=180)
    assert res.returncode != 0
    assert "rank 1 broke" in res.stderr
    assert time.time() - start < 30 + 60
    assert not (tmp_path / "run" / "results.json").exists()
