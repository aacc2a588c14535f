"""docker/ for real, when a Docker engine answers here: benchmarks.bench_docker builds the image, serves it with
compose on the CPU, stops it during a streamed request, runs two replicas behind nginx and trains inside the image;
these tests assert on what it measured. Without an engine (CI), every test here is skipped with the reason."""
from __future__ import annotations

import pytest

from benchmarks import bench_docker
from tests.test_api_service import checkpoint  # noqa: F401 (fixture: a random model whose greedy run is long)


@pytest.fixture(scope="module")
def flow(checkpoint) -> dict:  # noqa: F811
    problem = bench_docker.engine_problem()
    if problem:
        pytest.skip(f"Docker flow not run: {problem}")
    try:
        bench_docker.image_variables()
    except bench_docker.cli.UsageError as err:
        pytest.skip(f"Docker flow not run: {err}")
    return bench_docker.measure(checkpoint, requests=20)


@pytest.mark.slow
def test_health_goes_from_503_to_200_and_the_healthcheck_to_healthy(flow):
    seen = flow["health_seen"]
    assert seen[-1] == "200" and "503" in seen and set(seen) <= {"refused", "503", "200"}, seen
    assert flow["ready_s"] <= flow["healthy_s"] < 180


@pytest.mark.slow
def test_generate_and_chat_completions_answer_200(flow):
    assert flow["generate_status"] == 200 and flow["chat_status"] == 200
    assert isinstance(flow["chat_text"], str)


@pytest.mark.slow
def test_the_server_runs_as_the_images_non_root_user(flow):
    assert flow["server_user"] == "10001"


@pytest.mark.slow
def test_a_stream_in_flight_at_docker_stop_completes_and_the_container_exits_0(flow):
    assert flow["stop_rc"] == 0 and flow["exit_code"] == 0
    assert flow["events_after_stop"] > 0, "the stop came after the stream had ended: nothing was in flight"
    assert flow["last_event"] == "[DONE]" and flow["finish_reason"] in ("length", "stop")


@pytest.mark.slow
def test_two_replicas_behind_nginx_split_the_requests(flow):
    assert flow["replica_statuses"] == [200]
    low, high = flow["replica_split"]
    assert low + high == 20 and low >= 8, flow["replica_split"]  # round-robin: 10/10, a retry may move one


@pytest.mark.slow
def test_training_in_the_image_writes_checkpoints_owned_by_the_mounts_user(flow):
    assert flow["train_rc"] == 0, flow["train_error"]
    assert flow["train_best_owner"] == bench_docker.TRAIN_UID
