"""client tools load_report: each step as the JSON document states it and as a row of the table
(client/resnet_serve/client/tools/load_report.py)."""

from __future__ import annotations

from collections import Counter

from resnet_serve.client.tools import load_report
from resnet_serve.client.tools.load_report import format_header, format_row, format_table, summarize
from resnet_serve.client.tools.load_steps import LoadConfig, Samples


def test_percentiles() -> None:
    p = load_report.percentiles_ms([i / 1000 for i in range(1, 101)])
    assert p == {"p50": 50.5, "p90": 90.1, "p99": 99.01, "max": 100.0}
    assert load_report.percentiles_ms([]) == {"p50": None, "p90": None, "p99": None, "max": None}


def test_a_rate_step_reports_its_rate_and_no_concurrency_nor_streams() -> None:
    s = Samples(window_s=4.0, warmup_requests=3, requests=41, ok_in_window=40, errors=Counter({"UNAVAILABLE": 1}))
    s.latencies_s.extend([0.002] * 40)
    step = summarize(LoadConfig(target="x:1", rates=(12.5,), streams=8), "rate", 12.5, s)
    assert (step["concurrency"], step["rate"], step["streams"], step["images_per_s"]) == (None, 12.5, None, 10.0)
    assert (step["warmup_requests"], step["requests"], step["protocol"], step["input"]) == (3, 41, "classifier", "raw")
    assert format_row(step).split() == ["unary", "raw", "1", "r=12.5/s", "10.0", "2.00", "2.00", "2.00", "2.00",
                                        "41", "UNAVAILABLE=1"]


def test_a_step_without_window_or_answers_reports_zero_and_dashes() -> None:
    step = summarize(LoadConfig(target="x:1", mode="stream", streams=2), "concurrency", 3, Samples())
    assert (step["images_per_s"], step["streams"], step["errors"]) == (0.0, 2, {})
    assert step["latency_ms"] == {"p50": None, "p90": None, "p99": None, "max": None}
    assert format_row(step).split() == ["stream", "raw", "1", "c=3", "0.0", "-", "-", "-", "-", "0", "0"]


def test_a_request_of_n_images_is_one_request_and_n_images_per_answer() -> None:
    """Counts and latencies stay per request (they match the server's request counters); images/s counts N."""
    s = Samples(window_s=2.0, warmup_requests=2, requests=9, ok_in_window=8, errors=Counter({"UNAVAILABLE": 1}))
    s.latencies_s.extend([0.004] * 8)
    config = LoadConfig(target="x:1", protocol="oip", model="m", batch=3)
    step = summarize(config, "concurrency", 4, s)
    assert (step["batch"], step["requests"], step["warmup_requests"], step["errors"]) == (3, 9, 2, {"UNAVAILABLE": 1})
    assert step["images_per_s"] == 12.0 and step["latency_ms"]["p50"] == 4.0  # 8 answers * 3 images / 2 s
    assert format_row(step).split()[:5] == ["unary", "raw", "3", "c=4", "12.0"]
    assert format_header().split()[:4] == ["mode", "input", "batch", "load"]
    rate = summarize(config, "rate", 30.0, s)
    assert (rate["rate"], rate["images_per_s"]) == (30.0, 12.0)  # the rate is stated in images/s too


def test_errors_are_listed_by_code_in_name_order() -> None:
    s = Samples(window_s=1.0, requests=3, errors=Counter({"UNAVAILABLE": 2, "DEADLINE_EXCEEDED": 1}))
    step = summarize(LoadConfig(target="x:1"), "concurrency", 1, s)
    assert list(step["errors"]) == ["DEADLINE_EXCEEDED", "UNAVAILABLE"]
    assert format_row(step).endswith("DEADLINE_EXCEEDED=1, UNAVAILABLE=2")


def test_rows_printed_one_by_one_line_up_under_the_header() -> None:
    quick = summarize(LoadConfig(target="x:1"), "concurrency", 1, Samples(window_s=1.0, requests=1, ok_in_window=1))
    slow = summarize(LoadConfig(target="x:1", input="jpeg"), "rate", 1000.0,
                     Samples(window_s=1.0, requests=123456, ok_in_window=99999))
    quick["latency_ms"] = {"p50": 1.0, "p90": 1.0, "p99": 1.0, "max": 1.0}
    slow["latency_ms"] = {"p50": 1234.5, "p90": 1234.5, "p99": 1234.5, "max": 1234.5}
    lines = [format_header(), format_row(quick), format_row(slow)]
    assert format_table([quick, slow]) == "\n".join(lines)
    starts = [sum(load_report.TABLE_WIDTHS[:i]) + 2 * i for i in range(len(load_report.TABLE_WIDTHS))]
    for line in lines:  # every column starts at the same place in every row
        assert all(line[i] != " " and (i == 0 or line[i - 1] == " ") for i in starts), line
