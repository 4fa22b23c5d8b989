"""loadtest/bench_pool.py without a server: arguments, ratios, the metrics reader, the pairs and tables."""

from __future__ import annotations

import pytest

from loadtest.bench_pool import (
    KV_GAUGES,
    ROWS_GAUGE,
    format_memory,
    format_table,
    make_pairs,
    no_stall_bound,
    no_stall_line,
    pages,
    parse_args,
    parse_metrics,
    summarize,
)


@pytest.mark.parametrize(
    ("argv", "repeats", "rounds", "tasks"),
    [
        ([], 3, 4, 1000),
        (["--quick"], 1, 1, 50),
        (["--quick", "--repeats", "2", "--tasks", "7"], 2, 1, 7),
        (["--rounds", "2"], 3, 2, 1000),
    ],
)
def test_parse_args_defaults_and_quick(argv, repeats, rounds, tasks):
    args = parse_args(argv)
    assert (args.repeats, args.rounds, args.tasks) == (repeats, rounds, tasks)
    assert args.url is None and args.read_delay_ms == 200


def test_parse_args_refuses_a_negative_count():
    with pytest.raises(SystemExit):
        parse_args(["--repeats", "0"])


def test_summarize_takes_the_median_of_per_repeat_ratios():
    # The baseline drifts with the machine; the per-repeat ratio stays 0.5 while median/median would not.
    summary = summarize([50.0, 100.0, 60.0], [100.0, 200.0, 120.0])
    assert summary == {"scenario_tok_s": 60.0, "baseline_tok_s": 120.0, "ratio": 0.5, "ratios": [0.5] * 3}
    assert summarize([90.0], [100.0])["ratio"] == 0.9
    with pytest.raises(ValueError):
        summarize([1.0, 2.0], [1.0])


def test_parse_metrics_reads_unlabelled_samples_and_marks_absent_ones():
    text = "\n".join(
        [
            "# HELP prefix_server_kv_pages_total Pages in the pool",
            "# TYPE prefix_server_kv_pages_total gauge",
            "prefix_server_kv_pages_total 2048.0",
            "prefix_server_kv_pages_used 272.0",
            'prefix_server_requests_total{task="a",status="ok"} 3.0',
            "prefix_server_running_batch_size 64.0",
        ]
    )
    found = parse_metrics(text, (*KV_GAUGES, ROWS_GAUGE))
    assert found["prefix_server_kv_pages_total"] == 2048
    assert found["prefix_server_kv_pages_used"] == 272
    assert found["prefix_server_kv_pages_shared"] is None
    assert found[ROWS_GAUGE] == 64


@pytest.mark.parametrize(("tokens", "expected"), [(1, 1), (16, 1), (17, 2), (250, 16), (256, 16)])
def test_pages_are_16_tokens(tokens, expected):
    assert pages(tokens) == expected


def test_make_pairs_main_and_slow_store():
    main = make_pairs(1000, 16, 250, None)
    assert [p.name for p in main] == ["p250", "p16", "tasks", "c32", "c64"]
    by_name = {p.name: p for p in main}
    assert by_name["p16"].baseline is by_name["p250"].baseline  # one no-prefix workload, one cursor
    assert by_name["tasks"].baseline is by_name["p16"].scenario
    assert len(by_name["tasks"].scenario.tasks) == 1000 and by_name["c64"].scenario.concurrency == 64
    slow, staggered = make_pairs(50, 16, 250, 200)
    assert slow.name == "tasks-slow-store" and "200 ms store reads" in slow.scenario.label
    assert (staggered.scenario, staggered.baseline) == (slow.scenario, slow.baseline)  # one cursor: all cold
    assert slow.stagger_s == 0 and staggered.stagger_s > 0


def test_format_table_rows_and_skipped():
    rows = [
        {"scenario": "a", "baseline": "b", "scenario_tok_s": 150.0, "baseline_tok_s": 200.0, "ratio": 0.75},
        {"scenario": "c", "baseline": "d", "skipped": "no flag"},
    ]
    lines = format_table(rows).splitlines()
    assert lines[0].startswith("| scenario | baseline | tok/s")
    assert lines[2] == "| a | b | 150.0 | 200.0 | 0.75 |"
    assert lines[3] == "| c | d | skipped: no flag | | |"


def test_format_memory_shows_na_and_the_prefix_pages():
    peak = {"prefix_server_kv_pages_used": 272.0, ROWS_GAUGE: 64.0}
    table = format_memory(peak, 250, 62)
    assert "| prefix_server_kv_pages_used | 272 |" in table
    assert "| prefix_server_kv_pages_shared | n/a |" in table
    assert "| one 250-token prefix, ceil(250 / 16) | 16 |" in table
    assert "| about, prefix once: 16 + 64 rows x 4 | 272 |" in table
    assert "| about, a copy per row: 64 x (16 + 4) | 1280 |" in table


def test_the_slow_store_bound_is_the_share_of_a_request_life_after_its_read():
    row = {"ratio": 0.8, "runs": {"baseline": [{"latency_s": t} for t in (1.0, 1.8, 5.0)]}}
    assert no_stall_bound(row, 200) == pytest.approx(1.8 / 2.0)  # the median latency, plus 0.2 s
    assert "at most 0.90" in no_stall_line(row, 200) and "(0.89 of that bound)" in no_stall_line(row, 200)
