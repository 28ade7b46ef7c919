"""The shared model cache on a real S3 API: attempts and jobs fetch a base model once.

Object GETs are counted by SeaweedFS itself (its Prometheus counter
``SeaweedFS_s3_request_total{type="GET"}``, which also counts HEADs), per bucket: the
model's bucket holds nothing else, so every GET there is a model download.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from trainer_helpers import run_trainer_process, tiny_config, wait_for

from kubetune_trainer.config import MODEL_CACHE_ENV, TrainerConfig
from kubetune_trainer.errors import ExitCode
from kubetune_trainer.main import execute
from kubetune_trainer.model_cache import PARTIAL, ModelCache, S3Source
from kubetune_trainer.storage import open_store

pytestmark = pytest.mark.integration


@pytest.fixture
def s3_model(seaweedfs, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The tiny model in a bucket of its own; the URI of its folder."""
    for name, value in (
        ("AWS_ACCESS_KEY_ID", seaweedfs.access_key),
        ("AWS_SECRET_ACCESS_KEY", seaweedfs.secret_key),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ):
        monkeypatch.setenv(name, value)
    bucket = seaweedfs.create_bucket()
    open_store(f"s3://{bucket}", endpoint_url=seaweedfs.endpoint_url).upload_dir(
        tiny_model, "models/tiny"
    )
    return f"s3://{bucket}/models/tiny"


def _gets(seaweedfs, uri: str) -> int:
    return seaweedfs.request_counts(uri.split("/")[2]).get("GET", 0)


def _tree(directory: Path) -> dict[str, bytes]:
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in directory.rglob("*")
        if p.is_file()
    }


def test_two_attempts_and_two_jobs_fetch_the_model_once(
    seaweedfs, s3_model: str, tiny_dataset: Path, tmp_path: Path, monkeypatch
) -> None:
    cache = tmp_path / "model-cache"  # the RWX volume every attempt pod mounts
    monkeypatch.setenv(MODEL_CACHE_ENV, str(cache))

    def job(name: str, steps: int, **training) -> TrainerConfig:
        config = tiny_config(
            tmp_path / "unused",
            tiny_dataset,
            str(tmp_path / name / "out"),
            model={"source": s3_model},
            output={"endpoint_url": seaweedfs.endpoint_url},
            training={"max_steps": steps, **training},
        )
        return config.model_copy(update={"job_name": name, "job_uid": f"uid-{name}"})

    # What one download of the model costs the server, without any cache.
    before = _gets(seaweedfs, s3_model)
    S3Source(s3_model, endpoint_url=seaweedfs.endpoint_url).store.download_prefix(
        "", tmp_path / "one-download"
    )
    one_download = _gets(seaweedfs, s3_model) - before
    assert one_download >= len(_tree(tmp_path / "one-download")) > 0

    # Job A, attempt 1: killed (the node was lost) after its first checkpoint.
    first = job("job-a", 8, checkpoint_every_steps=2)
    markers = tmp_path / "job-a" / "out" / "checkpoints"
    before = _gets(seaweedfs, s3_model)
    process = run_trainer_process(first)
    try:
        wait_for(lambda: list(markers.glob("step-*/COMPLETE")), 180, "a checkpoint")
        process.kill()
    finally:
        process.wait(30)
    assert _gets(seaweedfs, s3_model) - before == one_download  # the miss: one download

    # Job A, attempt 2 resumes; job B, a new job on the same model, starts.
    assert execute(first) == ExitCode.OK
    assert execute(job("job-b", 2)) == ExitCode.OK
    assert _gets(seaweedfs, s3_model) - before == one_download, "fetched more than once"

    for name in ("job-a", "job-b"):
        manifest = json.loads((tmp_path / name / "out" / "adapter" / "manifest.json").read_text())
        report = manifest["model_cache"]
        assert report["hit"] is True and report["source"] == s3_model
        assert report["savedSeconds"] > 0 and report["bytes"] > 0
        assert Path(report["path"]).is_relative_to(cache)
    resumed = json.loads((tmp_path / "job-a" / "out" / "adapter" / "manifest.json").read_text())
    assert resumed["resumed_from_step"] >= 2  # it was a second attempt of the same run


_SLOW_DOWNLOADER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from kubetune_trainer import storage
    from kubetune_trainer.model_cache import ModelCache, S3Source

    download = storage.S3Store.download_file

    def slow(self, key, local):  # the first file arrives, then the downloader stalls
        download(self, key, local)
        time.sleep(120)

    storage.S3Store.download_file = slow
    root, uri, endpoint = sys.argv[1:]
    ModelCache(Path(root)).fetch(S3Source(uri, endpoint_url=endpoint))
    """
)


def test_a_downloader_killed_mid_download_leaves_no_usable_copy(
    seaweedfs, s3_model: str, tiny_model: Path, tmp_path: Path
) -> None:
    root = tmp_path / "model-cache"
    cache = ModelCache(root)
    entry = cache.entry(s3_model, None)
    child = subprocess.Popen(
        [sys.executable, "-c", _SLOW_DOWNLOADER, str(root), s3_model, seaweedfs.endpoint_url],
        env=os.environ,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(
            lambda: (
                child.poll() is not None
                or [p for p in entry.glob(f"{PARTIAL}*/model/*") if p.is_file()]
            ),
            60,
            "the first downloaded file",
        )
        assert child.poll() is None, child.stderr.read() if child.stderr else ""
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait(10)
    assert not [p for p in entry.iterdir() if not p.name.startswith(".")], "a usable copy"
    assert list(entry.glob(f"{PARTIAL}*")), "the killed download's leftovers"

    result = cache.fetch(S3Source(s3_model, endpoint_url=seaweedfs.endpoint_url))
    assert not result.hit
    assert _tree(result.path) == _tree(tiny_model)
    assert not list(entry.glob(f"{PARTIAL}*"))
    assert cache.fetch(S3Source(s3_model, endpoint_url=seaweedfs.endpoint_url)).hit


def test_a_missing_model_is_model_invalid_with_the_cache_too(
    seaweedfs, s3_model: str, tmp_path: Path
) -> None:
    from kubetune_trainer.config import ModelConfig
    from kubetune_trainer.errors import ModelInvalid
    from kubetune_trainer.modeling import resolve_model

    missing = s3_model.replace("/models/tiny", "/models/nothing-here")
    cache = ModelCache(tmp_path / "model-cache")
    with pytest.raises(ModelInvalid, match=r"spec\.model\.source: .*does not exist"):
        resolve_model(
            ModelConfig(source=missing),
            tmp_path / "scratch",
            endpoint_url=seaweedfs.endpoint_url,
            model_cache=cache,
        )
    assert not cache.entry(missing, None).exists()  # nothing left behind for a typo
