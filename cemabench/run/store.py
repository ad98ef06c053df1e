"""The results store: one atomic JSON file per run unit, checked on every read, and per-unit claims so that several
``reproduce`` processes into the same folder share the work.

A record is ``{"key", "unit", "results", "checksum"}``: ``key`` is the hash of the unit's full configuration (which
includes the fingerprint of the code that computes it) and names the file; ``checksum`` is the sha256 of the record's
canonical JSON without the checksum. A record that fails any check is named in a one-line warning and recomputed.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path

OK = "ok"
CLAIM_TIMEOUT_S = float(os.environ.get("CEMABENCH_CLAIM_TIMEOUT", str(24 * 3600)))  # for owners on other hosts


def checksum(record: dict) -> str:
    body = {k: v for k, v in record.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def failed(record: dict) -> bool:
    return any(r.get("status") != OK for r in record["results"])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ResultStore:
    """One file per unit under ``root``, named by the unit's key."""

    def __init__(self, root: Path, warn=None):
        self.root = Path(root)
        self.host = socket.gethostname()
        self.owner = uuid.uuid4().hex  # this store object's claims
        self._warn = warn or (lambda line: print(line, file=sys.stderr, flush=True))

    def path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def claim_path(self, key: str) -> Path:
        return self.root / f"{key}.claim"

    # records ---------------------------------------------------------------------------------------------------
    def problem(self, key: str, expected: tuple[tuple[int, str], ...]) -> tuple[dict | None, str | None]:
        """The record stored under ``key`` and ``None``, or ``None`` and why the file is unusable (``None, None``
        when there is no file)."""
        path = self.path(key)
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None, None
        if not text.strip():
            return None, "empty file"
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            cut = text.lstrip().startswith("{") and not text.rstrip().endswith("}")
            return None, f"not JSON ({'truncated' if cut else f'{error.msg} at character {error.pos}'})"
        if not isinstance(record, dict):
            return None, "not a record (a JSON object)"
        if "key" not in record:
            return None, "no key (not a cemabench record, or from an older version)"
        if record.get("key") != key:
            return None, f"holds the record of another unit (key {record.get('key')!r})"
        if record.get("checksum") != checksum(record):
            return None, "checksum mismatch (the record was edited or damaged)"
        results = record.get("results")
        if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
            return None, "no result list"
        found = tuple((r.get("device", 0), r.get("domain")) for r in results)
        if found != tuple(expected):
            return None, f"results for (device, domain) {list(found)}, expected {list(expected)}"
        return record, None

    def get(self, key: str, expected: tuple[tuple[int, str], ...]) -> dict | None:
        """A valid record (whatever its status), or None; an unusable file is named in a one-line warning."""
        record, problem = self.problem(key, expected)
        if problem:
            self._warn(f"cemabench: warning: {self.path(key)}: {problem}; recomputing it")
        return record

    def put(self, key: str, record: dict) -> dict:
        """Write a record atomically (temporary file, then rename), stamped with its key and checksum."""
        record = {**{k: v for k, v in record.items() if k != "checksum"}, "key": key}
        record["checksum"] = checksum(record)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "w") as f:
            f.write(json.dumps(record, indent=1, sort_keys=True))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path(key))
        return record

    # claims ----------------------------------------------------------------------------------------------------
    def read_claim(self, key: str) -> dict | None:
        try:
            claim = json.loads(self.claim_path(key).read_text())
            return claim if isinstance(claim, dict) else {}
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, OSError):
            return {}  # being written, or damaged: judged by the file's age

    def live_owner(self, key: str) -> dict | None:
        """The claim on ``key`` when its owner may still be computing it, else None."""
        claim = self.read_claim(key)
        if claim is None:
            return None
        return None if self._stale(key, claim) else claim

    def _stale(self, key: str, claim: dict) -> bool:
        try:
            age = time.time() - self.claim_path(key).stat().st_mtime
        except FileNotFoundError:
            return True
        if not claim:
            return age > 60
        if claim.get("host") == self.host:
            return not _pid_alive(int(claim.get("pid", -1)))
        return age > CLAIM_TIMEOUT_S

    def claim(self, key: str) -> bool:
        """Take the unit: True when this store now owns it (a free or stale claim), False when a live owner has it."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.claim_path(key)
        mine = json.dumps({"pid": os.getpid(), "host": self.host, "time": time.time(), "owner": self.owner})
        for _ in range(5):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                claim = self.read_claim(key)
                if claim is None:
                    continue
                if not self._stale(key, claim):
                    return False
                # take over a stale claim: move it aside, and put it back if it was replaced meanwhile
                aside = path.with_name(f".{path.name}.{self.owner}.stale")
                try:
                    os.rename(path, aside)
                except FileNotFoundError:
                    continue
                moved = self.read_claim_file(aside)
                if moved != claim:
                    with contextlib.suppress(FileExistsError):
                        os.link(aside, path)
                    aside.unlink(missing_ok=True)
                    return False
                aside.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(mine)
            return True
        return False

    @staticmethod
    def read_claim_file(path: Path) -> dict | None:
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def release(self, key: str) -> None:
        """Drop this store's claim on ``key`` (never another owner's)."""
        claim = self.read_claim(key)
        if claim and claim.get("owner") == self.owner:
            self.claim_path(key).unlink(missing_ok=True)
