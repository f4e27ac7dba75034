"""Run directories: atomic partition files, resume, exactly-once (tier b, no Ray).

The driver is interrupted by a worker that raises KeyboardInterrupt on its n-th partition,
as Ctrl-C would; `--resume` must then redo only the missing partitions.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from tokmarg.cli import app
from tokmarg.records import PartitionMeta, PartitionResult
from tokmarg.rundir import PartitionWriter, RunDir, RunError, atomic_write, plan
from tokmarg.strategies import REGISTRY, SampleOutput
from tokmarg.worker import Worker

ROWS = [
    {"id": f"r{i}", "prompt": f"question number {i}", "labels": [["S1"], ["S2", "S10"], [], ["S14"]][i % 4]}
    for i in range(7)
]
PARAMS = """
strategies:
  token_probability: {max_new_tokens: 3}
  marginal_probability_at_any_place: {max_new_tokens: 2, eps: 0.05, top_p: 0.9}
  LogTokU: {}
"""


@pytest.fixture()
def inputs(tmp_path: Path) -> tuple[Path, Path]:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS, encoding="utf-8")
    return data, params


def _eval(model: Path, data: Path, params: Path, out: Path, *extra: str):
    args = ["eval", "--models", str(model), "--dataset", str(data), "--params", str(params), "--out", str(out)]
    return CliRunner().invoke(app, [*args, "--partition-size", "2", "--no-progress", "--no-ray", *extra])


def _files(out: Path) -> dict[str, tuple[int, int]]:
    """Partition file -> (inode, mtime_ns): a rewritten file changes both."""
    return {str(p.relative_to(out)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("partitions/*/*")}


def _pred(out: Path) -> pd.DataFrame:
    df = pd.concat(pd.read_parquet(p) for p in sorted((out / "predictions").glob("*.parquet")))
    return df.sort_values(["model", "strategy", "sample_id"]).reset_index(drop=True)


def test_plan_covers_every_sample_once() -> None:
    assert plan(7, 2) == [(0, 2), (2, 4), (4, 6), (6, 7)]
    assert plan(4, 10) == [(0, 4)]
    with pytest.raises(RunError, match="partition-size"):
        plan(3, 0)


def test_atomic_write_leaves_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    target.write_bytes(b"old")

    with pytest.raises(TypeError):
        atomic_write(target, object())  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]  # no temporary left behind
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new"


LABELS = ("unsafe", "S1")


def _result(ids: list[str], tokens: int, index: int = 0) -> PartitionResult:
    """Partition ``index`` of strategy ``s`` over ``ids``, each sample with ``tokens`` tokens forwarded."""
    meta = PartitionMeta("m", index, {"all": 1.0}, tokens * len(ids), 0, 0, {})
    outs = [SampleOutput({"S1": 0.5}, tokens_forwarded=tokens) for _ in ids]
    return PartitionResult(meta, tuple(ids), tuple(() for _ in ids), {"s": outs}, tuple(tokens for _ in ids))


def test_partition_is_written_once(tmp_path: Path) -> None:
    rd = RunDir(tmp_path / "run")
    assert rd.write_partitions([_result(["a"], 1)], LABELS) == 1
    assert rd.write_partitions([_result(["a"], 2)], LABELS) == 0  # a retried duplicate
    assert pd.read_parquet(rd.part_path("m", 0)).tokens_forwarded.tolist() == [1]
    assert rd.done("m", 3) == {0}
    assert RunDir(tmp_path / "run").done("m", 3) == {0}  # read back from the file's metadata


def test_partitions_are_grouped_in_files(tmp_path: Path) -> None:
    rd = RunDir(tmp_path / "run")
    w = PartitionWriter(rd, LABELS, group_samples=3)
    w.add(_result(["e"], 1, index=2))
    w.add(_result(["a", "b"], 1, index=0))  # 3 samples buffered: one file, named by the first
    w.add(_result(["c", "d"], 1, index=1))
    assert [p.name for p in rd.partition_files("m")] == ["part-00000.parquet"]
    w.add(_result(["e"], 5, index=2))  # computed twice: written once
    w.flush()
    assert [p.name for p in rd.partition_files("m")] == ["part-00000.parquet", "part-00001.parquet"]
    assert w.written == 3 and RunDir(rd.path).done("m", 3) == {0, 1, 2}
    table, metas = rd.read_partition_file(rd.part_path("m", 0), ["sample_id", "tokens_forwarded"])
    assert [m.index for m in metas] == [0, 2] and table.column("sample_id").to_pylist() == ["a", "b", "e"]
    assert table.column_names == ["sample_id", "tokens_forwarded"]


def test_directory_that_is_not_a_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(RunError, match="holds no tokmarg run"):
        RunDir(out).stored()
    (out / "run.json").write_text("{broken")
    with pytest.raises(RunError, match="run.json: not a tokmarg run file"):
        RunDir(out).stored()


def test_interrupted_run_resumes_only_missing_partitions(
    tiny_model_dir: Path, inputs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, params = inputs
    full = tmp_path / "full"
    assert _eval(tiny_model_dir, data, params, full).exit_code == 0

    out = tmp_path / "run"
    real = Worker.run_partition
    calls = []

    def flaky(self, part):  # Ctrl-C while the third partition is being scored
        calls.append(part.index)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, part)

    monkeypatch.setattr(Worker, "run_partition", flaky)
    res = _eval(tiny_model_dir, data, params, out)
    assert res.exit_code == 2
    assert res.output.strip() == (
        f"error: interrupted; finished partitions are kept: `tokmarg eval --resume {out}` continues the run"
    )
    before = _files(out)
    assert len(before) == 1 and not (out / "manifest.json").exists()  # the 2 finished partitions, in one file
    monkeypatch.setattr(Worker, "run_partition", real)

    calls.clear()
    monkeypatch.setattr(Worker, "run_partition", lambda self, part: (calls.append(part.index), real(self, part))[1])
    res = CliRunner().invoke(app, ["eval", "--resume", str(out), "--no-progress", "--no-ray"])
    assert res.exit_code == 0, res.output
    assert "resuming" in res.output and "2 of 4 partitions done, 2 to do" in res.output
    assert sorted(calls) == [2, 3]  # only the unfinished partitions ran
    after = _files(out)
    assert all(after[k] == v for k, v in before.items())  # finished partitions untouched
    assert len(after) == 2

    pred, ref = _pred(out), _pred(full)
    assert len(pred) == 3 * len(ROWS) and not pred.duplicated(["model", "strategy", "sample_id"]).any()
    assert pred.drop(columns=["tokens_forwarded", "sample_tokens_forwarded"]).equals(
        ref.drop(columns=["tokens_forwarded", "sample_tokens_forwarded"])
    )
    m_full = pd.read_csv(full / "metrics.csv").drop(columns=["seconds_per_sample", "tokens_forwarded_per_sample"])
    m_res = pd.read_csv(out / "metrics.csv").drop(columns=["seconds_per_sample", "tokens_forwarded_per_sample"])
    pd.testing.assert_frame_equal(m_full, m_res)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["partitions"] == {"per_model": 4, "done_before_this_session": 2}
    assert manifest["launch"]["partitions_run"] == 2


def test_same_command_into_same_out_continues_and_a_different_one_is_refused(
    tiny_model_dir: Path, inputs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(PartitionWriter, "GROUP_SAMPLES", 1)  # a file per partition
    data, params = inputs
    out = tmp_path / "run"
    assert _eval(tiny_model_dir, data, params, out).exit_code == 0
    (out / "partitions").joinpath(os.listdir(out / "partitions")[0], "part-00001.parquet").unlink()
    before = _files(out)
    res = _eval(tiny_model_dir, data, params, out)
    assert res.exit_code == 0 and "3 of 4 partitions done, 1 to do" in res.output
    assert {k: v for k, v in _files(out).items() if k in before} == before
    assert len(_pred(out)) == 3 * len(ROWS)

    res = _eval(tiny_model_dir, data, params, out, "--semantics", "paper")
    assert res.exit_code == 2
    line = res.output.strip()
    assert line.startswith(f"error: {out}: holds a different run") and 'semantics (run: "exact", now: "paper")' in line
    res = _eval(tiny_model_dir, data, params, out, "--limit", "3")
    assert res.exit_code == 2 and "n_samples (run: 7, now: 3)" in res.output


def test_resume_refuses_options_that_change_results(tiny_model_dir: Path, inputs, tmp_path: Path) -> None:
    data, params = inputs
    out = tmp_path / "run"
    assert _eval(tiny_model_dir, data, params, out, "--limit", "2").exit_code == 0
    res = CliRunner().invoke(app, ["eval", "--resume", str(out), "--semantics", "paper", "--no-ray"])
    assert res.exit_code == 2
    assert res.output.strip() == f"error: --resume takes the run's inputs from {out / 'run.json'}; drop --semantics"
    res = CliRunner().invoke(app, ["eval", "--resume", str(tmp_path / "nothing"), "--no-ray"])
    assert res.exit_code == 2 and "cannot resume: not a tokmarg run" in res.output


def test_failure_before_any_partition_leaves_nothing(inputs, tmp_path: Path) -> None:
    data, params = inputs
    empty = tmp_path / "empty-model"
    empty.mkdir()
    out = tmp_path / "run"
    res = _eval(empty, data, params, out)
    assert res.exit_code == 2 and res.output.startswith("error: cannot load model") and str(empty) in res.output
    assert not out.exists()


def test_every_strategy_and_sample_once_per_model(tiny_model_dir: Path, inputs, tmp_path: Path) -> None:
    data, params = inputs
    out = tmp_path / "run"
    assert _eval(tiny_model_dir, data, params, out, "--strategies", ",".join(REGISTRY)).exit_code == 0
    pred = _pred(out)
    assert len(pred) == len(REGISTRY) * len(ROWS)
    assert set(pred.groupby("sample_id").size()) == {len(REGISTRY)}


def test_token_counts_do_not_depend_on_partition_size(tiny_model_dir: Path, inputs, tmp_path: Path) -> None:
    data, params = inputs
    a, b = tmp_path / "a", tmp_path / "b"
    assert _eval(tiny_model_dir, data, params, a).exit_code == 0  # partitions of 2
    assert _eval(tiny_model_dir, data, params, b, "--partition-size", "1").exit_code == 0
    pa, pb = _pred(a), _pred(b)
    assert pa.tokens_forwarded.tolist() == pb.tokens_forwarded.tolist()
    assert pa.sample_tokens_forwarded.tolist() == pb.sample_tokens_forwarded.tolist()
    ma, mb = (json.loads((d / "manifest.json").read_text())["timing"][str(tiny_model_dir)] for d in (a, b))
    assert ma["prefix_tokens"] == mb["prefix_tokens"] > 0
    assert (ma["prefix_tokens_total"], mb["prefix_tokens_total"]) == (4 * ma["prefix_tokens"], 7 * mb["prefix_tokens"])


def test_partitions_at_different_precisions_are_not_mixed(
    tiny_model_dir: Path, inputs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tokmarg.rundir import parquet_meta, write_parquet

    monkeypatch.setattr(PartitionWriter, "GROUP_SAMPLES", 1)  # a file per partition
    data, params = inputs
    out = tmp_path / "run"
    assert _eval(tiny_model_dir, data, params, out).exit_code == 0
    part = next(out.glob("partitions/*/part-00001.parquet"))
    meta = parquet_meta(part)
    meta["worker"].update(dtype="bfloat16", device="cuda:0")  # as if resumed on a GPU with --dtype auto
    df = pd.read_parquet(part)
    part.unlink()
    write_parquet(df, part, meta)
    (out / "manifest.json").unlink()
    res = _eval(tiny_model_dir, data, params, out)
    assert res.exit_code == 2
    assert "partitions were scored at different precisions (bfloat16 on cuda, float32 on cpu)" in res.output


def test_colliding_model_folders_and_a_second_driver_are_refused(tiny_model_dir: Path, inputs, tmp_path: Path):
    data, params = inputs
    (tmp_path / "tiny").mkdir()
    twin = tmp_path / "tiny" / "llama"
    twin.symlink_to(tiny_model_dir)
    other = tmp_path / "tiny_llama"  # the same folder name once '/' becomes '_'
    other.symlink_to(tiny_model_dir)
    out = tmp_path / "run"
    res = CliRunner().invoke(
        app,
        ["eval", "--models", str(twin), str(other), "--dataset", str(data), "--params", str(params)]
        + ["--out", str(out), "--no-ray", "--no-progress"],
    )
    assert res.exit_code == 2 and "would share the folder" in res.output and not out.exists()

    assert _eval(tiny_model_dir, data, params, out, "--limit", "2").exit_code == 0
    holder = RunDir(out)
    holder.lock()  # another driver holds the run
    try:
        res = _eval(tiny_model_dir, data, params, out, "--limit", "2")
        assert res.exit_code == 2 and "another tokmarg driver is working on this run" in res.output
    finally:
        holder.unlock()


def test_leftover_temporaries_do_not_make_a_directory_foreign(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / ".run.json.abc.tmp").write_text("{")  # a driver died writing run.json
    assert RunDir(out).stored() is None


def test_bench_actor_counts_are_checked(tiny_model_dir: Path, inputs) -> None:
    data, params = inputs
    base = ["bench", "--models", str(tiny_model_dir), "--dataset", str(data), "--params", str(params)]
    for bad in ("-1", ",", "two"):
        res = CliRunner().invoke(app, [*base, "--actors", bad])
        assert res.exit_code == 2 and res.output.startswith(f"error: --actors {bad!r}: expected actor counts such as")


def test_cpu_share_fits_every_actor() -> None:
    from tokmarg.launch.cluster import fair_share, fits

    assert fair_share([2], 1) == 2 and fair_share([2], 2) == 1
    assert fair_share([4, 2], 2) == 2  # 3 each would leave the second actor without a node
    assert fair_share([8, 8], 3) == 4
    assert fits([2], fair_share([2], 3)) == 2 < 3  # three CPU actors on two cores do not fit: refused
    assert fits([1, 1], 1) == 2 and fits([0.5], 1) == 0
