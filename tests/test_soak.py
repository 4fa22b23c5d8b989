"""The soak script: its checks as pure functions, and a short whole run against a tiny-model server process
(the 20-minute soak on the default model is run by hand: loadtest/SOAK.md)."""

from __future__ import annotations

import pytest
from conftest import byte_tokenizer, make_tiny_model

from loadtest import soak
from loadtest.soak_traffic import SoakConfig, Tally, make_asks


def test_tally_takes_the_first_reply_as_reference():
    tally = Tally()
    assert tally.check(("t", 1, 0), [5, 6, 7])
    assert tally.check(("t", 1, 0), [5, 6, 7])
    assert tally.check(("t", 2, 0), [9])  # another version: its own reference
    assert not tally.check(("t", 1, 0), [5, 6, 8])
    assert tally.checked == 2 and len(tally.wrong) == 1 and "('t', 1, 0)" in tally.wrong[0]


def result(tally: Tally, samples, leftovers=None) -> dict:
    return {
        "capacity_rps": 4.0,
        "rate_rps": 3.2,
        "elapsed_s": 60.0,
        "num_requests": 10,
        "tally": tally,
        "samples": samples,
        "leftovers": leftovers or {"prefix_server_running_batch_size": 0.0},
        "references": 0,
    }


def test_verdict_passes_a_clean_run_and_names_each_failure():
    config = SoakConfig(minutes=1, warmup_s=10, max_rss_growth_mib=50)
    clean = Tally()
    clean.count("ok")
    clean.count("deleted", "task_not_found")  # a deleted task's 404 is expected
    clean.count("rate_limited", "overloaded")  # reported, not a failure
    lines, failures = soak.verdict(result(clean, [(0, 500.0), (10, 600.0), (60, 640.0)]), config)
    assert failures == []
    assert any("600.0 MiB after warm-up" in line and "+40.0 MiB" in line for line in lines)

    bad = Tally()
    for kind in ("server_error", "lost", "client_error"):
        bad.count(kind)
    bad.check(("t", 1, 0), [1])
    bad.check(("t", 1, 0), [2])
    samples = [(0, 500.0), (10, 600.0), (60, 700.0)]
    _, failures = soak.verdict(result(bad, samples, {"prefix_server_running_batch_size": 2.0}), config)
    text = "; ".join(failures)
    for expected in (
        "1 5xx",
        "1 lost",
        "1 wrong",
        "1 unexpected 4xx",
        "left on the server",
        "RSS grew 100.0",
    ):
        assert expected in text


def test_asks_follow_zipf_and_the_fractions():
    config = SoakConfig(stream_fraction=0.5, disconnect_fraction=0.1)
    tasks = [f"t{i}" for i in range(50)]
    asks = make_asks(config, tasks, rate=50, duration_s=100, seed=0)
    assert 4500 < len(asks) < 5500 and all(a.offset_s < 100 for a in asks)
    by_task = [sum(a.task_id == t for a in asks) for t in tasks]
    assert by_task[0] > 3 * by_task[9] > 0  # Zipf 1.1: task 1 ~ 12.6x task 10
    assert 0.08 < sum(a.disconnect for a in asks) / len(asks) < 0.12
    assert all(a.stream for a in asks if a.disconnect)
    assert 0.5 < sum(a.stream for a in asks) / len(asks) < 0.6
    assert asks == make_asks(config, tasks, rate=50, duration_s=100, seed=0)  # seeded


def test_soak_refuses_a_server_that_is_not_local(capsys):
    with pytest.raises(SystemExit) as e:
        soak.main(["--url", "http://10.1.2.3:8000", "--pid", "1"])
    assert e.value.code == 2 and "127.0.0.1 only" in capsys.readouterr().err


@pytest.mark.slow  # ~45 s: a 20 s soak, the server's start and the checks after it
def test_a_short_soak_against_a_tiny_model_server(tmp_path, capsys):
    make_tiny_model("llama-gqa").save_pretrained(tmp_path / "model")
    byte_tokenizer().save_pretrained(tmp_path / "model")
    serve = f"--model {tmp_path / 'model'} --prefix-dir {tmp_path / 'prefixes'} --max-batch-size 8"
    argv = [
        *("--serve-args", serve, "--server-log", str(tmp_path / "server.log")),
        *("--minutes", "0.33", "--tasks", "10", "--prompts", "6"),
        *("--prompt-len", "uniform:2:8", "--output-len", "uniform:4:16"),  # within the tiny context
        *("--capacity-requests", "16", "--capacity-fraction", "0.5"),
        *("--disconnect-fraction", "0.1", "--churn-every-s", "1"),
        *("--sample-every-s", "2", "--warmup-s", "6", "--reference-checks", "3"),
    ]
    code = soak.main(argv)
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert out.rstrip().endswith("PASS")
    summary = out[out.index("summary:") :]
    assert "5xx: 0  lost: 0  wrong: 0  unexpected 4xx: 0" in summary
    outcomes = dict(
        item.rsplit(" ", 1)
        for item in summary.split("outcomes (with the capacity run): ")[1].split("\n")[0].split(", ")
    )
    assert int(outcomes["ok"]) > 50 and int(outcomes["disconnected"]) > 0
    assert int(outcomes["upload"]) > 0 and int(outcomes["delete"]) > 0
    assert "RSS curve" in out and "MiB after warm-up" in summary
    assert "server: exit code 0 after SIGTERM" in summary
