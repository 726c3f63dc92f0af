"""Deployment files agree with each other: Space front matter, Dockerfile, Makefile, README, systemd unit, env file."""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from core.config import PAGE_KEYS, Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DEPLOY_DOC = (ROOT / "docs" / "DEPLOY.md").read_text()
UNIT = (ROOT / "deploy" / "model-dashboard.service").read_text()
ENV_EXAMPLE = ROOT / "deploy" / "env.example"
XSRF_VAR = "STREAMLIT_SERVER_ENABLE_XSRF_PROTECTION"
IMAGE_TAG = "model-dashboard:test"


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) for each instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in (ROOT / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip()) for line in text.splitlines() if line.strip()]


def instruction(name: str) -> list[str]:
    return [args for kind, args in dockerfile() if kind == name]


def docker_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for args in instruction("ENV"):
        env.update(pair.split("=", 1) for pair in shlex.split(args))
    return env


def front_matter() -> dict:
    from huggingface_hub import metadata_load  # how the Hub itself reads a README's YAML block

    return metadata_load(ROOT / "README.md") or {}


def readme_start_command() -> list[str]:
    match = re.search(r"`(streamlit run Home\.py[^`]*)`", README)
    assert match, "README names the command the image runs"
    return shlex.split(match.group(1))


def makefile_run_command() -> list[str]:
    recipe = re.search(r"^run:.*\n\t(.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert recipe
    return shlex.split(recipe.group(1).replace("$(BIN)/", ""))


def test_front_matter_describes_a_streamlit_docker_space():
    meta = front_matter()
    assert meta["sdk"] == "docker"
    assert meta["app_port"] == 8501
    assert "streamlit" in meta["tags"]
    assert meta["title"] and meta["emoji"]
    assert 0 < len(meta["short_description"]) <= 60  # the Hub's limit
    assert meta["suggested_hardware"] in {"t4-small", "t4-medium", "l4x1", "a10g-small", "a10g-large", "a100-large"}
    assert README.startswith("---\n")  # the Hub reads the block only at the very top


def test_one_port_everywhere():
    port = front_matter()["app_port"]
    with (ROOT / ".streamlit" / "config.toml").open("rb") as handle:
        assert tomllib.load(handle)["server"]["port"] == port
    assert instruction("EXPOSE") == [str(port)]
    cmd = json.loads(instruction("CMD")[-1])
    assert cmd[cmd.index("--server.port") + 1] == str(port)
    assert cmd[cmd.index("--server.address") + 1] == "0.0.0.0"  # reachable from outside the container


def test_image_starts_the_app_as_the_readme_and_make_run_do():
    cmd = json.loads(instruction("CMD")[-1])  # exec form: signals reach streamlit, no shell in between
    assert readme_start_command() == makefile_run_command() == ["streamlit", "run", "Home.py", "--server.port", "8501"]
    assert cmd[: len(readme_start_command())] == readme_start_command()
    assert "--server.address 0.0.0.0" in README


def test_the_entry_point_writes_a_spaces_login_then_execs_the_command():
    entry = json.loads(instruction("ENTRYPOINT")[-1])  # exec form, ending in "--": CMD's words become the command
    assert entry[:3] == ["python", "-m", "core.access"] and entry[-1] == "--"
    assert entry[3].endswith("/.streamlit/secrets.toml")  # a file Streamlit reads its secrets from by default


def test_image_runs_as_a_non_root_user_with_the_cache_in_a_writable_volume():
    kinds = [kind for kind, _ in dockerfile()]
    user = instruction("USER")[-1]
    assert user not in {"root", "0"} and kinds.index("USER") < kinds.index("CMD")
    assert any("useradd" in run and "--uid 1000" in run for run in instruction("RUN"))  # the uid Spaces run as
    assert any("/data" in volume for volume in instruction("VOLUME"))
    assert any(re.search(rf"chown {user}(:{user})? /data", run) for run in instruction("RUN"))
    env = docker_env()
    for variable in ("HF_HOME", "TORCH_HOME", "DASH_STANDIN_DIR", "DASH_COMPILE_CACHE"):
        assert env[variable].startswith("/data/"), variable


def test_xsrf_is_off_only_in_the_image_for_the_space():
    with (ROOT / ".streamlit" / "config.toml").open("rb") as handle:
        assert tomllib.load(handle)["server"]["enableXsrfProtection"] is True
    assert docker_env()[XSRF_VAR] == "false"
    others = [UNIT, ENV_EXAMPLE.read_text(), (ROOT / "Makefile").read_text()]
    assert not any(re.search(r"xsrf\S*\s*[=\s]\s*false", text, re.I) for text in others)
    docker_run = re.search(r"docker run -d .*?model-dashboard\n", DEPLOY_DOC, re.S)
    assert docker_run and f"-e {XSRF_VAR}=true" in docker_run.group(0)  # a team server turns it back on
    assert "--gpus all" in docker_run.group(0) and ":/data" in docker_run.group(0) and "--env-file" in docker_run.group(0)


def test_secrets_and_local_state_stay_out_of_the_image():
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    for path in (".streamlit/secrets.toml", ".venv", ".git", "artifacts"):
        assert path in ignored, path
    assert not any("HF_TOKEN" in args for args in instruction("ENV") + instruction("ARG"))


def test_systemd_unit_checks_settings_then_starts_as_the_readme_does():
    lines = dict(line.split("=", 1) for line in UNIT.splitlines() if "=" in line and not line.startswith("#"))
    assert lines["User"] not in {"root", "0"}
    assert lines["EnvironmentFile"] == "/etc/model-dashboard/env"
    assert lines["ExecStartPre"].endswith("python -m core.config")
    start = shlex.split(lines["ExecStart"])
    assert [Path(start[0]).name, *start[1:5]] == readme_start_command()


def _env_file() -> dict[str, str]:
    lines = [line for line in ENV_EXAMPLE.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return dict(line.split("=", 1) for line in lines)


def test_env_example_is_valid_and_documented(tmp_path: Path):
    values = _env_file()
    Settings.from_env(values, secrets_file=tmp_path / "missing.toml")  # the example passes the start-up check
    for variable in values:
        assert f"`{variable}`" in README, f"{variable} is missing from the README's Configuration table"


def test_every_setting_the_app_reads_is_documented():
    source = (ROOT / "core" / "config.py").read_text()
    for variable in set(re.findall(r'"(DASH_[A-Z_]+)"', source)):
        variable = "DASH_MODEL_<KEY>" if variable == "DASH_MODEL_" else variable  # the prefix of one per model
        assert f"`{variable}`" in README, variable


def test_readme_keeps_the_two_commands_and_links_a_screenshot_per_page():
    assert "## Two commands\n\n```bash\nmake run    #" in README and "\nmake test   #" in README
    for page in ("home", *PAGE_KEYS):
        assert f"(docs/screenshots/{page}.png)" in README, page


def _why_no_build() -> str | None:
    """None when `docker build` can run here; otherwise the reason, for the skip message."""
    if shutil.which("docker") is None:
        return "no docker client on PATH"
    info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True, timeout=30)
    if info.returncode != 0 or not info.stdout.strip():
        detail = (info.stderr or info.stdout).strip().splitlines()
        return f"no Docker engine: {detail[0] if detail else 'docker info failed'}"
    base = instruction("FROM")[0].split()[0]
    if subprocess.run(["docker", "image", "inspect", base], capture_output=True, timeout=30).returncode != 0:
        return f"base image {base} is not available locally (docker pull {base} first)"
    return None


def test_image_builds_and_starts_as_a_non_root_user():
    reason = _why_no_build()
    if reason:
        pytest.skip(reason)  # the summary prints it (-ra in pyproject's addopts)
    subprocess.run(["docker", "build", "-t", IMAGE_TAG, str(ROOT)], check=True, timeout=3600)
    uid = subprocess.run(["docker", "run", "--rm", IMAGE_TAG, "id", "-u"], capture_output=True, text=True, check=True, timeout=120)
    assert uid.stdout.strip() == "1000"
    check = subprocess.run(["docker", "run", "--rm", IMAGE_TAG, "python", "-m", "core.config"], capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stderr


def test_no_exception_text_or_traceback_reaches_a_page():
    import tomllib

    with (ROOT / ".streamlit" / "config.toml").open("rb") as handle:
        assert tomllib.load(handle)["client"]["showErrorDetails"] == "none"
