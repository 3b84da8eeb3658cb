"""fxpeft.atomic: a set of files saved atomically under concurrent threads and processes, kills and faults."""

from __future__ import annotations

import doctest
import errno
import json
import os
import random
import signal
import stat
import subprocess
import sys
import threading

import pytest

import fxpeft.atomic
from fxpeft.atomic import (
    LOCK_NAME,
    MANIFEST_NAME,
    TMP_PREFIX,
    commit_files,
    read_lock,
    verify_files,
)
from fxpeft.errors import AdapterFileError

fcntl = pytest.importorskip("fcntl")  # the locking tests are posix-only, as the locks are

PKG_DIR = os.path.dirname(fxpeft.atomic.__file__)

# One writer's save, shared by the threads here and the child processes (exec'd in both). Every file carries
# the save's id; sizes vary, so a mix of two saves also shows in the sizes. "extra.txt" is in some sets only
# and is stale otherwise, so a complete set is exactly the manifest's files.
_SAVE_SRC = r'''
def save_one(commit_files, directory, wid, rng):
    names = ["adapter_model.safetensors", "adapter_config.json"] + (["extra.txt"] if rng.random() < 0.5 else [])

    def writer(name):
        body = (wid + "|" + name + "|").encode() + bytes(rng.randrange(1, 48) * 1024)

        def write(path):
            with open(path, "wb") as f:
                for i in range(0, len(body), 8192):  # several writes: a wider window for a racing save
                    f.write(body[i:i + 8192])
        return write

    commit_files(directory, [(n, writer(n)) for n in names], stale=lambda n: n == "extra.txt")
'''

# A child process: imports fxpeft.atomic without fxpeft/__init__ (no torch: starts in ~50 ms), then
#   loop  TAG N   prints "ready", waits for a line on stdin, saves N times;
#   block         saves with a write callback that prints "ready" and then hangs (to be SIGKILLed);
#   die           saves, and SIGKILLs itself in phase 2 after the manifest and the first file are renamed.
_CHILD = _SAVE_SRC + r'''
import os, random, signal, sys, time, types
pkg = types.ModuleType("fxpeft")
pkg.__path__ = [sys.argv[1]]
sys.modules["fxpeft"] = pkg
from fxpeft.atomic import commit_files
directory, mode = sys.argv[2], sys.argv[3]
if mode == "loop":
    tag, n = sys.argv[4], int(sys.argv[5])
    rng = random.Random(tag)
    print("ready", flush=True)
    sys.stdin.readline()
    for k in range(n):
        save_one(commit_files, directory, f"{tag}s{k}", rng)
elif mode == "block":
    def hang(path):
        with open(path, "wb") as f:
            f.write(b"child|" + bytes(1 << 20))
        print("ready", flush=True)
        time.sleep(600)
    commit_files(directory, [("a.txt", hang)])
elif mode == "die":
    real, done = os.replace, []
    def replace(src, dst):
        real(src, dst)
        done.append(dst)
        if len(done) == 2:  # the manifest, then a.txt
            os.kill(os.getpid(), signal.SIGKILL)
    os.replace = replace
    def text(s):
        def write(path):
            with open(path, "w") as f:
                f.write(s)
        return write
    commit_files(directory, [(n, text("dead|" + n)) for n in ("a.txt", "b.txt")])
'''

_ns: dict = {}
exec(_SAVE_SRC, _ns)
save_one = _ns["save_one"]


def _child(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _CHILD, PKG_DIR, *map(str, args)], text=True, **kw)


def _text(s: str):
    def write(path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(s)
    return write


def _save(d, tag: str, names=("a.txt", "b.txt"), **kw) -> None:
    commit_files(d, [(n, _text(f"{tag}|{n}")) for n in names], **kw)


def _user_files(d) -> list[str]:
    return sorted(n for n in os.listdir(d) if not n.startswith(".fxpeft"))


def _temps(d) -> list[str]:
    return sorted(n for n in os.listdir(d) if n.startswith(TMP_PREFIX))


def _tag(path) -> str:
    with open(path, "rb") as f:
        return f.read(64).split(b"|")[0].decode()


def _check_one_set(d) -> None:
    """The directory holds exactly one save's files: the manifest's, each carrying the manifest's id."""
    with open(os.path.join(d, MANIFEST_NAME)) as f:
        manifest = json.load(f)
    listed = [e["name"] for e in manifest["files"]]
    assert _user_files(d) == sorted(listed)
    tags = {n: _tag(os.path.join(d, n)) for n in listed}
    assert len(set(tags.values())) == 1, tags
    verify_files(d)


# ------------------------------------------------------------------------------------------ concurrency


def _reader(d, stop: threading.Event, errors: list) -> None:
    """Reads under the shared lock while the writers run: it must only ever see one complete save."""
    while not stop.is_set():
        if not os.path.exists(os.path.join(d, MANIFEST_NAME)):
            continue
        try:
            with read_lock(d) as locked:
                assert locked
                _check_one_set(d)
        except Exception as e:  # noqa: BLE001  (reported by the test thread)
            errors.append(e)
            return


def test_flock_excludes_threads_of_one_process(tmp_path):
    # The design relies on this: each open() is its own open file description, and flock is per description.
    p = tmp_path / "l"
    p.touch()
    a, b = os.open(p, os.O_RDWR), os.open(p, os.O_RDWR)
    try:
        fcntl.flock(a, fcntl.LOCK_EX)
        with pytest.raises(BlockingIOError):
            fcntl.flock(b, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(a)
        os.close(b)


@pytest.mark.parametrize("rnd", range(3))
def test_concurrent_threads_and_processes_leave_one_complete_set(tmp_path, rnd):
    d = str(tmp_path / "out")
    procs = [_child(d, "loop", f"p{rnd}{i}", 4, stdin=subprocess.PIPE, stdout=subprocess.PIPE) for i in range(4)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    errors: list = []

    def thread_saves(i: int) -> None:
        rng = random.Random(f"t{rnd}{i}")
        try:
            for k in range(4):
                save_one(commit_files, d, f"t{rnd}{i}s{k}", rng)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    stop = threading.Event()
    reader = threading.Thread(target=_reader, args=(d, stop, errors), daemon=True)
    threads = [threading.Thread(target=thread_saves, args=(i,), daemon=True) for i in range(8)]
    reader.start()
    for t in threads:
        t.start()
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    for t in threads:
        t.join()
    for p in procs:
        p.communicate(timeout=60)
    stop.set()
    reader.join()
    assert [p.returncode for p in procs] == [0] * 4
    assert not errors, errors[:3]
    _check_one_set(d)
    assert _temps(d) == []


# ------------------------------------------------------------------------------------ faults and kills


def test_fault_between_renames_is_detected_and_repaired(tmp_path, monkeypatch):
    d = str(tmp_path)
    _save(d, "old")
    real = os.replace

    def replace(src, dst):
        if os.path.basename(dst) == "b.txt":
            raise OSError("injected")
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="injected"):
        _save(d, "new")
    monkeypatch.setattr(os, "replace", real)
    assert (_tag(tmp_path / "a.txt"), _tag(tmp_path / "b.txt")) == ("new", "old")  # the mix that loaded silently
    with pytest.raises(AdapterFileError, match="b.txt.*save again"):
        verify_files(d, ["a.txt", "b.txt"])
    with pytest.raises(AdapterFileError, match="b.txt"):
        verify_files(d)
    assert _temps(d) == []  # the failed save removed its own temp files
    _save(d, "good")
    verify_files(d, ["a.txt", "b.txt"])
    assert {_tag(tmp_path / n) for n in ("a.txt", "b.txt")} == {"good"}


def test_failure_while_writing_leaves_the_previous_save(tmp_path):
    d = str(tmp_path)
    _save(d, "old")

    def boom(path):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        commit_files(d, [("a.txt", _text("new|a")), ("b.txt", boom)])
    verify_files(d, ["a.txt", "b.txt"])
    assert {_tag(tmp_path / n) for n in ("a.txt", "b.txt")} == {"old"}
    assert _temps(d) == []


def test_kill_mid_rename_is_detected_then_cleaned_and_repaired(tmp_path):
    d = str(tmp_path)
    _save(d, "old")
    p = _child(d, "die")
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL
    assert _tag(tmp_path / "a.txt") == "dead" and _tag(tmp_path / "b.txt") == "old"
    with pytest.raises(AdapterFileError, match="b.txt"):
        verify_files(d, ["a.txt", "b.txt"])
    assert _temps(d)  # the dead writer's marker and b.txt's temp file
    _save(d, "good")
    verify_files(d, ["a.txt", "b.txt"])
    assert sorted(os.listdir(d)) == [MANIFEST_NAME, LOCK_NAME, "a.txt", "b.txt"]


def test_live_writer_kept_dead_writer_removed_across_processes(tmp_path):
    d = str(tmp_path)
    _save(d, "old")
    # Leftovers of fxpeft <= 0.1's io._commit (mkstemp names), and a temp file of fxpeft.export, which is
    # not this protocol's and may belong to a running export: the first is removed, the second kept.
    (tmp_path / f"{TMP_PREFIX}ab_d12x4-adapter_model.safetensors").write_bytes(b"x" * 100)
    (tmp_path / f"{TMP_PREFIX}ab_d12x4.pt2").write_bytes(b"x")
    p = _child(d, "block", stdout=subprocess.PIPE)
    try:
        assert p.stdout.readline().strip() == "ready"
        live = _temps(d)
        _save(d, "mid")  # the child is alive: its temp files must survive this save's cleanup
        assert set(live) - {f"{TMP_PREFIX}ab_d12x4-adapter_model.safetensors"} <= set(_temps(d))
        assert any(n.endswith("-a.txt") for n in _temps(d))
    finally:
        p.kill()
        p.wait(timeout=60)
    verify_files(d, ["a.txt", "b.txt"])  # killed while writing: the last complete save is intact
    _save(d, "new")
    assert sorted(os.listdir(d)) == [MANIFEST_NAME, f"{TMP_PREFIX}ab_d12x4.pt2", LOCK_NAME, "a.txt", "b.txt"]
    verify_files(d, ["a.txt", "b.txt"])


def test_live_writer_thread_kept_by_a_concurrent_cleaner(tmp_path):
    d = str(tmp_path)
    inside, release, errors = threading.Event(), threading.Event(), []

    def paused(path):
        with open(path, "w") as f:
            f.write("slow|a.txt")
        inside.set()
        assert release.wait(60)

    def slow_save():
        try:
            commit_files(d, [("a.txt", paused), ("b.txt", _text("slow|b.txt"))])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=slow_save)
    t.start()
    try:
        assert inside.wait(60)
        before = _temps(d)
        assert len(before) == 2  # its marker and a.txt's temp file
        _save(d, "fast")  # cleans up dead writers under the lock; the paused one is alive
        assert _temps(d) == before
    finally:
        release.set()
        t.join()
    assert not errors, errors
    verify_files(d, ["a.txt", "b.txt"])
    assert {_tag(tmp_path / n) for n in ("a.txt", "b.txt")} == {"slow"}  # the last to commit wins, whole
    assert _temps(d) == []


# ---------------------------------------------------------------------------------------- modes, stale, verify


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_mode_follows_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)  # restored below; no other thread of this test process runs now
    try:
        (tmp_path / "a.txt").write_text("x")  # an existing file, overwritten
        os.chmod(tmp_path / "a.txt", 0o644)
        (tmp_path / "b.txt").write_text("x")
        os.chmod(tmp_path / "b.txt", 0o600)  # as fxpeft <= 0.1's mkstemp left it: fixed by the next save
        _save(str(tmp_path), "m", names=("a.txt", "b.txt", "c.txt"))
    finally:
        os.umask(old)
    for n in ("a.txt", "b.txt", "c.txt", MANIFEST_NAME):
        assert stat.S_IMODE(os.stat(tmp_path / n).st_mode) == mode, n


def test_stale_files_removed_others_kept(tmp_path):
    d = str(tmp_path)
    for n in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
              "model.safetensors.index.json", "README.md", "config.json"):
        (tmp_path / n).write_text("old")
    (tmp_path / "model-00009-of-00009.safetensors").mkdir()  # a directory is never removed
    stale = lambda n: n.startswith("model")  # noqa: E731
    _save(d, "new", names=("model.safetensors", "config.json"), stale=stale)
    assert _user_files(d) == ["README.md", "config.json", "model-00009-of-00009.safetensors", "model.safetensors"]
    verify_files(d, ["model.safetensors", "config.json"])


def test_stale_that_raises_leaves_the_previous_save(tmp_path):
    d = str(tmp_path)
    _save(d, "old")
    (tmp_path / "other").write_text("x")

    def stale(name):
        raise KeyError(name)

    with pytest.raises(KeyError):
        _save(d, "new", stale=stale)
    verify_files(d, ["a.txt", "b.txt"])
    assert {_tag(tmp_path / n) for n in ("a.txt", "b.txt")} == {"old"}


def test_directory_without_manifest_verifies(tmp_path):
    # As HF PEFT writes it: no manifest, no lock file; verify accepts it and creates nothing.
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    verify_files(tmp_path, ["adapter_config.json", "adapter_model.safetensors"])
    verify_files(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]


def test_verify_refuses_edits_unlisted_and_broken_manifest(tmp_path):
    d = str(tmp_path)
    _save(d, "ok")
    with pytest.raises(AdapterFileError, match="c.txt.*not part of the last fxpeft save"):
        verify_files(d, ["a.txt", "c.txt"])
    (tmp_path / "a.txt").write_text("ok|a.tx!")  # same size, other bytes: found by the hash
    with pytest.raises(AdapterFileError, match="a.txt.*sha256"):
        verify_files(d, ["a.txt"])
    (tmp_path / "a.txt").write_text("longer")
    with pytest.raises(AdapterFileError, match="a.txt: 6 bytes"):
        verify_files(d, ["a.txt"])
    (tmp_path / "a.txt").unlink()
    with pytest.raises(AdapterFileError, match="a.txt: missing"):
        verify_files(d, ["a.txt"])
    (tmp_path / MANIFEST_NAME).write_text('{"format": "fxpeft-manifest/1", "files": [')
    with pytest.raises(AdapterFileError, match="manifest is unreadable"):
        verify_files(d, ["b.txt"])


@pytest.mark.parametrize("names", [["../a"], ["sub/a"], [MANIFEST_NAME], [".."], ["a", "a"], []])
def test_bad_names_refused_before_writing(tmp_path, names):
    with pytest.raises(ValueError):
        commit_files(tmp_path / "d", [(n, _text("x")) for n in names])
    assert not (tmp_path / "d").exists() and not (tmp_path / "a").exists()


def test_docstring_examples_run():
    assert doctest.testmod(fxpeft.atomic).failed == 0


def test_without_fcntl_saves_and_verifies(tmp_path, monkeypatch):
    # Windows has no fcntl: no locks, no cleanup of other saves' temp files, but no crash either.
    monkeypatch.setattr(fxpeft.atomic, "fcntl", None)
    dead = tmp_path / f"{TMP_PREFIX}{'0' * 16}.lock"
    dead.touch()
    _save(str(tmp_path), "x")
    verify_files(tmp_path, ["a.txt", "b.txt"])
    assert _temps(tmp_path) == [dead.name]


def test_file_system_without_flock_saves_and_keeps_others_temp_files(tmp_path, monkeypatch):
    # Lustre without -o flock answers ENOSYS: save unlocked, and take no other writer for dead.
    def flock(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fxpeft.atomic.fcntl, "flock", flock)
    dead = tmp_path / f"{TMP_PREFIX}{'0' * 16}.lock"
    dead.touch()
    _save(str(tmp_path), "x")
    verify_files(tmp_path, ["a.txt", "b.txt"])
    assert _temps(tmp_path) == [dead.name]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.filterwarnings("ignore:.*fork\\(\\) may lead to deadlocks:DeprecationWarning")
def test_forked_child_does_not_keep_the_lock(tmp_path):
    # A child forked while a lock is held (a DataLoader worker, say) shares the lock's open file description;
    # fxpeft closes it in the child, or the directory would stay locked for the child's whole life.
    d = str(tmp_path)
    _save(d, "x")
    r, w = os.pipe()  # parent -> child: "checked, leave"
    r2, w2 = os.pipe()  # child -> parent: "running" (fork handlers run before os.fork returns in the child)
    with read_lock(d) as locked:
        assert locked
        pid = os.fork()
        if pid == 0:  # the child
            os.write(w2, b"x")
            os.read(r, 1)
            os._exit(0)
    os.close(w2)
    try:
        assert os.read(r2, 1) == b"x"
        fd = os.open(os.path.join(d, LOCK_NAME), os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError if the child still held it
        finally:
            os.close(fd)
    finally:
        os.write(w, b"x")
        for fd in (r, w, r2):
            os.close(fd)
        os.waitpid(pid, 0)
