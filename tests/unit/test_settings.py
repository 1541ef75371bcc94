"""server/resnet_serve/server/settings.py: defaults < config file (TOML or JSON) < RESNET_SERVE_* < flags, where
each value came from, and a clear error for every bad value."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from pathlib import Path

import pytest

from resnet_serve.server.settings import FIELDS, Settings, load_settings, parser, read_config_file
from tests.harness import one_error_line, run_cli


def settings(*flags: str, env: dict[str, str] | None = None) -> Settings:
    """load_settings with a model dir (required) and nothing from this process's environment."""
    return load_settings(["--model-dir", "models/m", *flags], env or {})


def error(*flags: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ValueError) as err:
        load_settings(list(flags), env or {})
    return str(err.value)


def test_defaults_come_from_the_dataclass_and_say_so() -> None:
    s = settings()
    assert s.sources == {"model_dir": "flag"}
    for f in fields(Settings):
        if f.name not in ("model_dir", "sources"):
            assert getattr(s, f.name) == f.default, f.name
    assert "  port = 50051 (default)" in s.describe().splitlines()
    assert "  model_dir = 'models/m' (flag)" in s.describe().splitlines()
    assert len(s.describe().splitlines()) == len(FIELDS)  # every setting, sources not among them


def test_file_then_env_then_flag_each_recorded(tmp_path: Path) -> None:
    cfg = tmp_path / "serve.toml"
    cfg.write_text('[server]\nmax_batch_size = 4\nmax_queue_delay_us = 500\ninstances = 3\nmodel_dir = "a"\n')
    s = load_settings(["--config", str(cfg), "--max-queue-delay-us", "700", "--model-dir", "c"],
                      {"RESNET_SERVE_INSTANCES": "2", "RESNET_SERVE_MODEL_DIR": "b"})
    assert (s.max_batch_size, s.max_queue_delay_us, s.instances, s.model_dir) == (4, 700, 2, "c")
    assert s.sources == {"max_batch_size": f"file {cfg}", "max_queue_delay_us": "flag", "instances": "env",
                         "model_dir": "flag"}
    text = s.describe()
    assert f"max_batch_size = 4 (file {cfg})" in text and "max_queue_delay_us = 700 (flag)" in text
    assert "instances = 2 (env)" in text and "port = 50051 (default)" in text


def test_config_file_can_come_from_the_environment_as_json(tmp_path: Path) -> None:
    cfg = tmp_path / "serve.json"
    cfg.write_text(json.dumps({"model_dir": "m", "max_pixels": 1000, "auth_exempt_health": False}))
    s = load_settings([], {"RESNET_SERVE_CONFIG": str(cfg)})
    assert (s.model_dir, s.max_pixels, s.auth_exempt_health) == ("m", 1000, False)
    assert s.sources["max_pixels"] == f"file {cfg}"


def test_toml_settings_may_sit_at_the_top_level(tmp_path: Path) -> None:
    cfg = tmp_path / "serve.toml"
    cfg.write_text('model_dir = "m"\ngrace_period_s = 2.5\n')
    assert read_config_file(cfg) == {"model_dir": "m", "grace_period_s": 2.5}
    assert load_settings(["--config", str(cfg)], {}).grace_period_s == 2.5


def test_unknown_setting_in_a_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("max_batch = 4\nmodel_dir = 'm'\nthreads = 2\n")
    assert error("--config", str(bad)) == f"unknown setting(s) in {bad}: max_batch, threads"


def test_values_are_coerced_to_each_settings_type() -> None:
    s = settings("--version", "3", "--grace-period-s", "1.5", "--auth-exempt-health", "off", "--host", "127.0.0.1",
                 env={"RESNET_SERVE_POLL_INTERVAL_S": "2", "RESNET_SERVE_VERBOSE": "yes"})
    assert (s.version, s.grace_period_s, s.auth_exempt_health, s.host) == (3, 1.5, False, "127.0.0.1")
    assert (s.poll_interval_s, s.verbose) == (2.0, True)
    assert settings("--version", "").version is None  # empty: the highest version
    assert settings("-v").verbose is True and settings("-v").sources["verbose"] == "flag"


@pytest.mark.parametrize(("flags", "env", "message"), [
    (["--max-batch-size", "eight"], {}, "setting max_batch_size from flag: invalid literal for int() with base 10: "
                                        "'eight'"),
    ([], {"RESNET_SERVE_GRACE_PERIOD_S": "soon"}, "setting grace_period_s from env: could not convert string to "
                                                  "float: 'soon'"),
    (["--auth-exempt-health", "maybe"], {}, "setting auth_exempt_health from flag: expected true or false, got "
                                            "'maybe'"),
])
def test_a_value_of_the_wrong_type_names_setting_and_source(flags: list[str], env: dict[str, str],
                                                            message: str) -> None:
    assert error("--model-dir", "m", *flags, env=env) == message


def test_wrong_type_in_a_file_names_the_file(tmp_path: Path) -> None:
    cfg = tmp_path / "serve.toml"
    cfg.write_text('model_dir = "m"\nport = "http"\n')
    assert error("--config", str(cfg)) == f"setting port from file {cfg}: invalid literal for int() with base 10: " \
                                          "'http'"


def test_the_health_port_is_on_at_a_fixed_port_unless_turned_off() -> None:
    """A fixed default (like --port and --metrics-port), so probes and HEALTHCHECKs can name it; -1 turns it off."""
    assert (settings().health_port, settings().health_host) == (50052, "")
    s = settings(env={"RESNET_SERVE_HEALTH_PORT": "-1", "RESNET_SERVE_HEALTH_HOST": "127.0.0.1"})
    assert (s.health_port, s.health_host, s.sources["health_port"]) == (-1, "127.0.0.1", "env")
    assert settings("--health-port", "0").health_port == 0  # a free one, reported in the 'listening' line


def test_model_dir_is_required() -> None:
    assert error() == "--model-dir is required (or RESNET_SERVE_MODEL_DIR, or model_dir in the config file)"


@pytest.mark.parametrize(("flags", "message"), [
    (["--device", "tpu"], "device must be cpu or gpu, not 'tpu'"),
    (["--precision", "bf16"], "precision must be fp32, fp16 or int8, not 'bf16'"),
    (["--engine", "onnx"], "engine must be onednn or openvino (CPU), tensorrt or cuda (GPU), simulated (benchmarks), "
                           "or paddle (the default: oneDNN on CPU, TensorRT on GPU), not 'onnx'"),
    (["--simulated-cost-ms", "5,0.1"], "simulated_cost_ms is for --engine simulated (benchmarks only)"),
    (["--engine", "simulated", "--simulated-cost-ms", "5"], "simulated_cost_ms must be A,C in milliseconds (a batch "
                                                           "of b takes A + C*b ms), e.g. 5,0.1; not '5'"),
    (["--engine", "simulated", "--simulated-cost-ms", "5,x"], "simulated_cost_ms must be A,C in milliseconds (a "
                                                             "batch of b takes A + C*b ms), e.g. 5,0.1; not '5,x'"),
    (["--engine", "simulated", "--simulated-cost-ms=-1,0"], "simulated_cost_ms A,C must be finite and >= 0, "
                                                           "not '-1,0'"),
    (["--engine", "simulated", "--simulated-cost-ms", "inf,0"], "simulated_cost_ms A,C must be finite and >= 0, "
                                                               "not 'inf,0'"),
    (["--engine", "simulated", "--device", "gpu"], "engine simulated runs on --device cpu (it stands for any "
                                                   "device)"),
    (["--precision", "int8", "--device", "gpu"], "int8 runs on CPU only: int8 exports are oneDNN programs that no "
                                                 "GPU engine runs; use --device cpu, or --precision fp16 on GPU"),
    (["--engine", "tensorrt"], "engine tensorrt runs on GPU only: add --device gpu"),
    (["--engine", "openvino", "--device", "gpu"], "engine openvino runs on CPU only; on GPU use tensorrt (default) or "
                                                  "cuda"),
    (["--precision", "fp16"], "precision fp16 needs --device gpu (TensorRT); CPU serves fp32 or int8"),
    (["--worker-start-timeout-s", "0"], "worker_start_timeout_s must be > 0"),
    (["--gpus", "0,x"], "gpus must be comma-separated GPU ids like 0,1, not '0,x'"),
    (["--gpus", "-1"], "gpus must be GPU ids >= 0, not '-1'"),
    (["--max-batch-size", "0"], "max_batch_size must be at least 1"),
    (["--instances", "0"], "instances must be at least 1"),
    (["--max-request-id-length", "0"], "max_request_id_length must be at least 1"),
    (["--port", "65536"], "port must be 0..65535 (0: a free one), not 65536"),
    (["--metrics-port", "-2"], "metrics_port must be 0..65535 (0: a free one, -1: off), not -2"),
    (["--health-port", "65536"], "health_port must be 0..65535 (0: a free one, -1: off), not 65536"),
    (["--batch-time-limit-s", "-1"], "batch_time_limit_s must be >= 0 (0: derived from the warm-up)"),
    (["--max-aspect-ratio", "0.5"], "max_aspect_ratio must be at least 1"),
    (["--max-aspect-ratio", "nan"], "max_aspect_ratio must be at least 1"),
    (["--max-queue-delay-us", "-1"], "max_queue_delay_us must be >= 0"),
    (["--tls-cert", "c.pem"], "TLS needs both tls_cert and tls_key"),
    (["--tls-client-ca", "ca.pem"], "tls_client_ca (mutual TLS) needs tls_cert and tls_key"),
    (["--buckets", "2,8"], "buckets [2, 8] must include 1 and max_batch_size 8"),
    (["--front-processes", "0"], "front_processes must be 1..32, not 0"),
    (["--front-processes", "33"], "front_processes must be 1..32, not 33"),
    (["--front-processes", "2", "--poll-interval-s", "5"], "front_processes > 1 serves one version: hot reload "
                                                           "(poll_interval_s) is not available with it; restart "
                                                           "the server (roll the pods) to serve a new version"),
    (["--buckets", "1,4", "--max-batch-size", "8"], "buckets [1, 4] must include 1 and max_batch_size 8"),
])
def test_bad_value_is_refused_with_a_clear_message(flags: list[str], message: str) -> None:
    assert error("--model-dir", "m", *flags) == message


def test_buckets_default_to_powers_of_two_and_may_be_listed() -> None:
    assert settings("--max-batch-size", "6").bucket_sizes() == (1, 2, 4, 6)
    assert settings("--buckets", " 8, 1,4,4 ").bucket_sizes() == (1, 4, 8)


def test_the_simulated_engine_takes_its_cost_as_a_and_c_milliseconds() -> None:
    """--engine simulated (benchmarks only): A,C; unset means no wait at all."""
    assert settings("--engine", "simulated", "--simulated-cost-ms", " 5, 0.1").simulated_cost() == (5.0, 0.1)
    assert settings("--engine", "simulated").simulated_cost() == (0.0, 0.0)
    assert "for benchmarks only" in parser().format_help()


def test_gpu_ids() -> None:
    assert settings("--gpus", "1, 3").gpu_ids() == (1, 3)
    assert settings().gpu_ids() == ()  # empty: GPU 0


def test_every_setting_is_a_flag_with_help() -> None:
    """--help renders (a % in a help text would break argparse) and lists every setting with its default."""
    text = parser().format_help()
    for name in FIELDS:
        flag = "--" + name.replace("_", "-")
        assert flag in text, flag
    assert "(default: 50051)" in text and "RESNET_SERVE_<NAME>" in text


def test_bad_settings_at_the_command_line_are_one_line(tmp_path: Path) -> None:
    """`resnet-serve` as a user runs it: a bad value is one `error:` line and exit 2; a model folder with no
    versions ends with one (after the effective configuration is logged), no traceback."""
    with ThreadPoolExecutor(2) as pool:  # two interpreters at once
        bad_value, no_versions = pool.map(lambda args: run_cli("resnet-serve", *args, timeout=120), [
            ["--model-dir", str(tmp_path), "--precision", "fp16"], ["--model-dir", str(tmp_path / "nope")]])
    assert "fp16 needs --device gpu" in one_error_line(bad_value)
    r = no_versions
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last == f"error: no model versions (numeric folders with manifest.json) under {tmp_path / 'nope'}"


@pytest.mark.parametrize("flags,match", [(["--gpus", "0,x"], "gpus"), (["--gpus", "-1"], "gpus"),
                                         (["--worker-start-timeout-s", "0"], "worker_start_timeout_s"),
                                         (["--engine", "trt"], "engine"),
                                         (["--engine", "cuda"], "GPU only"),
                                         (["--device", "gpu", "--engine", "openvino"], "CPU only"),
                                         (["--device", "gpu", "--precision", "int8"], "int8 runs on CPU only")])
def test_gpu_settings_are_checked(flags: list[str], match: str) -> None:
    from resnet_serve.server.settings import load_settings

    with pytest.raises(ValueError, match=match):
        load_settings(["--model-dir", "m", *flags], environ={})
