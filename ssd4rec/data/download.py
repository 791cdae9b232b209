"""Fetch one official raw file over HTTP(S) without ever leaving a half-written copy.

Only the standard library is used (``urllib``), plus ``tqdm`` for the progress
bar (it comes with RecBole). Each socket operation (connect, every read) has a
timeout, so a dead server cannot hang the download. The bytes go to a temporary
file next to the destination, which is renamed onto it only after the size and
the checksum (where one is recorded) have been checked; on any failure the
temporary file is deleted and an :class:`~ssd4rec.errors.SSD4RecError` says which
URL failed and where to put a copy fetched by hand.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import secrets
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ssd4rec.errors import SSD4RecError

DEFAULT_TIMEOUT_S = 60.0
_CHUNK = 1 << 20
_USER_AGENT = "ssd4rec-dataset-fetcher (python urllib)"


@dataclass(frozen=True)
class RemoteFile:
    """One official file: where it lives, the name it is stored under, its checksum.

    ``md5`` / ``sha256`` are ``None`` where no checksum could be recorded; the
    download then prints the sha256 of what arrived so that users can pin it.
    """

    url: str
    filename: str
    md5: str | None = None
    sha256: str | None = None


def _manual_hint(url: str, dest: Path) -> str:
    return (
        f"Fetch {url} yourself (browser, wget or curl) and put it at {dest}, "
        "then run the same command again without --download."
    )


def download(
    remote: RemoteFile,
    dest: str | os.PathLike[str],
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    progress: bool = True,
) -> Path:
    """Download ``remote.url`` to ``dest`` atomically and return ``dest`` as a Path.

    ``timeout`` (seconds) bounds the connection and every single read. Raises
    :class:`SSD4RecError` (after deleting the partial file) when the host cannot
    be reached, answers with an HTTP error, stalls, closes the connection early,
    or sends bytes whose checksum differs from the recorded one.
    """
    dest = Path(dest)
    url = remote.url
    try:
        request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    except ValueError as err:
        raise SSD4RecError(f"cannot download {url!r}: {err}. " + _manual_hint(url, dest)) from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
    md5 = hashlib.md5()
    sha256 = hashlib.sha256()
    received = 0
    done = False
    try:
        try:
            with open(tmp, "xb") as out, urllib.request.urlopen(request, timeout=timeout) as resp:
                length = resp.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                bar = _progress_bar(total, dest.name, enabled=progress)
                try:
                    while True:
                        chunk = resp.read(_CHUNK)
                        if not chunk:
                            break
                        out.write(chunk)
                        md5.update(chunk)
                        sha256.update(chunk)
                        received += len(chunk)
                        bar.update(len(chunk))
                finally:
                    bar.close()
                if total is not None and received != total:
                    raise SSD4RecError(
                        f"download of {url} was cut off: got {received} of {total} bytes. "
                        + _manual_hint(url, dest)
                    )
                out.flush()
                os.fsync(out.fileno())
        except SSD4RecError:
            raise
        except urllib.error.HTTPError as err:
            raise SSD4RecError(
                f"download of {url} failed: HTTP {err.code} {err.reason}. " + _manual_hint(url, dest)
            ) from None
        except urllib.error.URLError as err:
            raise SSD4RecError(
                f"download of {url} failed: {err.reason} (offline, or the host is unreachable?). "
                + _manual_hint(url, dest)
            ) from None
        except TimeoutError:
            raise SSD4RecError(
                f"download of {url} timed out: no data for {timeout:g} s. " + _manual_hint(url, dest)
            ) from None
        except (http.client.HTTPException, OSError, ValueError) as err:
            raise SSD4RecError(
                f"download of {url} failed after {received} bytes: {type(err).__name__}: {err}. "
                + _manual_hint(url, dest)
            ) from None

        _check_digest(remote, "md5", md5.hexdigest(), dest)
        _check_digest(remote, "sha256", sha256.hexdigest(), dest)
        if remote.md5 is None and remote.sha256 is None:
            print(
                f"note: no checksum is recorded for {url}; the file downloaded has "
                f"sha256 {sha256.hexdigest()} ({received} bytes). Pin it if you share results.",
                file=sys.stderr,
            )
        os.replace(tmp, dest)
        done = True
        return dest
    finally:
        if not done:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass


def _check_digest(remote: RemoteFile, kind: str, got: str, dest: Path) -> None:
    expected = getattr(remote, kind)
    if expected is not None and got.lower() != expected.lower():
        raise SSD4RecError(
            f"download of {remote.url} has the wrong {kind} checksum: expected {expected}, got {got} "
            "(corrupted transfer, or the file changed upstream). " + _manual_hint(remote.url, dest)
        )


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int | None, name: str, *, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a RecBole dependency, but never fail over a progress bar
        return _NoBar()
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name, file=sys.stderr)
