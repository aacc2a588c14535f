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

import httpx
import pytest
import yaml

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


def test_compose_service_gpu_port_mounts_restart_logs():
    service = compose()["services"]["gpt"]
    assert re.fullmatch(r"gpt-inference:\$\{GPT_IMAGE_TAG:-[\w.]+\}", service["image"])
    assert _default(service["ports"][0].split(":8000")[0]) == "8000"
    device = service["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["count"] >= 1 and device["capabilities"] == ["gpu"]
    assert service["restart"] == "unless-stopped"
    assert "/health" in " ".join(service["healthcheck"]["test"])
    assert service["logging"]["options"]["max-size"] and service["logging"]["options"]["max-file"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
    assert mounts == {"/app/models": "../models", "/app/data": "../data"}


def test_compose_paths_exist():
    for name in ("docker-compose.yml", "docker-compose.replicas.yml"):
        for service in compose(name)["services"].values():
            build = service.get("build")
            if build:
                context = (DOCKER / build["context"]).resolve()
                assert context == ROOT and (context / build["dockerfile"]).is_file()
            for volume in service.get("volumes", []):
                assert (DOCKER / volume.split(":")[0]).exists(), volume


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
    assert _default(replicas["lb"]["ports"][0].split(":8000")[0]) == "8000"
    conf = (DOCKER / "nginx.conf").read_text()
    assert "server gpt:8000" in conf and "proxy_buffering off" in conf


def _compose_command() -> list[str] | None:
    """`docker compose` or `docker-compose`, if one >= 2.24 (for `!reset` and optional env files) is installed."""
    for command in (["docker", "compose"], ["docker-compose"]):
        if not shutil.which(command[0]):
            continue
        run = subprocess.run(command + ["version", "--short"], capture_output=True, text=True)
        version = re.match(r"v?(\d+)\.(\d+)", run.stdout.strip()) if run.returncode == 0 else None
        if version and (int(version[1]), int(version[2])) >= (2, 24):
            return command
    return None


def test_docker_compose_config_validates():
    command = _compose_command()
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
