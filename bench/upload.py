"""Upload benchmark: throughput and server memory of large file uploads.

What it measures, in one run, against a freshly started `tunegate serve --no-workers`:

- baseline: copying the test file on the same disk (`shutil.copyfile`, then `os.fsync` of the
  copy, as the server fsyncs what it stores), in MB/s;
- `POST /v1/files`: one multipart request carrying the whole file, in MB/s, and the server
  process's peak RSS growth while it runs;
- the Uploads API: `POST /v1/uploads`, 64 MB parts to `/v1/uploads/{id}/parts`, then
  `/complete`, in MB/s (the whole sequence), and its own peak RSS growth.

Target: uploads stream to disk, so the server's peak RSS growth stays under 64 MB whatever the
file size (PASS/FAIL in the table). Throughput is reported next to the disk copy (upload/copy
ratio) so numbers from different machines can be compared.

The test file is JSONL in OpenAI's chat format (a ~1 MB block repeated, each copy numbered so the
content is not all identical). The client streams it from disk in 1 MB chunks with a hand-built
multipart body, so the client does not hold the file in memory either. Before measuring, one tiny
upload through each API warms the server up (imports, connection pools), so the growth is that
of the large upload itself. RSS is sampled every 20 ms.

    .venv/bin/python bench/upload.py            # 512 MB
    .venv/bin/python bench/upload.py --mb 64    # quick
    .venv/bin/python bench/upload.py --keep     # keep the temp dir (file, server data, log)

`--mb` above 512 makes `POST /v1/files` answer 413 (the server's `max_file_bytes` default).
The disk copy baseline is noisy on shared VMs; compare ratios from the same run only.

The last line printed is JSON with the same numbers. Exit status: 0 when every target is met,
1 when the RSS target is missed, 2 on an error.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

MiB = 1024 * 1024
CHUNK = MiB
PART_BYTES = 64 * MiB
RSS_TARGET_MB = 64.0
SAMPLE_INTERVAL = 0.02
READY_DEADLINE = 60.0
ADMIN_KEY = "tg-bench-admin-key-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
REPO = Path(__file__).resolve().parent.parent


# --- test data ----------------------------------------------------------------------------------


def _line(index: int, pad: int = 0) -> bytes:
    record = {
        "messages": [
            {"role": "system", "content": "You answer questions about the benchmark."},
            {"role": "user", "content": f"What is item {index}?" + " " * pad},
            {"role": "assistant", "content": f"Item {index} is a line of benchmark data."},
        ]
    }
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


def _block_template() -> tuple[bytes, bytes]:
    """A 1 MiB block of chat lines after a fixed-width header line holding `{n:012d}`."""
    header = _line(0).replace(b"item 0?", b"block {n:012d}?")
    body = bytearray()
    index = 1
    room = MiB - len(header.replace(b"{n:012d}", b"0" * 12))
    while room - len(body) > 2 * len(_line(index)):
        body += _line(index)
        index += 1
    last = _line(index)
    body += _line(index, pad=room - len(body) - len(last))
    return header, bytes(body)


def make_file(path: Path, mb: int) -> str:
    """Write `mb` MiB of JSONL to `path` (fsynced) and return its sha256."""
    header, body = _block_template()
    digest = hashlib.sha256()
    with path.open("wb") as f:
        for n in range(mb):
            block = header.replace(b"{n:012d}", b"%012d" % n) + body
            assert len(block) == MiB
            f.write(block)
            digest.update(block)
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest()


def copy_rate(source: Path, size: int) -> float:
    """MB/s of copying `source` next to itself, the copy fsynced."""
    target = source.with_name("copy.jsonl")
    started = time.perf_counter()
    shutil.copyfile(source, target)
    with target.open("rb+") as f:
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - started
    target.unlink()
    return size / MiB / elapsed


# --- the server ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_command(port: int) -> list[str]:
    tunegate = Path(sys.executable).with_name("tunegate")
    base = [str(tunegate)] if tunegate.exists() else [sys.executable, "-m", "app.cli"]
    return [*base, "serve", "--no-workers", "--port", str(port)]


def start_server(workdir: Path, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEGATE_")}
    env |= {
        "TUNEGATE_DATA_DIR": str(workdir / "data"),
        "TUNEGATE_BOOTSTRAP_ADMIN_KEY": ADMIN_KEY,
        "TUNEGATE_LOG__LEVEL": "WARNING",
    }
    with log_path.open("wb") as log:
        return subprocess.Popen(
            server_command(port), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
        )


def wait_ready(client: httpx.Client, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_DEADLINE
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with status {server.returncode}")
        try:
            if client.get("/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"GET /readyz was not 200 within {READY_DEADLINE:.0f} s")


def stop_server(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is not None:
        return
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


class PeakRSS:
    """Samples a process's RSS every 20 ms in a thread; `growth_mb` is peak minus baseline."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.baseline = self.process.memory_info().rss
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(SAMPLE_INTERVAL)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def growth_mb(self) -> float:
        return float(self.peak - self.baseline) / MiB


# --- streamed multipart bodies ------------------------------------------------------------------


class MultipartFile:
    """A multipart/form-data body: text fields, then one file part read from disk in 1 MB
    chunks (`offset`/`length` select a slice). Iterate it once; `started` is the time the first
    byte was handed to the transport."""

    def __init__(
        self, fields: dict[str, str], name: str, path: Path, offset: int = 0, length: int = -1
    ) -> None:
        self.boundary = f"bench-{uuid.uuid4().hex}"
        self.path = path
        self.offset = offset
        self.length = path.stat().st_size - offset if length < 0 else length
        head = b"".join(
            f'--{self.boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n'
            f"{value}\r\n".encode()
            for key, value in fields.items()
        )
        head += (
            f"--{self.boundary}\r\n"
            f'Content-Disposition: form-data; name="{name}"; filename="{path.name}"\r\n'
            "Content-Type: application/jsonl\r\n\r\n"
        ).encode()
        self.head = head
        self.tail = f"\r\n--{self.boundary}--\r\n".encode()
        self.started: float | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {
            "Content-Type": f"multipart/form-data; boundary={self.boundary}",
            "Content-Length": str(len(self.head) + self.length + len(self.tail)),
        }

    def __iter__(self) -> Iterator[bytes]:
        self.started = time.perf_counter()
        yield self.head
        with self.path.open("rb") as f:
            f.seek(self.offset)
            remaining = self.length
            while remaining > 0:
                chunk = f.read(min(CHUNK, remaining))
                if not chunk:
                    raise RuntimeError(f"{self.path} ended {remaining} bytes early")
                remaining -= len(chunk)
                yield chunk
        yield self.tail


def _checked(response: httpx.Response, what: str) -> dict[str, Any]:
    if response.status_code != 200:
        raise RuntimeError(f"{what}: HTTP {response.status_code}: {response.text[:500]}")
    body: dict[str, Any] = response.json()
    return body


def upload_file(client: httpx.Client, path: Path) -> tuple[dict[str, Any], float]:
    """POST /v1/files; returns the File object and the seconds from first byte to response."""
    body = MultipartFile({"purpose": "fine-tune"}, "file", path)
    response = client.post("/v1/files", content=body, headers=body.headers)
    elapsed = time.perf_counter() - (body.started or 0.0)
    return _checked(response, "POST /v1/files"), elapsed


def upload_in_parts(client: httpx.Client, path: Path) -> tuple[dict[str, Any], float]:
    """The Uploads API; returns the File object and the seconds for the whole sequence."""
    size = path.stat().st_size
    started = time.perf_counter()
    upload = _checked(
        client.post(
            "/v1/uploads",
            json={
                "filename": path.name,
                "purpose": "fine-tune",
                "bytes": size,
                "mime_type": "application/jsonl",
            },
        ),
        "POST /v1/uploads",
    )
    part_ids = []
    for offset in range(0, size, PART_BYTES):
        body = MultipartFile({}, "data", path, offset, min(PART_BYTES, size - offset))
        response = client.post(
            f"/v1/uploads/{upload['id']}/parts", content=body, headers=body.headers
        )
        part_ids.append(_checked(response, "POST /v1/uploads/{id}/parts")["id"])
    done = _checked(
        client.post(f"/v1/uploads/{upload['id']}/complete", json={"part_ids": part_ids}),
        "POST /v1/uploads/{id}/complete",
    )
    elapsed = time.perf_counter() - started
    if done.get("status") != "completed" or not done.get("file"):
        raise RuntimeError(f"the upload did not complete: {done}")
    return done["file"], elapsed


# --- the run ------------------------------------------------------------------------------------


@dataclass
class Measure:
    key: str
    name: str
    mb_s: float
    ratio: float
    rss_growth_mb: float

    @property
    def passed(self) -> bool:
        return self.rss_growth_mb <= RSS_TARGET_MB

    def as_json(self) -> dict[str, Any]:
        return {
            "mb_s": round(self.mb_s, 1),
            "ratio": round(self.ratio, 3),
            "rss_growth_mb": round(self.rss_growth_mb, 1),
            "rss_target_mb": RSS_TARGET_MB,
            "pass": self.passed,
        }


def measure(
    key: str,
    name: str,
    client: httpx.Client,
    pid: int,
    path: Path,
    sha256: str,
    copy_mb_s: float,
    upload: Any,
) -> Measure:
    with PeakRSS(pid) as rss:
        file, elapsed = upload(client, path)
    if file.get("sha256") != sha256:
        raise RuntimeError(f"{name}: sha256 {file.get('sha256')} differs from {sha256}")
    if file.get("bytes") != path.stat().st_size:
        raise RuntimeError(f"{name}: {file.get('bytes')} bytes stored, not {path.stat().st_size}")
    mb_s = path.stat().st_size / MiB / elapsed
    return Measure(key, name, mb_s, mb_s / copy_mb_s, rss.growth_mb)


def print_report(mb: int, copy_mb_s: float, results: list[Measure]) -> None:
    rows = [("disk copy + fsync (baseline)", f"{copy_mb_s:8.1f}", "    1.00", "", "")]
    for r in results:
        verdict = "PASS" if r.passed else "FAIL"
        rows.append(
            (r.name, f"{r.mb_s:8.1f}", f"{r.ratio:8.2f}", f"{r.rss_growth_mb:8.1f}", verdict)
        )
    titles = ("method", "MB/s", "vs copy", "RSS +MB", f"<= {RSS_TARGET_MB:.0f} MB")
    widths = [max(len(row[i]) for row in [titles, *rows]) for i in range(len(titles))]

    def line(cells: tuple[str, ...]) -> str:
        first, *rest = cells
        return "  ".join(
            [first.ljust(widths[0])] + [c.rjust(w) for c, w in zip(rest, widths[1:], strict=True)]
        )

    print(f"\nupload benchmark: {mb} MB file; target: server peak RSS growth <= 64 MB")
    print(line(titles))
    print(line(tuple("-" * w for w in widths)))
    for row in rows:
        print(line(row))
    summary = {
        "mb": mb,
        "copy_mb_s": round(copy_mb_s, 1),
        **{r.key: r.as_json() for r in results},
    }
    print(json.dumps(summary))


def run(mb: int, workdir: Path) -> int:
    path = workdir / "bench.jsonl"
    started = time.perf_counter()
    sha256 = make_file(path, mb)
    print(f"wrote {path} ({mb} MB) in {time.perf_counter() - started:.1f} s, sha256 {sha256}")
    copy_mb_s = copy_rate(path, path.stat().st_size)
    print(f"disk copy + fsync: {copy_mb_s:.1f} MB/s")

    port = free_port()
    log_path = workdir / "server.log"
    server = start_server(workdir, port, log_path)
    try:
        timeout = httpx.Timeout(30.0, read=600.0)
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers=AUTH, timeout=timeout
        ) as client:
            wait_ready(client, server)
            warm = workdir / "warm.jsonl"
            warm.write_bytes(_line(0) * 10)
            upload_file(client, warm)
            upload_in_parts(client, warm)

            common = (client, server.pid, path, sha256, copy_mb_s)
            results = [
                measure("files", "POST /v1/files", *common, upload_file),
                measure("uploads", "Uploads API (64 MB parts)", *common, upload_in_parts),
            ]
    except BaseException:
        stop_server(server)
        tail = log_path.read_text(errors="replace")[-4000:]
        print(f"--- server log ({log_path}), last lines ---\n{tail}", file=sys.stderr)
        raise
    stop_server(server)
    print_report(mb, copy_mb_s, results)
    return 0 if all(r.passed for r in results) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=512, help="file size in MB (MiB), default 512")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    if args.mb < 1:
        parser.error("--mb must be at least 1")
    workdir = Path(tempfile.mkdtemp(prefix="tunegate-bench-"))
    try:
        return run(args.mb, workdir)
    except Exception as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 2
    finally:
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
