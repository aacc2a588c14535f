"""docker/: what can be proved without a Docker engine. The Dockerfile and compose files are parsed (dockerfile-parse,
PyYAML) and checked against the project (torch pin <-> CUDA base, server settings, paths); hadolint and
`docker compose config` run where installed; the image's CMD and HEALTHCHECK run here, outside Docker."""
from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from benchmarks.bench_docker import compose_command
from tests.conftest import ROOT
from tests.test_api_service import checkpoint  # noqa: F401 (fixtures)
from tests.test_api_service import free_port, one_thread

DOCKER = ROOT / "docker"
# CUDA major.minor of the pinned torch's Linux x86_64 wheel on PyPI (its Requires-Dist: cuda-toolkit==13.0.3,
# nvidia-cudnn-cu13). A new torch pin fails here until the base image and this table move with it.
TORCH_WHEEL_CUDA = {"2.13.0": "13.0"}


class ComposeLoader(yaml.SafeLoader):
    """YAML with Compose's `!reset` tag (an override that clears a key)."""


def _reset(loader: yaml.SafeLoader, node: yaml.Node) -> dict:
    value = loader.construct_mapping(node) if isinstance(node, yaml.MappingNode) else loader.construct_sequence(node)
    return {"!reset": value}


ComposeLoader.add_constructor("!reset", _reset)


def compose(name: str = "docker-compose.yml") -> dict:
    return yaml.load((DOCKER / name).read_text(), Loader=ComposeLoader)


@pytest.fixture(scope="module")
def dockerfile():
    dockerfile_parse = pytest.importorskip("dockerfile_parse")
    parser = dockerfile_parse.DockerfileParser(path=str(DOCKER / "Dockerfile"))
    return parser


def instructions(parser, name: str) -> list[str]:
    return [i["value"] for i in parser.structure if i["instruction"] == name]


def torch_pin() -> str:
    pins = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    return pins["torch"]


def cmd_argv(parser) -> list[str]:
    return json.loads(instructions(parser, "CMD")[-1])


# ----------------------------------------------------------------------------- Dockerfile


def test_base_image_cuda_matches_the_pinned_torch_wheel(dockerfile):
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-(runtime|cudnn-runtime)-ubuntu[\d.]+", dockerfile.baseimage)
    assert match, f"base image {dockerfile.baseimage} is not an nvidia/cuda runtime image"
    assert f"{match[1]}.{match[2]}" == TORCH_WHEEL_CUDA[torch_pin()]


def test_python_311_dependencies_cached_before_the_code(dockerfile):
    structure = [(i["instruction"], i["value"]) for i in dockerfile.structure]
    runs = " ".join(v for k, v in structure if k == "RUN")
    assert "python3.11" in runs and "venv" in runs
    copies = [(n, v) for n, (k, v) in enumerate(structure) if k == "COPY"]
    install = next(n for n, (k, v) in enumerate(structure) if k == "RUN" and "pip install -r requirements.txt" in v)
    assert copies[0][1].split()[0] == "requirements.txt" and copies[0][0] < install
    code_copy = next(n for n, v in copies if v.split()[-2:] == [".", "."])
    assert install < code_copy


def test_non_root_user_env_port_and_healthcheck(dockerfile):
    users = instructions(dockerfile, "USER")
    assert users and users[-1] not in ("root", "0")
    env = dockerfile.envs
    assert env["PYTHONUNBUFFERED"] == "1" and env["GPT_HOST"] == "0.0.0.0"
    assert instructions(dockerfile, "EXPOSE") == [env["GPT_PORT"]] == ["8000"]
    health = instructions(dockerfile, "HEALTHCHECK")[0]
    assert "/health" in health and "--start-period" in health


def test_cmd_runs_the_server_module_with_one_worker(dockerfile):
    argv = cmd_argv(dockerfile)
    assert argv[:3] == ["python", "-m", "inference.api_service"]
    assert "--workers" not in argv or argv[argv.index("--workers") + 1] == "1"
    module = importlib.import_module(argv[2])
    assert callable(module.main) and callable(module.create_app)  # `inference.api_service:app` builds from these


def test_dockerignore_keeps_models_caches_git_venvs_and_secrets_out():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for needed in ("models/", ".git", ".venv/", "venv/", "data/**/.cache/", ".pytest_cache/", "docker/gpt.env"):
        assert needed in patterns, needed


def test_hadolint(dockerfile):
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed here (lint skipped)")
    run = subprocess.run([hadolint, "--no-color", str(DOCKER / "Dockerfile")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


# ----------------------------------------------------------------------------- compose


def _default(value) -> str:
    """The default of `${NAME:-default}` (or the literal value)."""
    match = re.fullmatch(r"\$\{(\w+):-(.*)\}", str(value))
    return match[2] if match else str(value)


def volume_source(volume: str) -> str:
    """The host side of `SOURCE:TARGET[:MODE]`, with a `${VAR:-default}` source read as its default."""
    return _default(re.match(r"(\$\{[^}]*\}|[^:]+):", volume)[1])


def test_compose_service_gpu_port_mounts_restart_logs():
    service = compose()["services"]["gpt"]
    assert re.fullmatch(r"gpt-inference:\$\{GPT_IMAGE_TAG:-[\w.]+\}", service["image"])
    address, port = service["ports"][0].rsplit(":8000", 1)[0].split("}:")
    assert _default(address + "}") == "127.0.0.1" and _default(port) == "8000"  # not every interface by default
    device = service["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["count"] >= 1 and device["capabilities"] == ["gpu"]
    assert service["restart"] == "unless-stopped"
    assert "/health" in " ".join(service["healthcheck"]["test"])
    assert service["logging"]["options"]["max-size"] and service["logging"]["options"]["max-file"]
    mounts = {v.split(":")[-1]: volume_source(v) for v in service["volumes"]}
    assert mounts == {"/app/models": "../models", "/app/data": "../data"}


def test_compose_build_args_and_user_default_to_the_dockerfiles(dockerfile):
    service = compose()["services"]["gpt"]
    args = {name: _default(value) for name, value in service["build"]["args"].items()}
    assert args == {"BASE_IMAGE": dockerfile.baseimage, "WHEELS_IMAGE": "scratch"}
    uid, gid = (_default(part) for part in re.findall(r"\$\{[^}]*\}", service["user"]))
    assert uid == gid == instructions(dockerfile, "USER")[-1] == "10001"


def test_the_wheels_are_bind_mounted_for_the_install_only(dockerfile):
    froms = instructions(dockerfile, "FROM")
    assert froms == ["${WHEELS_IMAGE} AS wheels", "${BASE_IMAGE}"]  # the served image is the base, not the wheels
    install = next(v for v in instructions(dockerfile, "RUN") if "pip install" in v)
    assert "--mount=type=bind,from=wheels,target=/wheels" in install and "--no-index --find-links /wheels" in install
    assert not any("/wheels" in v for v in instructions(dockerfile, "COPY"))


def test_compose_paths_exist():
    for name in ("docker-compose.yml", "docker-compose.replicas.yml"):
        for service in compose(name)["services"].values():
            build = service.get("build")
            if build:
                context = (DOCKER / build["context"]).resolve()
                assert context == ROOT and (context / build["dockerfile"]).is_file()
            for volume in service.get("volumes", []):
                assert (DOCKER / volume_source(volume)).exists(), volume


def test_compose_environment_is_every_server_setting_with_its_default():
    from inference.settings import SETTINGS, Settings

    service = compose()["services"]["gpt"]
    env = service["environment"]
    secret_only = {"GPT_API_KEY"}  # from the env file, never a default in the compose file or the image
    assert set(env) | secret_only == {name for _, name, *_ in SETTINGS} | {"GPT_LOG_LEVEL"}
    assert "GPT_API_KEY" not in env and service["env_file"][0]["path"] == "./gpt.env"
    example = (DOCKER / "gpt.env.example").read_text()
    assert re.search(r"^GPT_API_KEY=$", example, re.M)
    for _, name, default, *_ in SETTINGS:
        if name in env and name not in ("GPT_HOST", "GPT_PORT"):
            assert _default(env[name]) == default, name  # the server's own default, visible
    assert _default(env["GPT_LOG_LEVEL"]) == Settings().log_level
    assert env["GPT_HOST"] == "0.0.0.0" and str(env["GPT_PORT"]) == "8000"


def test_cpu_and_replica_overrides():
    cpu = compose("docker-compose.cpu.yml")["services"]["gpt"]
    assert cpu["deploy"] == {"!reset": {}} and cpu["environment"]["GPT_DEVICE"] == "cpu"
    replicas = compose("docker-compose.replicas.yml")["services"]
    assert replicas["gpt"]["ports"] == {"!reset": []}
    assert replicas["lb"]["ports"] == compose()["services"]["gpt"]["ports"]
    assert re.fullmatch(r"\$\{GPT_NGINX_IMAGE:-nginx:1\.(\d+)[\w.-]*\}", replicas["lb"]["image"])
    minor = int(re.search(r"nginx:1\.(\d+)", replicas["lb"]["image"])[1])
    assert minor >= 27  # `server gpt:8000 resolve` needs nginx >= 1.27.3
    conf = (DOCKER / "nginx.conf").read_text()
    assert "server gpt:8000" in conf and "proxy_buffering off" in conf


def test_docker_compose_config_validates():
    command = compose_command()
    if command is None:
        pytest.skip("no `docker compose` / `docker-compose` >= 2.24 installed here (structural checks above only)")
    for files in (["docker-compose.yml"], ["docker-compose.yml", "docker-compose.cpu.yml"],
                  ["docker-compose.yml", "docker-compose.replicas.yml"]):
        args = [a for f in files for a in ("-f", str(DOCKER / f))]
        run = subprocess.run(command + args + ["config", "--quiet"], capture_output=True, text=True, cwd=ROOT)
        assert run.returncode == 0, run.stderr


# ----------------------------------------------------------------------------- the CMD, outside Docker


@pytest.mark.slow
def test_the_image_cmd_serves_health_and_stops_on_sigterm(dockerfile, checkpoint):
    env = {**os.environ, **dockerfile.envs, "PATH": os.environ["PATH"]}
    env.pop("VIRTUAL_ENV", None)
    compose_env = compose()["services"]["gpt"]["environment"]
    env.update({name: _default(value) for name, value in compose_env.items()})
    port = free_port()
    env.update({"GPT_MODEL_PATH": str(checkpoint), "GPT_HOST": "127.0.0.1", "GPT_PORT": str(port),
                "GPT_NUM_THREADS": "1", "GPT_LOG_LEVEL": "warning"})
    argv = cmd_argv(dockerfile)
    proc = subprocess.Popen([sys.executable if argv[0] == "python" else argv[0], *argv[1:]], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "the CMD did not serve /health within 60 s"
            time.sleep(0.1)
        health = instructions(dockerfile, "HEALTHCHECK")[0]
        check = json.loads(health[health.index("CMD") + len("CMD"):])
        check[0] = sys.executable if check[0] == "python" else check[0]
        assert subprocess.run(check, env=env, timeout=30).returncode == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


# ----------------------------------------------------------------------------- docker/local_images.sh


def fake_tools(folder, docker_script: str, mmdebstrap_script: str = "exit 0") -> dict:
    """A PATH whose docker and mmdebstrap are shell stubs that log their arguments to folder/calls."""
    folder.mkdir(exist_ok=True)
    for name, body in (("docker", docker_script), ("mmdebstrap", mmdebstrap_script)):
        stub = folder / name
        stub.write_text(f'#!/bin/sh\necho "{name} $*" >> "{folder}/calls"\n{body}\n')
        stub.chmod(0o755)
    return {**os.environ, "PATH": f"{folder}:{os.environ['PATH']}"}


def local_images(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(DOCKER / "local_images.sh"), *args], capture_output=True, text=True, env=env,
                          timeout=60)


LOCAL_IMAGES_RUNS = [  # (docker stub, mmdebstrap stub, arguments, exit status): every way the script ends
    ("exit 0", "exit 0", [], 0),  # the images exist
    ('case "$1" in image) exit 1;; esac', 'echo "E: Release file is expired" >&2; exit 1', [], 2),  # a failed step
    ('case "$1" in info) exit 1;; esac', "exit 0", [], 2),  # no engine
    ("exit 0", "exit 0", ["--fast"], 2),  # a bad argument
    ("exit 0", "exit 0", ["--help"], 0),
]


@pytest.mark.parametrize("docker, mmdebstrap, args, status", LOCAL_IMAGES_RUNS,
                         ids=["images exist", "failed step", "no engine", "bad argument", "help"])
def test_local_images_leaves_nothing_in_the_temp_folder(docker, mmdebstrap, args, status, tmp_path):
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**fake_tools(tmp_path / "bin", docker, mmdebstrap), "TMPDIR": str(temp)}
    elsewhere = set(Path("/tmp").glob("gpt-local-images.*"))
    run = local_images(env, *args)
    assert run.returncode == status, run.stderr
    assert not list(temp.iterdir())  # its log and work folder are gone, on failure too
    assert set(Path("/tmp").glob("gpt-local-images.*")) <= elsewhere  # and none went to /tmp instead
    if status == 2:
        assert run.stderr.strip().splitlines()[-1].startswith("error: ") and "gpt-local-images" not in run.stderr


def test_local_images_script_parses_and_passes_shellcheck():
    assert subprocess.run(["sh", "-n", str(DOCKER / "local_images.sh")]).returncode == 0
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed here (syntax checked with sh -n only)")
    run = subprocess.run(["shellcheck", str(DOCKER / "local_images.sh")], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout


def test_local_images_without_an_engine_is_one_line(tmp_path):
    run = local_images(fake_tools(tmp_path, 'case "$1" in info) exit 1;; esac'))
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        "error: no Docker engine answers (start one: dockerd --ip=127.0.0.1 &; docs/docker.md)"]


def test_local_images_keeps_existing_images_and_prints_the_compose_command(tmp_path):
    run = local_images(fake_tools(tmp_path, "exit 0"))
    assert run.returncode == 0, run.stderr
    calls = (tmp_path / "calls").read_text()
    assert "mmdebstrap" not in calls and "docker import" not in calls  # idempotent: nothing rebuilt
    export, command = run.stdout.strip().splitlines()
    variables = dict(pair.split("=") for pair in export.split()[1:])
    assert variables["GPT_BASE_IMAGE"] == "gpt-local-base:bookworm" and variables["GPT_NGINX_IMAGE"]
    assert re.fullmatch(r"gpt-local-wheels:[0-9a-f]{12}", variables["GPT_WHEELS_IMAGE"])
    assert command.startswith("docker compose -f docker/docker-compose.yml -f docker/docker-compose.cpu.yml up")


def test_local_images_stops_at_a_failed_step_with_one_line(tmp_path):
    docker = 'case "$1" in image) exit 1;; esac'  # no image exists yet
    run = local_images(fake_tools(tmp_path, docker, 'echo "E: Release file is expired" >&2; exit 1'))
    assert run.returncode == 2 and "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: base image gpt-local-base:bookworm") and "E: Release file is expired" in last
    calls = (tmp_path / "calls").read_text()
    assert "docker import" not in calls  # the failed bootstrap is not imported as an empty image
    assert "--rebuild" in local_images(fake_tools(tmp_path, "exit 0"), "--help").stdout
    bad = local_images(fake_tools(tmp_path, "exit 0"), "--fast")
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: unknown argument --fast")
