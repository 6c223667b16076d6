"""The one-call GPU pass (fastjanus.bench.gpu_pass): its dry run end to end on the CPU, and its budget, file
and log rules on their own."""
import json
import re
import sys

import pytest
import torch

from fastjanus.bench import gpu_pass as gp

NAME = re.compile(r"^[A-Za-z0-9._-]+$")  # what a device run copies back


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    if torch.cuda.is_available():
        pytest.skip("the dry run checks the plumbing on machines without a GPU; here the real pass runs")
    out = tmp_path_factory.mktemp("pass") / "out"
    lines = []
    rc = gp.main(["--out", str(out), "--dry-run", "--work", str(out.parent / "work")], echo=lines.append)
    return rc, out, lines


# The dry run takes about 50 s on 2 cores: it runs in .ci/run's slow step, outside the default suite's 10 minutes
@pytest.mark.slow
def test_dry_run_end_to_end(dry):
    rc, out, lines = dry
    assert rc == 0, "\n".join(lines)
    files = sorted(p for p in out.iterdir())
    assert 0 < len(files) <= gp.MAX_FILES and all(p.is_file() and NAME.match(p.name) for p in files)
    assert all(p.stat().st_size <= gp.MAX_FILE_BYTES for p in files)
    names = {p.name.split("-", 4)[-1] for p in files}  # cpu-YYYY-MM-DD-<what>
    assert names == {"kernels.json", "pass-tests-kernels-e2e-tiny.json", "pass-tests-kernels-e2e-tiny.log",
                     "tiny-graphs.json", "tiny-graphs.png", "tiny-eager.json", "tiny-eager.png",
                     "tiny-kernels-per-step.json"}, names
    rep = json.loads(next(out.glob("*-pass-*.json")).read_text())
    assert rep["finished"] and rep["skipped"] == [] and rep["environment"]["dry_run"] is True
    assert rep["environment"]["versions"]["torch"] == torch.__version__
    steps = {s["name"]: s for s in rep["steps"]}
    assert list(steps) == ["checkpoint-tiny", "tests-gpu", "kernels", "bench-tiny-graphs", "bench-tiny-eager",
                           "step-kernels-tiny", "tests-default"]
    assert all(s["status"] == "ok" and s["seconds"] >= 0 for s in steps.values())
    t = steps["tests-gpu"]["tests"]  # CUDA is hidden from a dry run's steps: every GPU test skips
    assert t["source"] == "junit" and t["passed"] == 0 and t["skipped"] > 20 and t["failed"] == 0
    assert steps["tests-default"]["tests"]["passed"] > 10
    # the benchmark got a time limit from the budget and wrote its reports
    assert "--time-limit" in steps["bench-tiny-graphs"]["command"]
    g = json.loads(next(out.glob("*-tiny-graphs.json")).read_text())
    e = json.loads(next(out.glob("*-tiny-eager.json")).read_text())
    assert g["platform"] == "cpu" and g["time_limit"]["limit_s"] > 0 and g["time_limit"]["skipped"] == []
    assert e["baselines_skipped"]["transformers"].startswith("not requested")  # baselines only in the graphs run
    assert [x["name"] for x in e["scenarios"]] == ["t2i-1", "throughput", "understand-ttft", "understand-decode"]
    assert steps["bench-tiny-graphs"]["bench"]["left_out"] == []
    k = json.loads(next(out.glob("*-kernels.json")).read_text())
    assert k["dry_run"] is True and {r["kernel"] for r in k["results"]} >= {"decode_attention", "cfg_sample"}
    sk = json.loads(next(out.glob("*-tiny-kernels-per-step.json")).read_text())
    img = sk["archs"]["tiny"]["image"]  # the tiny model as it is (2 layers): 9 per layer + 9 outside
    assert sk["platform"] == "cpu" and img["total"] == 2 * 9 + 9 and "graph_replay" not in img
    log = next(out.glob("*-pass-*.log")).read_text()
    for name in steps:
        assert f"# ===== {name} " in log
    table = lines[-1].splitlines()  # the summary printed last: one row per step, each "ok"
    for name in steps:
        assert re.search(rf"^{re.escape(name)}\s+ok\s", "\n".join(table), re.M), (name, table)


@pytest.mark.slow
def test_the_table_reads_the_dry_run(dry):
    from fastjanus.bench.table import table
    _, out, _ = dry
    notes = []
    md = table(sorted(str(p) for p in out.glob("*.json")), log=notes.append)
    assert md.count("| CPU RUN (not a GPU figure)") == 9  # 5 + 4 scenario rows, each marked as a CPU run
    assert len(notes) == 3  # the pass report and the two kernel files are not bench reports


def test_steps_that_do_not_fit_the_budget_are_skipped_and_listed(tmp_path):
    lines = []
    rc = gp.main(["--out", str(tmp_path), "--dry-run", "--part", "kernels", "--budget-s", str(gp.MARGIN_S + 1)],
                 echo=lines.append)
    assert rc == 1
    rep = json.loads(next(tmp_path.glob("*-pass-kernels.json")).read_text())
    assert rep["steps"][0]["status"] == "skipped" and rep["skipped"][0].startswith("kernels: budget: ")
    assert not list(tmp_path.glob("*-[0-9][0-9]-kernels.json"))  # it never ran


def test_a_step_past_its_time_is_stopped(tmp_path):
    step = gp.Step("tests-sleeper", "tests", [sys.executable, "-c", "import time; print('started', flush=True); "
                                                              "time.sleep(60)"], min_s=1)
    ps = gp.Pass(tmp_path, "cpu-x", "t", gp.MARGIN_S + 3, {"dry_run": True}, [step], ["test"], gp.time.monotonic(),
                 echo=lambda s: None)
    assert ps.run() == 1
    assert step.record["status"] == "timed out" and step.record["seconds"] < 10
    assert "started" in (tmp_path / "cpu-x-pass-t.log").read_text()
    assert step.record["tests"]["source"].startswith("pytest -v lines")  # no JUnit file: counted from the log


def test_plans_stay_within_what_a_device_run_returns(tmp_path):
    def files(parts, arches):
        return gp.count_files(gp.plan_steps(tmp_path, tmp_path, "x", "t", parts, arches, dry_run=False))
    # e2e per arch: two bench JSONs and plots, and the kernels-per-step JSON
    assert files(["tests", "kernels", "e2e"], ["janus-pro-1b"]) == 8
    assert files(["e2e"], ["janus-pro-7b"]) == 7 and files(["tests", "kernels"], []) == 3
    assert files(["e2e"], ["janus-pro-1b", "janus-pro-7b"]) == 12 > gp.MAX_FILES  # refused by main
    # quant per arch: an int8 and an fp8 bench JSON (with the FP8 KV cache and the quality check)
    assert files(["quant"], ["janus-pro-1b", "janus-pro-7b"]) == 6
    steps = gp.plan_steps(tmp_path, tmp_path, "x", "t", ["quant"], ["janus-pro-7b"], dry_run=False)
    assert [s.name for s in steps] == ["checkpoint-janus-pro-7b", "bench-janus-pro-7b-int8", "bench-janus-pro-7b-fp8"]
    cmd = " ".join(steps[2].cmd)
    assert "--quantize fp8 --kv-cache fp8 --quality" in cmd and "--scenario t2i-16" in cmd and steps[2].needs
    # spec per arch: the pass-vs-step JSON and the end-to-end bench with --speculative
    assert files(["spec"], ["janus-pro-1b", "janus-pro-7b"]) == 6
    steps = gp.plan_steps(tmp_path, tmp_path, "x", "t", ["spec"], ["janus-pro-1b"], dry_run=False)
    assert [s.name for s in steps] == ["checkpoint-janus-pro-1b", "spec-pass-janus-pro-1b", "bench-spec-janus-pro-1b"]
    assert "--rows 2,32 --windows 8,16,32" in " ".join(steps[1].cmd) and steps[1].needs
    assert "--speculative --window 16" in " ".join(steps[2].cmd) and steps[2].time_limit_flag
    # flow: JanusFlow-1.3B's checkpoint and its bench JSON, whatever the --arch
    steps = gp.plan_steps(tmp_path, tmp_path, "x", "t", ["flow"], ["janus-pro-7b"], dry_run=False)
    assert [s.name for s in steps] == ["checkpoint-janusflow-1.3b", "bench-flow-janusflow-1.3b"]
    assert "bench --arch janusflow-1.3b" in " ".join(steps[1].cmd) and steps[1].needs and gp.count_files(steps) == 3
    # aoti: the checkpoint, then export + C++ build + fastjanus-run against the Python runtime, one JSON per arch
    steps = gp.plan_steps(tmp_path, tmp_path, "x", "t", ["aoti"], ["janus-pro-1b"], dry_run=False)
    assert [s.name for s in steps] == ["checkpoint-janus-pro-1b", "aoti-janus-pro-1b"] and gp.count_files(steps) == 3
    assert "aoti_bench --arch janus-pro-1b" in " ".join(steps[1].cmd) and "--device cuda" in " ".join(steps[1].cmd)


def test_refusals(tmp_path, capsys):
    if not torch.cuda.is_available():
        assert gp.main(["--out", str(tmp_path)]) == 2
        assert "no CUDA device is visible" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gp.main(["--out", str(tmp_path), "--part", "tests,bogus", "--dry-run"])
    assert "bogus" in capsys.readouterr().err


def test_test_counts_from_a_killed_pytest():
    text = ("tests/test_a.py::test_x PASSED  [ 10%]\ntests/test_a.py::test_y[1] FAILED  [ 20%]\n"
            "tests/test_b.py::test_z SKIPPED (needs CUDA)  [ 30%]\n")
    s = gp.test_summary(text, None)
    assert (s["passed"], s["failed"], s["skipped"]) == (1, 1, 1)
    assert s["failures"][0]["test"] == "tests/test_a.py::test_y[1]"


def test_log_is_capped_at_the_file_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(gp, "MAX_FILE_BYTES", 1 << 20)
    monkeypatch.setattr(gp, "LOG_KEEP_HEAD", 1 << 18)
    ps = gp.Pass(tmp_path, "cpu-x", "t", 100, {}, [], ["test"], gp.time.monotonic(), echo=lambda s: None)
    ps.log.write("HEAD\n" + "x" * (3 << 20) + "\nTAIL\n")
    ps._cap_log()
    ps.log.close()
    data = (tmp_path / "cpu-x-pass-t.log").read_text()
    assert len(data.encode()) <= 1 << 20 and data.startswith("HEAD") and data.endswith("TAIL\n") and "cut" in data


def test_a_bench_whose_checkpoint_failed_is_not_started(tmp_path):
    fail = gp.Step("checkpoint-x", "e2e", [sys.executable, "-c", "raise SystemExit(3)"], min_s=0)
    bench = gp.Step("bench-x-graphs", "e2e", [sys.executable, "-c", "print('ran')"], min_s=0, needs="checkpoint-x")
    ps = gp.Pass(tmp_path, "cpu-x", "t", 100, {}, [fail, bench], ["test"], gp.time.monotonic(), echo=lambda s: None)
    assert ps.run() == 1
    assert fail.record["status"] == "failed" and fail.record["returncode"] == 3
    assert bench.record == {"status": "skipped", "reason": "needs checkpoint-x, which did not succeed"}
    rep = json.loads((tmp_path / "cpu-x-pass-t.json").read_text())
    assert rep["finished"] and rep["skipped"] == ["bench-x-graphs: needs checkpoint-x, which did not succeed"]
