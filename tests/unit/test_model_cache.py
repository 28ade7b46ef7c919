"""The shared model cache: keys, the fill lock, atomic fills, partial and damaged copies."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cache_fakes import DirSource

from kubetune_trainer.config import MODEL_CACHE_ENV
from kubetune_trainer.errors import StorageUnavailable
from kubetune_trainer.model_cache import LOCK, MANIFEST, PARTIAL, ModelCache

pytestmark = pytest.mark.unit

FAKES = Path(__file__).with_name("cache_fakes.py")


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """A small "remote" model: a few files, one in a subfolder."""
    directory = tmp_path / "remote-model"
    (directory / "sub").mkdir(parents=True)
    (directory / "config.json").write_text('{"model_type": "llama"}')
    (directory / "model.safetensors").write_bytes(os.urandom(50_000))
    (directory / "sub" / "tokenizer.json").write_text('{"version": "1.0"}')
    return directory


def _tree(directory: Path) -> dict[str, bytes]:
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in directory.rglob("*")
        if p.is_file()
    }


def _versions(entry: Path) -> list[Path]:
    """The entry's copies that a reader could take (not .partial, not the lock)."""
    return [p for p in entry.iterdir() if not p.name.startswith(".")] if entry.exists() else []


def test_entry_is_keyed_by_source_and_revision_with_a_readable_name(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path)
    entry = cache.entry("hf://meta-llama/Llama-3.1-8B", "main")
    assert entry.parent == tmp_path
    assert entry.name.startswith("hf-meta-llama-Llama-3.1-8B-")
    assert entry == cache.entry("hf://meta-llama/Llama-3.1-8B", "main")
    others = {
        cache.entry("hf://meta-llama/Llama-3.1-8B", "v2"),
        cache.entry("hf://meta-llama/Llama-3.1-8B", None),
        cache.entry("s3://meta-llama/Llama-3.1-8B", "main"),
    }
    assert entry not in others and len(others) == 3
    long = cache.entry("s3://bucket/" + "x" * 300, None)
    assert len(long.name) <= 65 and "/" not in long.name


def test_a_miss_downloads_then_every_fetch_hits_and_reports_the_time_saved(
    tmp_path: Path, model: Path
) -> None:
    source = DirSource(model, tmp_path / "count", pause=0.01)
    cache = ModelCache(tmp_path / "cache")

    first = cache.fetch(source)
    assert not first.hit and first.download_seconds > 0
    assert _tree(first.path) == _tree(model)
    assert first.bytes == sum(len(v) for v in _tree(model).values()) and first.files == 3

    second = cache.fetch(source)
    third = ModelCache(tmp_path / "cache").fetch(source)  # another job, same volume
    assert second.hit and third.hit and second.path == third.path == first.path
    assert len(source.downloads()) == 1
    report = second.report()
    assert report["hit"] is True and report["bytes"] == first.bytes
    # the time saved is what the copy's download took, as recorded in its manifest
    assert report["savedSeconds"] == round(first.download_seconds, 3) > 0
    assert first.report()["savedSeconds"] == 0
    manifest = json.loads((first.path.parent / MANIFEST).read_text())
    assert manifest["complete"] is True and manifest["source"] == source.uri
    assert set(manifest["files"]) == {"config.json", "model.safetensors", "sub/tokenizer.json"}
    assert "saved" in second.summary() and "miss" in first.summary()
    # group-writable: pods of the namespace running as another UID can clean up
    assert first.path.stat().st_mode & 0o020 and (first.path / "sub").stat().st_mode & 0o020


def test_partial_and_unfinished_copies_are_never_used_and_get_replaced(
    tmp_path: Path, model: Path
) -> None:
    source = DirSource(model, tmp_path / "count")
    cache = ModelCache(tmp_path / "cache")
    entry = cache.entry(source.uri, None)
    version = entry / source.describe().version
    # what killed downloaders leave: a .partial fill, and a copy without its manifest
    leftover = entry / f"{PARTIAL}12345-abcd" / "model"
    leftover.mkdir(parents=True)
    (leftover / "config.json").write_text("{")
    (version / "model").mkdir(parents=True)
    (version / "model" / "config.json").write_text(json.dumps({"half": True}))

    result = cache.fetch(source)
    assert not result.hit and len(source.downloads()) == 1
    assert _tree(result.path) == _tree(model)
    assert not list(entry.glob(f"{PARTIAL}*")), "leftovers removed"
    assert _versions(entry) == [version]


def test_a_copy_whose_files_changed_size_is_downloaded_again(tmp_path: Path, model: Path) -> None:
    source = DirSource(model, tmp_path / "count")
    cache = ModelCache(tmp_path / "cache")
    first = cache.fetch(source)
    weights = first.path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated on the volume

    again = cache.fetch(source)
    assert not again.hit and len(source.downloads()) == 2
    assert _tree(again.path) == _tree(model)


def test_a_download_that_does_not_match_the_listing_is_fetched_again(
    tmp_path: Path, model: Path
) -> None:
    source = DirSource(model, tmp_path / "count", corrupt_tries=1)  # first download corrupt
    result = ModelCache(tmp_path / "cache").fetch(source)
    assert len(source.downloads()) == 2
    assert _tree(result.path) == _tree(model)


def test_downloads_that_never_match_fail_retryably_and_leave_nothing(
    tmp_path: Path, model: Path
) -> None:
    source = DirSource(model, tmp_path / "count", corrupt_tries=99)
    cache = ModelCache(tmp_path / "cache")
    with pytest.raises(StorageUnavailable, match="does not match") as raised:
        cache.fetch(source)
    assert raised.value.exit_code.retryable and "md5" in raised.value.message
    entry = cache.entry(source.uri, None)
    assert _versions(entry) == [] and not list(entry.glob(f"{PARTIAL}*"))


def test_a_changed_source_gets_a_new_copy_and_the_old_one_stays(
    tmp_path: Path, model: Path
) -> None:
    source = DirSource(model, tmp_path / "count")
    cache = ModelCache(tmp_path / "cache")
    old = cache.fetch(source)
    (model / "config.json").write_text('{"model_type": "llama", "edited": true}')

    new = cache.fetch(source)
    assert not new.hit and new.path != old.path and len(source.downloads()) == 2
    assert (new.path / "config.json").read_text() == (model / "config.json").read_text()
    assert (old.path / "config.json").is_file()  # a job still reading it is not disturbed


def test_an_unreachable_source_uses_the_newest_complete_copy(tmp_path: Path, model: Path) -> None:
    cache = ModelCache(tmp_path / "cache")
    offline = DirSource(model, tmp_path / "count", unreachable=True)
    with pytest.raises(StorageUnavailable, match="no copy"):
        cache.fetch(offline)
    filled = cache.fetch(DirSource(model, tmp_path / "count"))
    result = cache.fetch(offline)
    assert result.hit and result.path == filled.path


def test_from_env_unset_or_unwritable_means_no_cache(tmp_path: Path) -> None:
    assert ModelCache.from_env({}) is None
    assert ModelCache.from_env({MODEL_CACHE_ENV: ""}) is None
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert ModelCache.from_env({MODEL_CACHE_ENV: str(blocker / "models")}) is None
    cache = ModelCache.from_env({MODEL_CACHE_ENV: str(tmp_path / "models")})
    assert cache is not None and cache.root.is_dir()


def _child(root: Path, model: Path, counter: Path, pause: float) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(FAKES.parent), *sys.path])}
    return subprocess.Popen(
        [sys.executable, str(FAKES), str(root), str(model), str(counter), str(pause)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_two_processes_filling_at_once_download_once(tmp_path: Path, model: Path) -> None:
    counter = tmp_path / "count"
    root = tmp_path / "cache"
    children = [_child(root, model, counter, 0.2) for _ in range(2)]
    reports = []
    for child in children:
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
        reports.append(json.loads(out))
    assert counter.read_text().splitlines() == ["download"]
    assert sorted(r["hit"] for r in reports) == [False, True]
    assert reports[0]["path"] == reports[1]["path"]
    assert _tree(Path(reports[0]["path"])) == _tree(model)


def test_a_killed_downloader_leaves_no_usable_copy_and_the_next_one_completes(
    tmp_path: Path, model: Path
) -> None:
    counter = tmp_path / "count"
    root = tmp_path / "cache"
    source = DirSource(model, counter)
    entry = ModelCache(root).entry(source.uri, None)
    child = _child(root, model, counter, 30.0)  # pauses after its first file
    try:
        deadline = time.monotonic() + 30
        while not [p for p in entry.glob(f"{PARTIAL}*/model/*") if p.is_file()]:
            assert child.poll() is None and time.monotonic() < deadline, child.stderr
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait(10)
    assert child.returncode == -signal.SIGKILL
    assert _versions(entry) == [], "nothing a reader could take"
    assert list(entry.glob(f"{PARTIAL}*")), "the killed fill's leftovers are there"
    with (entry / LOCK).open("rb") as lock:  # the kernel released the dead process's lock
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)

    result = ModelCache(root).fetch(source)
    assert not result.hit
    assert _tree(result.path) == _tree(model)
    assert not list(entry.glob(f"{PARTIAL}*")) and _versions(entry) == [result.path.parent]
    assert ModelCache(root).fetch(source).hit


# ------------------------------------------------------------------------------ the hub


def _hub_model(monkeypatch: pytest.MonkeyPatch, files: dict[str, bytes], commit: str) -> list:
    """A stand-in for the hub: model_info lists ``files`` (sizes, LFS sha256 for the
    weights) at ``commit``; snapshot_download writes them (and the hub client's notes)."""
    import hashlib

    import huggingface_hub
    from huggingface_hub.hf_api import BlobLfsInfo, RepoSibling

    downloads: list[dict] = []

    def model_info(self, repo_id, *, revision=None, token=None, files_metadata=False):
        assert files_metadata
        siblings = [
            RepoSibling(
                name,
                len(data),
                lfs=BlobLfsInfo(len(data), hashlib.sha256(data).hexdigest(), 134)
                if name.endswith(".safetensors")
                else None,
            )
            for name, data in files.items()
        ]
        return type("Info", (), {"sha": commit, "siblings": siblings})()

    def snapshot_download(repo_id, *, revision, token, local_dir, allow_patterns):
        downloads.append({"repo": repo_id, "revision": revision, "patterns": allow_patterns})
        for name, data in files.items():
            if any(Path(name).match(p) or name.endswith(p[1:]) for p in allow_patterns):
                (Path(local_dir) / name).parent.mkdir(parents=True, exist_ok=True)
                (Path(local_dir) / name).write_bytes(data)
        (Path(local_dir) / ".cache" / "huggingface").mkdir(parents=True)
        return local_dir

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return downloads


def test_hub_models_are_cached_by_commit_and_checked_against_the_lfs_sha256(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubetune_trainer.model_cache import HubSource

    files = {
        "config.json": b'{"model_type": "llama"}',
        "model.safetensors": os.urandom(4096),
        "original/consolidated.00.pth": b"not downloaded",
        "README.md": b"# not downloaded",
    }
    downloads = _hub_model(monkeypatch, files, "a" * 40)
    cache = ModelCache(tmp_path / "cache")
    source = HubSource("org/model", "main", token=None)

    listing = source.describe()
    assert listing.version == "a" * 40
    assert {f.path for f in listing.files} == {"config.json", "model.safetensors"}
    weights = next(f for f in listing.files if f.path == "model.safetensors")
    assert weights.sha256 is not None

    first = cache.fetch(source)
    assert not first.hit and downloads[0]["revision"] == "a" * 40  # the commit, not "main"
    assert sorted(p.name for p in first.path.iterdir()) == ["config.json", "model.safetensors"]
    assert cache.fetch(source).hit and len(downloads) == 1
    assert first.path.parent.parent == cache.entry("hf://org/model", "main")

    files["model.safetensors"] = os.urandom(4096)  # a new commit on main
    _hub_model(monkeypatch, files, "b" * 40)
    assert not cache.fetch(source).hit


def test_hub_downloads_that_do_not_match_the_lfs_sha256_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    from kubetune_trainer.model_cache import HubSource

    files = {"config.json": b"{}", "model.safetensors": os.urandom(4096)}
    _hub_model(monkeypatch, files, "c" * 40)
    real = huggingface_hub.snapshot_download

    def tampered(repo_id, **kwargs):  # same size, other bytes
        real(repo_id, **kwargs)
        path = Path(kwargs["local_dir"]) / "model.safetensors"
        path.write_bytes(bytes(4096))
        return kwargs["local_dir"]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", tampered)
    with pytest.raises(StorageUnavailable, match="sha256"):
        ModelCache(tmp_path / "cache").fetch(HubSource("org/model", None, token=None))


def test_an_unreachable_hub_is_a_source_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    import httpx2
    import huggingface_hub

    from kubetune_trainer.model_cache import HubSource, SourceUnreachable

    def refused(self, repo_id, **kwargs):
        raise httpx2.ConnectError("[Errno 111] Connection refused")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", refused)
    with pytest.raises(SourceUnreachable, match="refused"):
        HubSource("org/model", None, token=None).describe()
