"""A stand-in model source for the model cache's unit tests (also run in child processes).

``DirSource`` serves the files of a local directory as if they were remote: it lists them
with sizes and MD5s, and each download appends a line to a counter file (the number of
downloads, across processes) and may pause after each file or corrupt the first tries.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

from kubetune_trainer.model_cache import Listing, ModelCache, RemoteFile, Source


class DirSource(Source):
    def __init__(
        self,
        directory: Path,
        counter: Path,
        *,
        uri: str = "s3://models/tiny",
        revision: str | None = None,
        pause: float = 0.0,
        corrupt_tries: int = 0,
        unreachable: bool = False,
    ) -> None:
        self.directory, self.counter = directory, counter
        self.uri, self.revision = uri, revision
        self.pause, self.corrupt_tries, self.unreachable = pause, corrupt_tries, unreachable

    def describe(self) -> Listing:
        if self.unreachable:
            from kubetune_trainer.model_cache import SourceUnreachable

            raise SourceUnreachable(f"{self.uri} is unreachable")
        files = tuple(
            RemoteFile(
                p.relative_to(self.directory).as_posix(),
                p.stat().st_size,
                md5=hashlib.md5(p.read_bytes()).hexdigest(),
            )
            for p in sorted(self.directory.rglob("*"))
            if p.is_file()
        )
        version = hashlib.sha256(json.dumps([[f.path, f.md5] for f in files]).encode())
        return Listing(version.hexdigest()[:16], files)

    def download(self, listing: Listing, target: Path) -> None:
        with self.counter.open("a") as handle:
            handle.write("download\n")
        tries = len(self.downloads())
        for file in listing.files:
            path = target.joinpath(*file.path.split("/"))
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.directory / file.path, path)
            if tries <= self.corrupt_tries:  # same size, other content: only a digest tells
                data = bytearray(path.read_bytes())
                data[0] ^= 0xFF
                path.write_bytes(bytes(data))
            time.sleep(self.pause)

    def downloads(self) -> list[str]:
        return self.counter.read_text().splitlines() if self.counter.exists() else []


def child_main(argv: list[str]) -> None:
    """``python cache_fakes.py ROOT MODEL COUNTER PAUSE``: fetch once, print the report."""
    root, model, counter, pause = argv
    source = DirSource(Path(model), Path(counter), pause=float(pause))
    result = ModelCache(Path(root)).fetch(source)
    print(json.dumps(result.report()), flush=True)


if __name__ == "__main__":
    child_main(sys.argv[1:])
