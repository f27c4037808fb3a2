"""Shared fixtures and helpers: tiny models, a small tokenizer trained on the built-in corpus, prepared shards,
the launcher and metrics helpers of the end-to-end tests, and a one-rank process group for in-process loop tests."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path

import pytest
import torch

from lillm import LilLM, ModelConfig

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
QA = [("What is the secret word?", "The secret word is banana."), ("Name a color.", "Blue is a color."),
      ("What is two plus two?", "Two plus two is four."), ("Say hello.", "Hello there, friend!"),
      ("Which animal barks?", "A dog barks."), ("Where is Paris?", "Paris is in France."),
      ("What do bees make?", "Bees make honey."), ("How many legs has a cat?", "A cat has four legs.")]
"""Question/answer pairs a tiny model learns by heart in the post-training tests."""
SYSTEMS = ["", "Be brief.", "You are helpful.", "Answer plainly."]
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
SESSION_MARK = "LILLM_TEST_SESSION"
os.environ[SESSION_MARK] = uuid.uuid4().hex  # this process's own; inherited by every process the tests start
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_CBWR": "AUTO,STRICT"}


def _leftovers() -> list[int]:
    """Processes this test session started that outlived their test: a job a test started in a session of its
    own (a launcher and its ranks) and never ended, or a process whose parent is gone (a rank of a launch that
    ended or was killed without it). Nothing waits for them; a rank spinning in a collective takes a core from
    every later test. Data workers and multiprocessing's helpers of the test process itself are left alone."""
    mark = f"{SESSION_MARK}={os.environ[SESSION_MARK]}".encode()
    me, stats = os.getpid(), {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if mark not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            stats[int(entry)] = (int(fields[1]), int(fields[3]))  # parent, session
        except (OSError, ValueError, IndexError):
            continue
    return [pid for pid, (parent, session) in stats.items()
            if session == pid or (parent != me and parent not in stats)]


SHM = Path("/dev/shm")
SHM_BUFFERS = f"deepspeed_allreduce_buffer_{os.getuid()}_*"  # this user's: another's cannot be unlinked here


@pytest.fixture(autouse=True)
def no_leftovers(request):
    """After each test, end the jobs it left running (`_leftovers`, with their children) and remove the DeepSpeed
    shared-memory buffers it left in /dev/shm, saying so: a leaked rank otherwise slows or wedges every test
    after it, and leaked buffers fill the machine's memory."""
    before = set(SHM.glob(SHM_BUFFERS)) if SHM.is_dir() else set()
    yield
    if os.path.isdir("/proc"):
        leaked = _leftovers()
        for pid in leaked:
            for child in _children(pid):
                _kill(child)
            _kill(pid)
        deadline = time.monotonic() + 10  # SIGKILL is asynchronous: wait until they have let go of their memory
        while any(_alive(pid) for pid in leaked) and time.monotonic() < deadline:
            time.sleep(0.1)
        if leaked:
            warnings.warn(f"{request.node.nodeid} left {len(leaked)} job(s) running (pids "
                          f"{', '.join(map(str, leaked))}); ended them", stacklevel=1)
    left = set(SHM.glob(SHM_BUFFERS)) - before - _mapped() if SHM.is_dir() else set()
    if left:
        live = _live_ports()
        left = {path for path in left if _port_of(path) not in live}
    for path in left:
        path.unlink(missing_ok=True)
    if left:
        warnings.warn(f"{request.node.nodeid} left {len(left)} DeepSpeed shared-memory buffer(s) in {SHM}; removed "
                      "them", stacklevel=1)


def _mapped() -> set[Path]:
    """The files of /dev/shm that a live process maps: buffers of a job still running (another session's,
    a training run), never removed."""
    out = set()
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        try:
            with open(f"/proc/{entry}/maps") as f:
                out.update(Path(line.split(None, 5)[5].strip()) for line in f
                           if f" {SHM}/" in line and len(line.split(None, 5)) == 6)
        except (OSError, ValueError):
            continue
    return out


def _port_of(buffer: Path) -> str:
    """The rendezvous port in a buffer's name, deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>."""
    return buffer.name.rsplit("_", 2)[-2]


def _live_ports() -> set[str]:
    """The MASTER_PORT of every live rank (a process whose environment names its RANK, as DeepSpeed's launcher
    gives each): a buffer on one of these ports belongs to a job still running, such as a concurrent test
    session's whose ranks have not mapped each other's buffers yet. This test's ended jobs have no live rank by
    now, and a shell or test runner that merely exports MASTER_PORT protects nothing."""
    ports = set()
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit() or not _alive(int(entry)):
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if any(v.startswith(b"RANK=") for v in env):
            ports.update(v[len(b"MASTER_PORT="):].decode("ascii", "replace") for v in env
                         if v.startswith(b"MASTER_PORT="))
    return ports


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, which holds no memory, does not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            direct = [int(c) for c in f.read().split()]
    except OSError:
        return []
    return [d for c in direct for d in (*_children(c), c)]


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def tiny_model(seed: int = 0, **overrides) -> LilLM:
    """A debug-shaped model with random weights (vocab shrunk for speed)."""
    torch.manual_seed(seed)
    cfg = ModelConfig.from_preset("debug", **{"vocab_size": 512, **overrides})
    model = LilLM(cfg)
    model.init_weights()
    return model.eval()


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600, env: dict | None = None,
            input: str | None = None) -> subprocess.CompletedProcess:
    """Run `python -m lillm.cli ...` and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "lillm.cli", *args], cwd=cwd or REPO, capture_output=True, text=True,
        timeout=timeout, env={**os.environ, **(env or {})}, input=input,
    )


LAUNCH_PORT = 29500 + os.getpid() % 1000
"""The rendezvous port of `launch`'s multi-rank runs (127.0.0.1)."""


def launch(script: str, args: list[str], ranks: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """A training script through the real `deepspeed` launcher on `ranks` CPU ranks (1: a plain `python`)."""
    if ranks == 1:
        cmd = [sys.executable, script, *args]
    else:
        cmd = [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(LAUNCH_PORT), script, *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=ENV)


def metrics(run_dir: Path, key: str = "train/loss") -> dict[int, float]:
    """{step: value} of one scalar in a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


def run_from_checkpoint(src_run: Path, dst_run: Path, tag: str) -> Path:
    """A new run directory whose only (and latest) checkpoint is `tag` of `src_run`."""
    (dst_run / "checkpoints").mkdir(parents=True)
    shutil.copytree(src_run / "checkpoints" / tag, dst_run / "checkpoints" / tag)
    (dst_run / "checkpoints/latest").write_text(tag)
    return dst_run


@pytest.fixture(scope="session")
def process_group():
    """A one-rank gloo process group in the test process: training runs in-process, without the launcher.
    The environment it was made from is restored at once, so later subprocesses do not inherit it."""
    import torch.distributed as dist

    from lillm.train.dist import init_distributed

    saved = dict(os.environ)
    init_distributed()
    os.environ.clear()
    os.environ.update(saved)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(scope="session")
def small_texts() -> list[str]:
    """A few hundred documents of the built-in corpus."""
    from lillm.data.sources import iter_texts, open_source

    return list(iter_texts(open_source("pydoc"), limit=400))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, small_texts) -> Path:
    """A 1024-token BPE tokenizer trained on part of the built-in corpus, saved to disk."""
    from lillm.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(small_texts, vocab_size=1024, progress=False).save(out)
    return out


@pytest.fixture(scope="session")
def pretrain_shards(tmp_path_factory, tokenizer_dir, small_texts) -> Path:
    """The few hundred documents prepared into train/val shards with the 1024-token tokenizer."""
    import json

    from lillm.data.prepare import prepare
    from lillm.data.sources import open_source

    out = tmp_path_factory.mktemp("pretrain_data")
    src = out / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in small_texts))
    prepare(open_source(str(src)), tokenizer_dir, out / "shards", shard_tokens=50_000, val_fraction=0.1,
            num_workers=1, progress=False)
    return out / "shards"


@pytest.fixture(scope="session")
def chat_base(tmp_path_factory, tokenizer_dir) -> Path:
    """A random debug-shaped model exported with a chat-capable tokenizer: the 'pretrained' starting point."""
    from lillm.hf import export_hf
    from lillm.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    out = tmp_path_factory.mktemp("base") / "hf"
    export_hf(tiny_model(vocab_size=tok.vocab_size, max_seq_len=128), out, tokenizer_dir=tok)
    return out
