"""Docker end to end on this machine: build the image, serve it with compose on the CPU, stop it during a streamed
request, run two replicas behind nginx, and train inside the image into bind mounts as a non-root user.

    python -m benchmarks.bench_docker                         # serves models/sft/sft_best.pth
    python -m benchmarks.bench_docker --cold                  # also times a build without the layer cache

Prints one JSON line: build seconds, image size, seconds from `up` to /health 200 and to the healthcheck's
`healthy`, the statuses seen before ready, the server's user id, what a stream in flight at `docker stop` received,
the exit code, how nginx split the requests over two replicas, and the training run's exit code and output owner.
Needs a Docker engine with compose >= 2.24 and buildx. Without registry access the images come from
docker/local_images.sh (run here when GPT_BASE_IMAGE is not set). Each run is its own compose project on a free
port, taken down at the end; tests/test_docker_live.py asserts on the same figures.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx

import cli
from benchmarks.cli_options import benchmark_parser

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
CPU = ["docker-compose.yml", "docker-compose.cpu.yml"]
REPLICAS = CPU + ["docker-compose.replicas.yml"]
TRAIN_UID = 12345  # not the image's 10001 and not root: the mounts' owner is what makes training work


class DockerFlowError(ValueError):
    """A step of the flow failed (one line: the step and the tail of what docker said)."""


def one_line(text: str, limit: int = 600) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines() if line.strip())[-limit:]


def compose_command() -> list[str] | None:
    """`docker compose` or `docker-compose`, if one >= 2.24 (for `!reset` and optional env files) is installed."""
    for command in (["docker", "compose"], ["docker-compose"]):
        if not shutil.which(command[0]):
            continue
        run = subprocess.run(command + ["version", "--short"], capture_output=True, text=True)
        version = re.match(r"v?(\d+)\.(\d+)", run.stdout.strip()) if run.returncode == 0 else None
        if version and (int(version[1]), int(version[2])) >= (2, 24):
            return command
    return None


def engine_problem() -> str | None:
    """Why the live flow cannot run here (None: it can)."""
    if not shutil.which("docker"):
        return "no docker CLI installed (Debian: apt-get install docker.io; docs/docker.md)"
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        return "no Docker engine answers (start one: dockerd --ip=127.0.0.1 &; docs/docker.md)"
    if compose_command() is None:
        return "no docker compose >= 2.24 installed (docs/docker.md: Debian 13's docker-compose package)"
    if subprocess.run(["docker", "buildx", "version"], capture_output=True).returncode != 0:
        return "no docker buildx installed (the Dockerfile's RUN --mount needs BuildKit; docs/docker.md)"
    return None


def image_variables() -> dict[str, str]:
    """GPT_BASE_IMAGE and friends: from the environment when set, else from docker/local_images.sh's export line."""
    names = ("GPT_BASE_IMAGE", "GPT_WHEELS_IMAGE", "GPT_NGINX_IMAGE")
    if os.environ.get("GPT_BASE_IMAGE"):
        return {name: os.environ[name] for name in names if os.environ.get(name)}
    if not shutil.which("mmdebstrap"):
        raise cli.UsageError("GPT_BASE_IMAGE is not set and mmdebstrap is not installed for docker/local_images.sh:"
                             " set GPT_BASE_IMAGE (and GPT_WHEELS_IMAGE, GPT_NGINX_IMAGE) or apt-get install"
                             " mmdebstrap")
    run = subprocess.run(["sh", str(DOCKER / "local_images.sh")], capture_output=True, text=True, timeout=1800)
    if run.returncode != 0:
        raise cli.UsageError(f"docker/local_images.sh failed: {run.stderr.strip().splitlines()[-1]}")
    line = next(line for line in run.stdout.splitlines() if line.startswith("export "))
    return dict(pair.split("=", 1) for pair in line.split()[1:] if pair.startswith("GPT_"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Stack:
    """One compose project (its own name and host port) over docker/, driven through the compose CLI."""

    def __init__(self, models_dir: Path, data_dir: Path, model_path: str, images: dict[str, str]):
        self.port = free_port()
        self.project = f"gpt-bench-{os.getpid()}-{self.port}"
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **images, "DOCKER_BUILDKIT": "1", "GPT_IMAGE_TAG": "bench",
                    "GPT_PUBLISH_PORT": str(self.port), "GPT_MODELS_DIR": str(models_dir),
                    "GPT_DATA_DIR": str(data_dir), "GPT_MODEL_PATH": model_path, "GPT_NUM_THREADS": "1"}

    def compose(self, files: list[str], *args: str, timeout: float = 600, env: dict | None = None,
                check: bool = True) -> subprocess.CompletedProcess:
        command = compose_command() + ["-p", self.project] + [a for f in files for a in ("-f", str(DOCKER / f))]
        run = subprocess.run(command + list(args), capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                             env={**self.env, **(env or {})})
        if check and run.returncode != 0:
            raise DockerFlowError(f"docker compose {' '.join(args)} failed: {one_line(run.stderr)}")
        return run

    def containers(self, service: str = "gpt") -> list[str]:
        return self.compose(REPLICAS, "ps", "-aq", service).stdout.split()

    def down(self) -> None:
        self.compose(REPLICAS, "down", "--remove-orphans", "--timeout", "5", check=False)


def inspect(container: str, template: str) -> str:
    return subprocess.run(["docker", "inspect", "-f", template, container], capture_output=True, text=True,
                          check=True).stdout.strip()


def build(stack: Stack, cold: bool) -> dict:
    """Seconds to build (after a --no-cache build when cold) and the image's size."""
    figures = {}
    if cold:
        started = time.perf_counter()
        stack.compose(CPU, "build", "--no-cache", timeout=1800)
        figures["build_cold_s"] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    stack.compose(CPU, "build", timeout=1800)
    figures["build_s"] = round(time.perf_counter() - started, 1)
    figures["image_mb"] = round(int(inspect("gpt-inference:bench", "{{.Size}}")) / 1e6)
    return figures


def health_statuses(url: str, timeout: float) -> tuple[list[str], float]:
    """Poll /health until 200: the distinct answers seen on the way ("refused", "503", ...) and seconds taken."""
    started, seen = time.perf_counter(), []
    while time.perf_counter() - started < timeout:
        try:
            answer = str(httpx.get(url + "/health", timeout=2).status_code)
        except httpx.TransportError:
            answer = "refused"
        if not seen or seen[-1] != answer:
            seen.append(answer)
        if answer == "200":
            return seen, round(time.perf_counter() - started, 2)
        time.sleep(0.02)
    raise DockerFlowError(f"/health did not answer 200 within {timeout:.0f} s (seen: {seen})")


def wait_healthy(container: str, timeout: float) -> None:
    deadline = time.perf_counter() + timeout
    while inspect(container, "{{.State.Health.Status}}") != "healthy":
        if time.perf_counter() > deadline:
            raise DockerFlowError(f"{container} was not healthy within {timeout:.0f} s")
        time.sleep(0.2)


def serve(stack: Stack) -> dict:
    """`up -d` on the CPU: /health's answers until ready, the healthcheck, two requests, the server's user."""
    started = time.perf_counter()
    stack.compose(CPU, "up", "-d")
    seen, _ = health_statuses(stack.url, timeout=180)
    ready_s = round(time.perf_counter() - started, 2)  # from `up`: container start, imports, model load
    (container,) = stack.containers()
    wait_healthy(container, timeout=180)
    healthy_s = round(time.perf_counter() - started, 2)
    generate = httpx.post(stack.url + "/generate", json={"prefix": "ROMEO:", "max_gen_len": 8}, timeout=60)
    chat = httpx.post(stack.url + "/v1/chat/completions", timeout=60,
                      json={"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8})
    top = subprocess.run(["docker", "top", container, "-o", "pid,user,args"], capture_output=True, text=True).stdout
    server_user = next(line.split()[1] for line in top.splitlines() if "inference.api_service" in line)
    return {"health_seen": seen, "ready_s": ready_s, "healthy_s": healthy_s, "generate_status": generate.status_code,
            "chat_status": chat.status_code, "chat_text": chat.json()["choices"][0]["message"]["content"],
            "server_user": server_user, "container": container}


def stream_through_stop(stack: Stack, container: str) -> dict:
    """A streamed completion in flight when `docker stop` is sent: what it received after the stop, and the exit."""
    context = httpx.get(stack.url + "/v1/models", timeout=10).json()["data"][0]["context_length"]
    body = {"prompt": "A", "max_tokens": min(400, context - 8), "stream": True, "temperature": 0}
    events: list[tuple[float, str]] = []
    first = threading.Event()

    def read() -> None:
        with httpx.stream("POST", stack.url + "/v1/completions", json=body, timeout=120) as reply:
            for line in reply.iter_lines():
                if line.startswith("data: "):
                    events.append((time.perf_counter(), line[len("data: "):]))
                    first.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    if not first.wait(60):
        raise DockerFlowError("the streamed request got no event within 60 s")
    stop_sent = time.perf_counter()
    stop = subprocess.run(["docker", "stop", "-t", "40", container], capture_output=True, text=True, timeout=120)
    stopped_s = round(time.perf_counter() - stop_sent, 2)
    reader.join(60)
    final = json.loads(events[-2][1]) if len(events) >= 2 else {}
    exit_code = int(inspect(container, "{{.State.ExitCode}}"))
    return {"stop_rc": stop.returncode, "stop_s": stopped_s, "exit_code": exit_code,
            "events_after_stop": sum(1 for t, _ in events if t > stop_sent), "last_event": events[-1][1],
            "finish_reason": final.get("choices", [{}])[0].get("finish_reason")}


def replicas(stack: Stack, requests: int) -> dict:
    """Two replicas behind nginx: how many of `requests` each one logged."""
    stack.compose(REPLICAS, "up", "-d", "--scale", "gpt=2", "--wait", timeout=300)
    body = {"prefix": "ROMEO:", "max_gen_len": 4}
    statuses = [httpx.post(stack.url + "/generate", json=body, timeout=60).status_code for _ in range(requests)]
    split = []
    for container in stack.containers():
        logs = subprocess.run(["docker", "logs", container], capture_output=True, text=True).stdout
        split.append(logs.count('"POST /generate HTTP/1.1" 200'))
    stack.compose(REPLICAS, "down", "--timeout", "5")
    return {"replica_statuses": sorted(set(statuses)), "replica_split": sorted(split)}


def train(stack: Stack, models_dir: Path, data_dir: Path) -> dict:
    """`compose run --rm gpt python pretrain_trainer.py` as a non-root user who owns the bind mounts."""
    for folder in (models_dir, data_dir):
        subprocess.run(["chown", "-R", f"{TRAIN_UID}:{TRAIN_UID}", str(folder)], check=True)
    run = stack.compose(CPU, "run", "--rm", "gpt", "python", "pretrain_trainer.py", "--max_steps", "10",
                        "--eval_interval", "10", "--samples", "0", "--output_dir", "models/docker_pretrain",
                        env={"GPT_UID": str(TRAIN_UID), "GPT_GID": str(TRAIN_UID)}, timeout=600, check=False)
    best = models_dir / "docker_pretrain" / "pretrain_best.pth"
    return {"train_rc": run.returncode, "train_error": one_line(run.stderr, 300) if run.returncode else "",
            "train_best_owner": best.stat().st_uid if best.exists() else None}


def prepare_mounts(work: Path, model_path: Path) -> tuple[Path, Path, str]:
    """models/ and data/ for the containers: copies, readable by any uid (pytest's temp folders are 0700)."""
    models, data = work / "models", work / "data"
    shutil.copytree(model_path.parent, models / "served", ignore=shutil.ignore_patterns("*_step_*.pth"))
    shutil.copytree(ROOT / "data", data, ignore=shutil.ignore_patterns(".cache", "*.bin", "__pycache__"))
    for path in [work, *work.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return models, data, f"models/served/{model_path.name}"


def measure(model_path: Path, cold: bool = False, requests: int = 20) -> dict:
    """The whole flow in a temporary folder; the compose project is taken down whatever happens."""
    if not model_path.is_file():
        raise cli.UsageError(f"--model_path {model_path}: no such checkpoint (train one first: python "
                             "pretrain_trainer.py, then python finetune.py --mode sft)")
    images = image_variables()
    with tempfile.TemporaryDirectory(prefix="bench-docker-") as tmp:
        models, data, served = prepare_mounts(Path(tmp), model_path)
        stack = Stack(models, data, served, images)
        try:
            figures = {"images": images, **build(stack, cold)}
            figures.update(serve(stack))
            figures.update(stream_through_stop(stack, figures.pop("container")))
            stack.down()
            figures.update(replicas(stack, requests))
            figures.update(train(stack, models, data))
        finally:
            stack.down()
            subprocess.run(["chown", "-R", f"{os.getuid()}:{os.getgid()}", tmp], check=False)
    return figures


def build_parser() -> cli.ArgumentParser:
    parser = benchmark_parser("benchmarks.bench_docker", __doc__)
    parser.add_argument("--model_path", type=Path, default=ROOT / "models" / "sft" / "sft_best.pth",
                        help="checkpoint to serve (with its tokenizer/ folder beside it)")
    parser.add_argument("--cold", action="store_true", help="also time a build without the layer cache")
    parser.add_argument("--requests", type=cli.positive_int, default=20, help="requests sent to the two replicas")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The benchmark; a bad flag or a missing engine gives one `error:` line and exit 2 (cli.run_cli)."""
    return cli.run_cli(_main, argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    problem = engine_problem()
    if problem:
        raise cli.UsageError(problem)
    started = time.perf_counter()
    figures = measure(args.model_path, args.cold, args.requests)
    figures["bench_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
