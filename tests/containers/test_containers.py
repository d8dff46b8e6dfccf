"""Every stage in its own container, through Prefect, on podman.

The images are built with podman from a debootstrapped Debian (containers/build.sh). `podman system service`
gives a Docker-compatible socket; a Prefect server, two Prefect Docker workers (pools loraforge-cpu and
loraforge-gpu) on that socket, and the stage deployments of infra/prefect.yaml on those images run the small
demo pipeline (tiny model) with `orchestration.stages=deployments`: each stage is a flow run in a container of its
own image. Its artifacts must have the same keys and the same bytes as an in-process run of the same config.

The containers share no volume: the artifacts are in an S3-compatible server (`rclone serve s3`), the base model
and the dataset come from the project's Hub server (both on 127.0.0.1, reached through the host network), and
each stage flow reports its key through the store.

Slow (image builds; ~20 s of container start per stage): `make test-containers` or `pytest -m containers`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hub import hub_server, s3_server, stop
from images import built_tag

pytestmark = pytest.mark.containers

ROOT = Path(__file__).resolve().parents[2]
PODMAN = [str(ROOT / "containers" / "podman.sh")]
STAGES = ("base", "data", "train", "eval", "merge", "quantize", "publish")
MODEL_REPO, DATA_REPO = "loraforge/tiny-llama", "loraforge/tickets"
CONTAINED_STORE = "s3://loraforge/containers"
TOKEN = "hf_containers_test_token"
# The demo config made as small as the deployments test's (every stage runs for real on the tiny model, 2 training
# steps), with the adapter GGUF kept: quantize's adapter conversion reads the train and base artifacts from the
# bucket too. No push.
SMALL = [
    "name=tiny-router", "eval.gate=[loss_delta < 0]", "eval.max_rows=4", "data.max_rows=32", "train.max_steps=2",
    "quantize.types=[q8_0,lora_f16]", "quantize.probe_rows=1", "quantize.fidelity_rows=1", "merge.probe_rows=1",
    "publish.include_gguf=[q8_0]", "publish.push=never",
]  # fmt: skip
# Files that hold measurements of the run itself (wall time, tokens/s, memory) or the versions of the libraries
# installed where it ran: compared with those fields left out. Every other file must be byte-identical.
MEASURED_FILES = {("train", "history.jsonl"), ("publish", "bundle/loraforge/lineage.json")}
MEASURED_FIELDS = {"tokens_per_s", "rss_mb", "peak_rss_mb", "train_seconds", "seconds", "cuda_peak_mb", "versions"}


def _timed(label: str, timings: dict[str, float], cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
    started = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    timings[label] = round(time.perf_counter() - started, 1)
    assert result.returncode == 0, f"{' '.join(cmd[:4])} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def timings() -> Iterator[dict[str, float]]:
    """Wall times of the phases, printed at the end (pytest -s shows them; they are also in timings.json)."""
    figures: dict[str, float] = {}
    yield figures
    print("\ncontainers test timings (s): " + json.dumps(figures))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This side's folder: the in-process store, logs, the podman socket. No container mounts it."""
    return tmp_path_factory.mktemp("containers")


def _small() -> list[str]:
    """The overrides that make the demo small, with the model and the dataset from the Hub server."""
    data = [f"data.{split}_file=hub:{DATA_REPO}#{split}" for split in ("train", "validation", "test")]
    return [f"base_model={MODEL_REPO}", *data, *SMALL]


@pytest.fixture(scope="module")
def built(timings: dict[str, float]) -> tuple[str, str]:
    """Build (or find up to date) every image; returns the tag they carry (HEAD's sha) and their revision label
    (the last commit that changed what they are built from)."""
    result = _timed("images", timings, ["bash", str(ROOT / "containers" / "build.sh")], cwd=ROOT)
    return built_tag(result.stdout)


@pytest.fixture(scope="module")
def image_tag(built: tuple[str, str]) -> str:
    return built[0]


@pytest.fixture(scope="module")
def source(image_tag: str, workdir: Path) -> Path:
    """The code the images carry (flows/, tasks/, configs): the in-process runs use it too, so that both sides run
    the same code even when the working tree changes after the build (stage keys hash their source files)."""
    target = workdir / "src"
    target.mkdir()
    image = f"localhost/loraforge-publish:{image_tag}"
    folders = ["loraforge", "flows", "tasks"]  # the package and the folders its links point to
    tar = subprocess.run([*PODMAN, "run", "--rm", image, "tar", "-C", "/opt/loraforge", "-cf", "-", *folders],
                         capture_output=True, check=True)  # fmt: skip
    subprocess.run(["tar", "-xf", "-", "-C", str(target)], input=tar.stdout, check=True)
    return target


@pytest.fixture(scope="module")
def hub(workdir: Path) -> Iterator[str]:
    """The project's Hub server with the tiny model and the demo dataset (its three splits) pushed to it: where
    every stage container gets its inputs, as workers would from huggingface.co."""
    from huggingface_hub import HfApi
    from tiny import build_tiny_model

    model = build_tiny_model(workdir / "tiny-llama")
    dataset = workdir / "tickets"
    for split in ("train", "validation", "test"):
        target = dataset / "data" / f"{split}-00000-of-00001.jsonl"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / "flows" / "data" / "tickets" / f"{split}.jsonl", target)
    with hub_server(workdir / "hub" / "repos", TOKEN) as url:
        api = HfApi(endpoint=url, token=TOKEN)
        api.create_repo(MODEL_REPO)
        api.upload_folder(repo_id=MODEL_REPO, folder_path=model)
        api.create_repo(DATA_REPO, repo_type="dataset")
        api.upload_folder(repo_id=DATA_REPO, repo_type="dataset", folder_path=dataset)
        yield url


@pytest.fixture(scope="module")
def s3(workdir: Path) -> Iterator[dict[str, str]]:
    """The S3-compatible server holding the containers' store."""
    with s3_server(workdir / "s3" / "buckets") as settings:
        yield settings


def _inputs_env(hub: str, s3: dict[str, str]) -> dict[str, str]:
    """What a process needs to reach the inputs (Hub) and the S3 store: the same on both sides."""
    return {"HF_ENDPOINT": hub, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1", **s3}


@pytest.fixture(scope="module")
def docker_host(workdir: Path) -> Iterator[str]:
    """`podman system service`: the Docker-compatible API the Prefect Docker worker talks to."""
    url = f"unix://{workdir / 'podman.sock'}"
    log = workdir / "podman-service.log"
    process = subprocess.Popen([*PODMAN, "system", "service", "--time=0", url], stdout=log.open("w"),
                               stderr=subprocess.STDOUT)  # fmt: skip
    import docker

    deadline = time.monotonic() + 60
    while True:
        try:
            docker.DockerClient(base_url=url).ping()
            break
        except Exception:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"podman system service did not start; see {log}") from None
            time.sleep(0.3)
    try:
        yield url
    finally:
        stop(process)


@pytest.fixture(scope="module")
def prefect_api(workdir: Path) -> Iterator[str]:
    """A Prefect server on PostgreSQL: two Docker workers poll it every second (tests/hub.py says why not SQLite)."""
    from hub import prefect_server_on_postgres

    home = workdir / "prefect-home"
    home.mkdir()
    with prefect_server_on_postgres(home) as api:
        yield api


def _for_this_machine(template: dict[str, Any], inputs_env: dict[str, str]) -> dict[str, Any]:
    """The Docker job template `make deploy` gave a pool, set for this machine: no volume at all, host networking
    (the Prefect API, the Hub and the S3 server on 127.0.0.1), their settings as environment, local images only,
    removed when done."""
    props = template["variables"]["properties"]
    props["volumes"]["default"] = []
    props["network_mode"]["default"] = "host"
    props["image_pull_policy"]["default"] = "Never"
    props["auto_remove"]["default"] = True
    props["stream_output"]["default"] = True
    props["env"]["default"] = {**inputs_env, **_pool_template_env()}
    return template


def _pool_template_env() -> dict[str, str]:
    """Thread settings every stage container runs with (one OpenMP thread each: a worker may run several)."""
    return {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def _on_the_cpu_train_image(workdir: Path) -> Path:
    """infra/prefect.yaml with the train deployment on the CPU train image instead of its CUDA build (`<tag>-cuda`):
    train keys include torch's version (2.13.0+cpu here, 2.13.0 in the CUDA image), so only the CPU image gives
    the in-process run's keys. The CUDA image is checked by test_cuda_image.py."""
    import yaml

    spec = yaml.safe_load((ROOT / "infra" / "prefect.yaml").read_text())
    (train,) = [d for d in spec["deployments"] if d["name"] == "train"]
    variables = train["work_pool"]["job_variables"]
    assert variables["image"].endswith("{{ $LORAFORGE_IMAGE_TAG }}-cuda"), variables["image"]
    variables["image"] = variables["image"].removesuffix("-cuda")
    path = workdir / "prefect-cpu-train.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def deployed(
    workdir: Path,
    image_tag: str,
    docker_host: str,
    prefect_api: str,
    hub: str,
    s3: dict[str, str],
    timings: dict[str, float],
) -> Iterator[dict[str, str]]:
    """Docker work pools, one worker each on podman's socket, and infra/prefect.yaml's deployments on the images.

    Yields the environment a client of that stack runs with.
    """
    env = {**os.environ, **_inputs_env(hub, s3), "PREFECT_API_URL": prefect_api, "DOCKER_HOST": docker_host,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "LORAFORGE_CODE_DIR": "/opt/loraforge",
           "PREFECT_WORKER_QUERY_SECONDS": "1",  # a stage's run is taken within a second (default: 10)
           "LORAFORGE_IMAGE_PREFIX": "localhost/", "LORAFORGE_IMAGE_TAG": image_tag,
           "LORAFORGE_CONFIG": "flows/configs/demo.yaml", "LORAFORGE_STORE": CONTAINED_STORE,
           "LORAFORGE_STORE_CACHE": str(workdir / "parent-copy")}  # fmt: skip
    # `make deploy` with docker pools, the nightly switched off: a run at 02:00 UTC would use this store
    deploy = {**env, "PYTHON": sys.executable, "LORAFORGE_POOL_TYPE": "docker", "LORAFORGE_NIGHTLY": "off",
              "LORAFORGE_PREFECT_FILE": str(_on_the_cpu_train_image(workdir))}  # fmt: skip
    _timed("deploy", timings, ["bash", str(ROOT / "infra" / "stack" / "deploy.sh")], cwd=ROOT, env=deploy)
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolUpdate
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_api}), get_client(sync_client=True) as client:
        for pool in ("loraforge-cpu", "loraforge-gpu"):
            created = client.read_work_pool(pool)
            # deploy.sh's docker pools start the engine itself (not the CLI that starts a supervisor that starts it)
            assert created.type == "docker", created
            assert created.base_job_template["variables"]["properties"]["command"]["default"] == (
                "python -m prefect.engine"
            )
            template = _for_this_machine(created.base_job_template, _inputs_env(hub, s3))
            client.update_work_pool(pool, WorkPoolUpdate(base_job_template=template))
    prefect = [sys.executable, "-m", "prefect"]
    with contextlib.ExitStack() as stack:
        stack.callback(_remove_flow_run_containers)  # after the workers stop (callbacks run last-in, first-out)
        workers = []
        for pool in ("loraforge-cpu", "loraforge-gpu"):
            log = stack.enter_context((workdir / f"worker-{pool}.log").open("w"))
            workers.append(subprocess.Popen([*prefect, "worker", "start", "--pool", pool, "--type", "docker"],
                                            env=env, stdout=log, stderr=subprocess.STDOUT))  # fmt: skip
        stack.callback(stop, *workers)
        yield env


def _remove_flow_run_containers() -> None:
    """Remove the flow-run containers still there: a Docker worker that stops leaves its runs' containers running,
    and none may outlive this module to take the CPU from the tests after it (Prefect labels each with its run)."""
    listed = subprocess.run([*PODMAN, "ps", "-q", "--filter", "label=io.prefect.flow-run-id"],
                            capture_output=True, text=True, check=True)  # fmt: skip
    if ids := listed.stdout.split():
        subprocess.run([*PODMAN, "rm", "--force", "--time", "5", *ids], capture_output=True, text=True, check=True)


def _run_pipeline(source: Path, store: str, env: dict[str, str], *extra: str) -> dict[str, Any]:
    from loraforge.tasks.artifacts import ArtifactStore

    cmd = [
        sys.executable,
        "-m",
        "loraforge.flows.cli",
        "run",
        "flows/configs/demo.yaml",
        *_small(),
        f"store={store}",
        *extra,
    ]
    env = {**env, "PYTHONPATH": str(source)}
    result = subprocess.run(cmd, cwd=source, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    reader = ArtifactStore(store)
    runs = reader.records("runs")
    assert len(runs) == 1, runs
    return reader.load_run("latest")


def _without(value: Any, fields: set[str]) -> Any:
    if isinstance(value, dict):
        return {k: _without(v, fields) for k, v in value.items() if k not in fields}
    if isinstance(value, list):
        return [_without(v, fields) for v in value]
    return value


def _content(path: Path) -> Any:
    """A measured file's content without its measurements (JSON or JSON lines)."""
    text = path.read_text()
    if path.suffix == ".jsonl":
        return [_without(json.loads(line), MEASURED_FIELDS) for line in text.splitlines()]
    return _without(json.loads(text), MEASURED_FIELDS)


def _compare(local: Path, contained: Path, record: dict[str, Any]) -> list[str]:
    """Every difference between the two stores' artifacts for the run's keys (empty: identical); `contained` is
    a local copy of the S3 store, filled by reading each artifact from the bucket (every file's sha256 checked)."""
    from loraforge.tasks.artifacts import ArtifactStore

    problems = []
    for stage in STAGES:
        key = record["stages"][stage]["key"]
        ArtifactStore(CONTAINED_STORE).get(stage, key)  # downloads into LORAFORGE_STORE_CACHE = contained
        a = json.loads((local / stage / key / "manifest.json").read_text())
        b = json.loads((contained / stage / key / "manifest.json").read_text())
        if a["files"].keys() != b["files"].keys():
            problems.append(f"{stage}: files {sorted(a['files'])} != {sorted(b['files'])}")
        for name in sorted(a["files"].keys() & b["files"].keys()):
            if a["files"][name]["sha256"] == b["files"][name]["sha256"]:
                continue
            if (stage, name) in MEASURED_FILES and _content(local / stage / key / name) == _content(
                contained / stage / key / name
            ):
                continue
            problems.append(f"{stage}/{key}/{name} differs")
        if _without(a["metrics"], MEASURED_FIELDS) != _without(b["metrics"], MEASURED_FIELDS):
            problems.append(f"{stage}: metrics {a['metrics']} != {b['metrics']}")
    return problems


IMAGES = ("data", "train", "eval", "merge", "quantize", "publish")
# One container per image answers every question the two image tests ask (a `podman run` is ~1-2 s each): the
# modules it can import, its user, whether that user can write the cache and the artifact mount point, the
# llama.cpp tools in its cache. Its last line is JSON.
PROBE = """
import importlib.util, json, os, subprocess
modules = [m for m in ("torch", "transformers", "llama_cpp", "peft", "bitsandbytes", "evaluate") if importlib.util.find_spec(m)]
writable = subprocess.run(["sh", "-c", "touch /cache/w /artifacts/w"], capture_output=True).returncode == 0
print(json.dumps({"modules": modules, "uid": os.getuid(), "writable": writable, "cache": sorted(os.listdir("/cache"))}))
"""  # noqa: E501


@pytest.fixture(scope="module")
def image_facts(image_tag: str) -> dict[str, dict[str, Any]]:
    """What each stage image holds and runs as, from one probe container per image (through its entrypoint)."""
    facts = {}
    for stage in IMAGES:
        image = f"localhost/loraforge-{stage}:{image_tag}"
        out = subprocess.run([*PODMAN, "run", "--rm", image, "python", "-c", PROBE], capture_output=True, text=True)
        assert out.returncode == 0, f"{stage}: {out.stdout}{out.stderr}"
        facts[stage] = json.loads(out.stdout.strip().splitlines()[-1])
    return facts


def test_images_carry_only_what_their_stage_needs(image_tag: str, image_facts: dict[str, dict[str, Any]]) -> None:
    """No torch in the publish and data images; the quantize image has the pinned converter and llama-cpp-python;
    every image answers `loraforge --help` through its entrypoint."""
    found = {stage: set(facts["modules"]) for stage, facts in image_facts.items()}
    assert found["publish"] == set(), found
    assert found["data"] == {"transformers"}, found
    assert {"torch", "peft", "bitsandbytes"} <= found["train"] and "llama_cpp" not in found["train"], found
    assert {"torch", "llama_cpp", "transformers", "evaluate"} <= found["quantize"], found  # evaluate: the probe
    assert "peft" not in found["quantize"], found
    assert "evaluate" in found["eval"], found
    assert "llama.cpp-0.3.36" in image_facts["quantize"]["cache"], image_facts["quantize"]
    out = subprocess.run([*PODMAN, "run", "--rm", f"localhost/loraforge-publish:{image_tag}", "--help"],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0 and "--input STAGE=KEY" in out.stdout, out.stdout + out.stderr


# What the images are built from (containers/build.sh): the revision label is the last commit that changed these.
PACKAGED = ("loraforge", "flows", "tasks", "pyproject.toml", "constraints.txt", "constraints-cuda.txt", "README.md",
            "LICENSE", "containers/*.Containerfile", "containers/entrypoint.sh", "containers/build.sh")  # fmt: skip


def test_images_run_as_a_non_root_user_and_carry_oci_labels(
    built: tuple[str, str], image_facts: dict[str, dict[str, Any]]
) -> None:
    """Every stage image runs as uid 10001 (not root), which owns the cache and the artifact mount point, and
    carries the OCI labels (source, version and licenses from pyproject.toml, revision, title). The tag is HEAD's
    sha; the revision is a commit whose packaged files are HEAD's (HEAD, or the commit before a run of commits that
    changed only docs or tests: their images are that commit's, tagged again)."""
    import tomllib

    image_tag, revision = built
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    assert image_tag.removesuffix("-dirty") == head.stdout.strip()
    same = subprocess.run(["git", "diff", "--quiet", revision.removesuffix("-dirty"), "HEAD", "--", *PACKAGED],
                          cwd=ROOT)  # fmt: skip
    assert same.returncode == 0, f"{revision}: the packaged files changed since"
    assert revision.endswith("-dirty") == image_tag.endswith("-dirty")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for stage in IMAGES:
        assert (image_facts[stage]["uid"], image_facts[stage]["writable"]) == (10001, True), (stage, image_facts)
    inspect = subprocess.run([*PODMAN, "image", "inspect", "--format", "{{ json .Labels }}",
                              *(f"localhost/loraforge-{stage}:{image_tag}" for stage in IMAGES)],
                             capture_output=True, text=True, check=True)  # fmt: skip
    for stage, line in zip(IMAGES, inspect.stdout.strip().splitlines(), strict=True):
        labels = json.loads(line)
        assert labels["org.opencontainers.image.version"] == project["version"], (stage, labels)
        assert labels["org.opencontainers.image.licenses"] == project["license"], (stage, labels)
        assert labels["org.opencontainers.image.title"] == f"loraforge-{stage}", (stage, labels)
        assert labels["org.opencontainers.image.source"], (stage, labels)
        assert labels["org.opencontainers.image.revision"] == revision, (stage, labels)


def test_every_stage_in_its_own_container_gives_the_in_process_artifacts(
    deployed: dict[str, str], source: Path, workdir: Path, timings: dict[str, float], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The in-process run reports to the same Prefect server (no temporary server of its own): its flow runs are of
    # no deployment, and the check below reads the deployments' runs only.
    local_env = {k: v for k, v in deployed.items() if k != "DOCKER_HOST"}
    local_env["PREFECT_HOME"] = str(workdir / "prefect-local")
    # The containers' thread settings (the pool template's env): CPU kernels reduce in a thread-count-dependent
    # order, so byte-equal adapters need the same count on both sides.
    local_env.update(_pool_template_env())
    started = time.perf_counter()
    local = _run_pipeline(source, str(workdir / "store-local"), local_env)
    timings["pipeline in-process"] = round(time.perf_counter() - started, 1)

    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"):
        monkeypatch.setenv(name, deployed[name])  # this process reads the containers' store too
    monkeypatch.setenv("LORAFORGE_STORE_CACHE", str(workdir / "store-containers"))
    started = time.perf_counter()
    contained = _run_pipeline(source, CONTAINED_STORE, deployed, "orchestration.stages=deployments")
    timings["pipeline in containers"] = round(time.perf_counter() - started, 1)
    (workdir / "timings.json").write_text(json.dumps(timings))

    assert {s: i["key"] for s, i in contained["stages"].items()} == {s: i["key"] for s, i in local["stages"].items()}
    assert not any(info["cached"] for info in contained["stages"].values()), contained["stages"]
    # Each stage ran as a flow run of its own deployment, in a container of its stage's image.
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: deployed["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
        deployments = {d.id: d for d in client.read_deployments()}
        ran = {}
        for run in client.read_flow_runs():
            if run.deployment_id in deployments and run.state_name == "Completed":
                ran[deployments[run.deployment_id].name] = deployments[run.deployment_id].job_variables["image"]
    assert {s: ran.get(s, "") for s in STAGES} == {
        s: f"localhost/loraforge-{'data' if s == 'base' else s}:{deployed['LORAFORGE_IMAGE_TAG']}" for s in STAGES
    }
    assert _compare(workdir / "store-local", workdir / "store-containers", local) == []


def test_stage_entrypoint_on_given_keys(
    deployed: dict[str, str], image_tag: str, workdir: Path, timings: dict[str, float]
) -> None:
    """`podman run loraforge-publish CONFIG --input ...` (no Prefect) rebuilds the publish artifact of the
    in-process run byte for byte from its upstream keys."""
    local = workdir / "store-local"
    if not (local / "runs").is_dir():
        pytest.skip("needs the in-process run of the pipeline test")
    record = json.loads(next((local / "runs").glob("*.json")).read_text())
    copy = workdir / "store-entrypoint"
    shutil.copytree(local, copy, ignore=shutil.ignore_patterns("publish", "runs"))
    inputs = [f"--input={s}={record['stages'][s]['key']}" for s in STAGES[:-1]]
    # The Hub the in-process run named (publish.endpoint defaults to HF_ENDPOINT; it is in the key), not reached.
    # A host folder is written as the host user (--user), as containers/README.md says: the image's own user is
    # uid 10001, which cannot write a folder it does not own.
    cmd = [*PODMAN, "run", "--rm", "--network=none", "-v", f"{workdir}:{workdir}",
           "--user", f"{os.getuid()}:{os.getgid()}", "-e", f"HF_ENDPOINT={deployed['HF_ENDPOINT']}",
           f"localhost/loraforge-publish:{image_tag}", "flows/configs/demo.yaml", *_small(),
           "--store", str(copy), *inputs, "--output", str(workdir / "publish.json")]  # fmt: skip
    result = _timed("publish entrypoint", timings, cmd)
    produced = json.loads((workdir / "publish.json").read_text())
    assert produced["key"] == record["stages"]["publish"]["key"] and not produced["cached"], result.stdout
    assert json.loads(result.stdout.strip().splitlines()[-1]) == produced
    a = json.loads((local / "publish" / produced["key"] / "manifest.json").read_text())["files"]
    b = json.loads((copy / "publish" / produced["key"] / "manifest.json").read_text())["files"]
    assert a == b
