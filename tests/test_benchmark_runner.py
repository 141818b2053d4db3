"""benchmarks/algorithms/run.py's bookkeeping on the toy domain, with budgets of a fraction of a second:
--jobs splits the algorithms among worker processes and merges their runs; --resume adds runs and
keeps the record's first command (the comparison's tables say which command made them)."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_runner(monkeypatch, results: Path):
    monkeypatch.setenv("FLOWCOACH_BENCH_RESULTS", str(results))  # the workers inherit it
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.syspath_prepend(str(ROOT))
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "algorithms" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_jobs_merge_and_resume_keeps_the_first_command(tmp_path, monkeypatch):
    run = load_runner(monkeypatch, tmp_path)
    common = ["--domains", "toy", "--seeds", "0", "--budget-s", "0.3", "--evals", "1", "--out-dir",
              str(tmp_path / "runs"), "--no-report"]
    first = ["--algos", "flow-grpo", "fpo", "--jobs", "2", *common]
    assert run.main(first) == 0
    path = tmp_path / "algorithms_toy.json"
    record = json.loads(path.read_text())
    assert set(record["runs"]) == {"flow-grpo/0", "fpo/0"}
    assert all("error" not in r and r["steps"] >= 1 for r in record["runs"].values())
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["algorithms_toy.json"]  # parts merged, removed
    assert record["command"].endswith(" ".join(first))

    second = ["--algos", "flow-grpo", "awm", "--resume", *common]
    assert run.main(second) == 0
    again = json.loads(path.read_text())
    assert set(again["runs"]) == {"flow-grpo/0", "fpo/0", "awm/0"}
    assert again["runs"]["flow-grpo/0"] == record["runs"]["flow-grpo/0"]  # done before: not run again
    assert again["command"] == record["command"]
    assert [c.endswith(" ".join(second)) for c in again["added_runs_commands"]] == [True]
