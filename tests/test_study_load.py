"""Smoke run of benchmarks/study_load.py: a real server, concurrent readers, no lost answers.

Small (3 readers x 10 answers) and without timing assertions; the full benchmark
(20 x 100) is `.venv/bin/python benchmarks/study_load.py`.
"""

from __future__ import annotations

import json


def test_load_benchmark_smoke(mrpaired, study_load, tmp_path, capsys):
    out = tmp_path / "study_load.json"
    rc = study_load.main(["--readers", "3", "--answers", "10", "--dup-every", "3",
                          "--data", str(mrpaired), "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "answers/s" in printed and "p95" in printed
    r = json.loads(out.read_text())
    assert r["expected_answers"] == r["stored_answers"] == 30
    assert r["lost_answers"] == 0 and r["duplicated_answers"] == 0
    assert r["first_answer_mismatches"] == 0 and r["http_errors"] == 0
    assert r["duplicate_submissions"] == 3 * 4  # answers 0, 3, 6, 9 of each reader sent twice
    assert r["answers_per_s"] > 0 and r["latency_ms"]["p95"] >= r["latency_ms"]["p50"] > 0
