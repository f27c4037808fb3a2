import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lillm.data.loader import PackedWindows, PretrainLoader, ShardSet, permute, validation_windows
from lillm.data.prepare import prepare, read_manifest, verify
from lillm.data.sources import in_validation, open_source
from lillm.errors import UserError
from lillm.tokenizer import load_tokenizer, train_tokenizer

from .conftest import REPO, run_cli


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, small_texts):
    """The first 200 built-in documents as a .jsonl file, plus a prepared directory of them."""
    root = tmp_path_factory.mktemp("corpus")
    docs = small_texts[:200]
    with open(root / "docs.jsonl", "w") as fh:
        for d in docs:
            fh.write(json.dumps({"text": d}) + "\n")
    return root, docs


@pytest.fixture(scope="module")
def prepared(corpus, tokenizer_dir, tmp_path_factory):
    root, docs = corpus
    out = tmp_path_factory.mktemp("shards")
    prepare(open_source(str(root / "docs.jsonl")), tokenizer_dir, out, shard_tokens=4096, val_fraction=0.1,
            num_workers=2, progress=False)
    return out


def _decode_split(data_dir, split):
    m = read_manifest(data_dir)
    return np.concatenate([np.fromfile(data_dir / s["file"], dtype=m["dtype"]) for s in m["splits"][split]["shards"]])


def test_round_trip_every_document_with_end_of_text(prepared, corpus, tokenizer_dir):
    _, docs = corpus
    tok = load_tokenizer(tokenizer_dir)
    m = read_manifest(prepared)
    for split in ("train", "val"):
        tokens = _decode_split(prepared, split)
        expected = [d for d in docs if in_validation(d, 0.1) == (split == "val")]
        ends = np.flatnonzero(tokens == tok.eos_id)
        assert len(ends) == len(expected) == m["splits"][split]["documents"]
        starts = np.concatenate([[0], ends[:-1] + 1])
        for d, s, e in zip(expected, starts, ends):
            assert tok.decode(tokens[s:e].tolist()) == d
        assert len(tokens) == m["splits"][split]["tokens"] == sum(len(tok.encode(d)) + 1 for d in expected)
    assert 0 < m["splits"]["val"]["documents"] < m["splits"]["train"]["documents"]
    assert m["dtype"] == "uint16" and m["tokenizer"]["fingerprint"] == tok.fingerprint
    assert all(s["tokens"] == 4096 for s in m["splits"]["train"]["shards"][:-1])


def test_shards_are_deterministic_whatever_the_workers(prepared, corpus, tokenizer_dir, tmp_path):
    root, _ = corpus
    for workers in (0, 1):  # the fixture used 2 worker processes
        out = tmp_path / str(workers)
        prepare(open_source(str(root / "docs.jsonl")), tokenizer_dir, out, shard_tokens=4096, val_fraction=0.1,
                num_workers=workers, progress=False)
    manifests = [read_manifest(p) for p in (prepared, tmp_path / "0", tmp_path / "1")]
    for split in ("train", "val"):
        hashes = [[s["sha256"] for s in m["splits"][split]["shards"]] for m in manifests]
        assert hashes[0] == hashes[1] == hashes[2] and hashes[0]


@pytest.mark.parametrize("how", ["script", "module"])
def test_prepare_with_workers_from_an_unguarded_script(prepared, corpus, tokenizer_dir, tmp_path, how):
    # A script that calls prepare(num_workers=2) at its top level, with no `if __name__ == "__main__":`, run
    # as a file and with -m: spawned workers used to run it again and the pool waited forever. It finishes,
    # with the same shards as the fixture's.
    root, _ = corpus
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "unguarded.py").write_text(
        "from lillm.data.prepare import prepare\n"
        "from lillm.data.sources import open_source\n"
        f"prepare(open_source({str(root / 'docs.jsonl')!r}), {str(tokenizer_dir)!r}, {str(tmp_path / 'out')!r}, "
        "shard_tokens=4096, val_fraction=0.1, num_workers=2, progress=False)\n"
        "print('finished')\n")
    cmd = [sys.executable, str(pkg / "unguarded.py")] if how == "script" else [sys.executable, "-m", "pkg.unguarded"]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path)])})
    assert r.returncode == 0 and r.stdout.count("finished") == 1, r.stderr[-2000:]
    theirs, ours = read_manifest(prepared), read_manifest(tmp_path / "out")
    assert [s["sha256"] for s in ours["splits"]["train"]["shards"]] == \
        [s["sha256"] for s in theirs["splits"]["train"]["shards"]]


def test_verification_is_shared_by_the_ranks_recorded_and_reused(prepared, tmp_path, monkeypatch):
    import shutil

    import lillm.data.prepare as prep
    from lillm.data.loader import verify_once

    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    hashed = []
    real = prep.file_sha256
    monkeypatch.setattr(prep, "file_sha256", lambda f: (hashed.append(Path(f).name), real(f))[1])
    shards = sorted(s["file"] for split in read_manifest(data)["splits"].values() for s in split["shards"])
    assert len(shards) >= 3
    record = tmp_path / "run/data-verified.json"
    record.parent.mkdir()
    # Two ranks: each hashes its own part, and between them every shard exactly once.
    lines = [verify_once(data, record, rank, 2, lambda p: [p, ""]) for rank in (1, 0)]
    assert sorted(hashed) == shards and "split over 2 rank(s)" in lines[1]
    assert json.loads(record.read_text())["ranks"] == 2
    # A later start of the run on unchanged shards reuses the record; a shard written since is hashed again.
    hashed.clear()
    assert "recorded in" in verify_once(data, record, 0, 1, lambda p: [p]) and hashed == []
    damaged = data / shards[-1]
    raw = bytearray(damaged.read_bytes())
    raw[10] ^= 1
    damaged.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=f"{shards[-1]}: sha256 mismatch"):
        verify_once(data, record, 0, 1, lambda p: [p])
    # Another rank's finding stops this rank too, with that rank's message.
    with pytest.raises(UserError, match="rank 1 found this"):
        verify_once(prepared, tmp_path / "other.json", 0, 2, lambda p: [p, "rank 1 found this"])
    assert not (tmp_path / "other.json").exists()


def test_tokenizer_is_deterministic_and_loads_in_transformers(small_texts, tokenizer_dir, tmp_path):
    again = train_tokenizer(small_texts, vocab_size=1024, progress=False).save(tmp_path)
    assert (again / "tokenizer.json").read_bytes() == (tokenizer_dir / "tokenizer.json").read_bytes()
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok = load_tokenizer(tokenizer_dir)
    for text in small_texts[:20] + ["héllo wörld 🙂", "  spaces\tand\nlines"]:
        assert hf.encode(text) == tok.encode(text)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2+2?"}]
    for gen in (False, True):
        ids = hf.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        assert list(ids) == tok.encode_chat(msgs, add_generation_prompt=gen)


def test_permutation_is_a_bijection():
    for n in (1, 2, 7, 1000, 4097):
        for epoch in (0, 1):
            p = permute(np.arange(n), n, seed=3, epoch=epoch)
            assert sorted(p.tolist()) == list(range(n))
    assert not np.array_equal(permute(np.arange(1000), 1000, 3, 0), permute(np.arange(1000), 1000, 3, 1))


def _collect(loader, batches):
    out = []
    for i, b in enumerate(loader):
        out.append(b)
        if i + 1 == batches:
            break
    return out


@pytest.fixture(scope="module")
def numbered(tmp_path_factory):
    """Synthetic shards whose tokens count up, so a window's first token names it: 3 shards, 1247 windows."""
    from lillm.data.prepare import ShardWriter
    from lillm.files import write_json_atomic

    out = tmp_path_factory.mktemp("numbered")
    w = ShardWriter(out, "train", "0000abcd", 8000, np.dtype(np.uint16), eos_id=65535)
    w.add(np.arange(20000, dtype=np.uint16))
    w.flush()
    write_json_atomic(out / "manifest.json", {
        "format_version": 1, "dtype": "uint16", "splits": {"train": w.summary()},
        "tokenizer": {"fingerprint": "synthetic", "vocab_size": 65535},
    })
    return out


def test_read_advice_asks_for_each_micro_batch_ahead_and_changes_no_window(numbered, monkeypatch):
    # With prefetch (the default) the reader advises every map MADV_RANDOM and asks for micro-batch m+1's
    # pages before it reads micro-batch m; the windows are the same as the kernel's defaults give.
    import mmap

    advised = []
    real = mmap.mmap.madvise

    class Spy(mmap.mmap):
        def madvise(self, option, start=0, length=None):
            advised.append(option)
            return real(self, option, start, length) if length is not None else real(self, option)

    monkeypatch.setattr(mmap, "mmap", Spy)
    plain = PretrainLoader(ShardSet(numbered, prefetch=False), 16, 4, seed=3, num_workers=0)
    fetched = PretrainLoader(ShardSet(numbered), 16, 4, seed=3, num_workers=0)
    assert all(torch.equal(a, b) for a, b in zip(_collect(plain, 40), _collect(fetched, 40)))
    assert mmap.MADV_RANDOM in advised and advised.count(mmap.MADV_WILLNEED) >= 41 * 4  # one per window, ahead
    advised.clear()
    _collect(PretrainLoader(ShardSet(numbered, prefetch=False), 16, 4, seed=3, num_workers=0), 3)
    assert advised == []


@pytest.mark.parametrize("world,workers", [(1, 0), (1, 2), (2, 1), (2, 3), (3, 2)])
def test_ranks_and_workers_cover_each_epoch_exactly_once(numbered, world, workers):
    shards = ShardSet(numbered)
    seq, bsz = 16, 4
    n = PackedWindows(shards, seq, bsz).num_windows
    assert n == 2 * (7999 // 16) + 3999 // 16
    batches = -(-2 * n // (bsz * world))  # a little over two epochs
    seen = []
    for rank in range(world):
        loader = PretrainLoader(shards, seq, bsz, rank, world, seed=5, num_workers=workers)
        seen.append([b for b in _collect(loader, batches)])
    # Interleave ranks in global micro-batch order and name each window by its start offset.
    stream = [int(row[0]) for m in range(batches) for r in range(world) for row in seen[r][m]]
    starts = {int(shards.tokens[:i].sum()) + j * seq for i in range(3) for j in range((shards.tokens[i] - 1) // seq)}
    assert sorted(stream[:n]) == sorted(starts)  # epoch 0: every window once, on exactly one rank
    assert sorted(stream[n : 2 * n]) == sorted(starts)  # epoch 1: again, in a new order
    assert stream[:n] != stream[n : 2 * n]
    for r in range(world):  # ranks are disjoint within the epoch
        for r2 in range(r + 1, world):
            mine = {int(x[0]) for b in seen[r] for x in b}
            theirs = {int(x[0]) for b in seen[r2] for x in b}
            assert len(mine) > 0 and (mine & theirs) <= set(stream[n:])
    row = seen[0][0][0]
    assert len(row) == seq + 1 and (np.diff(row.numpy()) == 1).all()  # contiguous seq_len + 1 tokens


@pytest.mark.parametrize("ending", ["open iterator", "exception"])
def test_process_with_loader_workers_exits_promptly(numbered, ending):
    """A script that ends (or raises) with an iterator still open must not hang at exit: the workers ignore
    SIGTERM, and multiprocessing's exit handler would otherwise join them forever."""
    script = (
        "import sys\n"
        "from lillm.data.loader import PretrainLoader, ShardSet\n"
        f"batches = iter(PretrainLoader(ShardSet({str(numbered)!r}), 16, 4, num_workers=2))\n"
        "next(batches)\n"
        + ("raise IndexError('injected')\n" if ending == "exception" else "")
    )
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == (1 if ending == "exception" else 0), r.stderr
    assert time.perf_counter() - t < 30  # imports included; it hung until killed before


def test_global_stream_matches_rank_assignment(prepared):
    shards = ShardSet(prepared)
    seq, bsz, world = 32, 3, 2
    glob = PackedWindows(shards, seq, bsz, seed=1)
    for rank in range(world):
        loader = PretrainLoader(shards, seq, bsz, rank, world, seed=1, num_workers=2)
        got = _collect(loader, 5)
        for m, batch in enumerate(got):
            q = m * world + rank
            expect = glob.tokens(np.arange(q * bsz, (q + 1) * bsz))
            assert np.array_equal(batch.numpy(), expect)


def _stream(shards, world, batches_per_rank, state=None):
    """Run `world` ranks for some micro-batches; return the global stream of windows and the state."""
    loaders = [PretrainLoader(shards, 16, 2, r, world, seed=9, num_workers=1) for r in range(world)]
    if state is not None:
        for ld in loaders:
            ld.load_state_dict(state)
    per_rank = [_collect(ld, batches_per_rank) for ld in loaders]
    stream = []
    for m in range(batches_per_rank):
        for r in range(world):
            stream.extend(tuple(x.tolist()) for x in per_rank[r][m])
    return stream, loaders[0].state_dict()


@pytest.mark.parametrize("before,after", [(1, 1), (2, 2), (2, 1), (1, 2), (3, 2)])
def test_resume_continues_the_global_stream_at_any_world_size(prepared, before, after):
    shards = ShardSet(prepared)
    reference, _ = _stream(shards, 1, 36)
    first, state = _stream(shards, before, 12 // before)
    assert state["position"] == 24
    second, _ = _stream(shards, after, 12 // after, state)
    assert first + second == reference[:48]


def test_validation_windows_are_fixed(prepared):
    shards = ShardSet(prepared, "val")
    a = list(validation_windows(shards, 16, 2, 5))
    b = list(validation_windows(shards, 16, 2, 5))
    assert len(a) == 5 and all((x == y).all() for x, y in zip(a, b))
    split = [list(validation_windows(shards, 16, 2, 5, rank, 2)) for rank in range(2)]
    assert len(split[0]) == 3 and len(split[1]) == 2
    assert all((x == y).all() for x, y in zip(a, [split[q % 2][q // 2] for q in range(5)]))


def _mixture_windows(mix_dirs):
    """A two-source mixture's global stream (rank 0 of 1), stages at 8 and 20 steps of 4 windows."""
    from lillm.data.mixture import stage_schedule

    schedule = stage_schedule(sorted(mix_dirs), [(8, {"a": 0.7, "b": 0.3}), (20, {"a": 0.25, "b": 0.75})],
                              windows_per_step=4)
    return PackedWindows({n: ShardSet(d) for n, d in mix_dirs.items()}, 16, 2, seed=4, schedule=schedule)


def _accelerate_worker(data_dir, out_dir, phase, mix_dirs=None):
    """One process of an `accelerate` job: the DataLoader path (one source, and a mixture), then PretrainLoader
    resumed by accelerate."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration
    from torch.utils.data import DataLoader

    acc = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(dispatch_batches=False, split_batches=False))
    out = {}
    if phase == "save":
        ds = PackedWindows(ShardSet(data_dir), 16, 2, seed=4)  # rank 0 of 1: accelerate shards it
        rows = []
        for i, batch in enumerate(acc.prepare(DataLoader(ds, batch_size=2))):
            rows.extend(batch.tolist())
            if i == 9:
                break
        out["dataloader"] = rows
        rows = []
        for i, batch in enumerate(acc.prepare(DataLoader(_mixture_windows(mix_dirs), batch_size=2))):
            rows.extend(batch.tolist())
            if i == 19:
                break
        out["mixture"] = rows
    # The documented path: lillm's loader knows its rank; accelerate checkpoints its state with the run's.
    loader = PretrainLoader(ShardSet(data_dir), 16, 2, acc.process_index, acc.num_processes, seed=4, num_workers=1)
    acc.register_for_checkpointing(loader)
    batches = iter(loader)
    if phase == "save":
        [next(batches) for _ in range(3)]
        acc.save_state(os.path.join(out_dir, "state"))
    else:
        acc.load_state(os.path.join(out_dir, "state"))
        batches = iter(loader)
    out["next"] = [next(batches).tolist() for _ in range(3)]
    with open(os.path.join(out_dir, f"{phase}{acc.process_index}.json"), "w") as fh:
        json.dump(out, fh)


def test_accelerate_two_processes_read_each_window_once_and_resume(prepared, numbered, tmp_path):
    mix = {"a": str(prepared), "b": str(numbered)}
    for phase in ("save", "load"):
        script = tmp_path / f"{phase}.py"
        script.write_text(
            f"import sys\nsys.path.insert(0, {str(REPO)!r})\nfrom tests.test_data import _accelerate_worker\n"
            f"_accelerate_worker({str(prepared)!r}, {str(tmp_path)!r}, {phase!r}, {mix!r})\n"
        )
        # torchrun sets RANK/WORLD_SIZE; accelerate's Accelerator(cpu=True) then runs multi-CPU over gloo.
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
        assert r.returncode == 0, r.stderr[-3000:]
    saved = [json.loads((tmp_path / f"save{i}.json").read_text()) for i in range(2)]
    ds = PackedWindows(ShardSet(prepared), 16, 2, seed=4)
    stream = ds.tokens(np.arange(40)).tolist()
    # Same assignment as the native path: micro-batch q goes to rank q % 2.
    for rank in range(2):
        expect = [stream[q * 2 + j] for q in range(rank, 20, 2) for j in range(2)]
        assert saved[rank]["dataloader"] == expect
    flat = [tuple(r) for rk in saved for r in rk["dataloader"]]
    assert len(set(flat)) == len(flat) == 40
    # A mixture through Accelerator.prepare: the same windows as lillm's own ranks read, across a stage switch.
    mixed = _mixture_windows(mix).tokens(np.arange(80)).tolist()
    for rank in range(2):
        assert saved[rank]["mixture"] == [mixed[q * 2 + j] for q in range(rank, 40, 2) for j in range(2)]
    # After accelerate's save_state / load_state, each process continues its stream where it was (with a
    # DataLoader worker reading ahead): micro-batches 6.. of the global stream, rank r taking q % 2 == r.
    for rank in range(2):
        loaded = json.loads((tmp_path / f"load{rank}.json").read_text())
        assert loaded["next"] == saved[rank]["next"]
        assert loaded["next"][0] == stream[(6 + rank) * 2 : (6 + rank) * 2 + 2]


def test_bad_inputs(tmp_path, tokenizer_dir, prepared):
    cases = []
    (tmp_path / "empty.txt").write_text("")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "ok"}\n{"text": oops}\n')
    no_field = tmp_path / "nofield.jsonl"
    no_field.write_text('{"body": "x"}\n')
    missing = str(tmp_path / "missing.jsonl")
    cases.append((["prepare", missing, str(tokenizer_dir), str(tmp_path / "o1")], "no such file"))
    cases.append((["prepare", str(bad_json), str(tokenizer_dir), str(tmp_path / "o2")], "bad.jsonl:2: invalid JSON"))
    cases.append((["prepare", str(no_field), str(tokenizer_dir), str(tmp_path / "o3")], "no text field 'text'"))
    emptydir = tmp_path / "emptycorpus"
    emptydir.mkdir()
    (emptydir / "a.jsonl").write_text("")
    cases.append((["prepare", str(emptydir), str(tokenizer_dir), str(tmp_path / "o4")], "holds no documents"))
    cases.append((["train-tokenizer", str(emptydir), str(tmp_path / "t")], "holds no documents"))
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"caf\xe9 ok")
    cases.append((["prepare", str(binary), str(tokenizer_dir), str(tmp_path / "o5"), "--errors", "strict"],
                  "undecodable bytes"))
    for args, msg in cases:
        r = run_cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert msg in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "o4" / "manifest.json").exists()
    # replace policy: counted, not fatal
    r = run_cli("prepare", str(binary), str(tokenizer_dir), str(tmp_path / "o6"), "--val_fraction", "0")
    assert r.returncode == 0 and "undecodable bytes replaced" in r.stdout
    assert read_manifest(tmp_path / "o6")["totals"]["replaced_documents"] == 1


def test_a_folder_with_empty_files_says_how_many_it_skipped(tmp_path, small_texts, tokenizer_dir):
    folder = tmp_path / "mine"
    folder.mkdir()
    for i, text in enumerate(small_texts[:40]):
        (folder / f"doc{i:02d}.txt").write_text(text)
    (folder / "empty1.txt").write_text("")
    (folder / "empty2.txt").write_text("")
    r = run_cli("train-tokenizer", str(folder), str(tmp_path / "tok"), "--vocab_size", "400")
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert "40 documents" in last and "2 empty file(s) skipped" in last, r.stdout
    assert "\n\n" not in r.stdout, r.stdout  # the tokenizers library's blank lines are gone
    r = run_cli("prepare", str(folder), str(tokenizer_dir), str(tmp_path / "shards"), "--val_fraction", "0")
    assert r.returncode == 0, r.stderr
    assert "2 empty file(s) skipped" in r.stdout.strip().splitlines()[-1], r.stdout


def test_manifest_guards(prepared, tmp_path, small_texts):
    import shutil

    other = train_tokenizer(small_texts[:50], vocab_size=600, progress=False)
    with pytest.raises(UserError, match="another tokenizer"):
        ShardSet(prepared, tokenizer=other)
    with pytest.raises(UserError, match="not enough for one window"):
        PackedWindows(ShardSet(prepared, "val"), 100_000, 1)
    broken = tmp_path / "broken"
    shutil.copytree(prepared, broken)
    m = read_manifest(broken)
    shard = broken / m["splits"]["train"]["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    verify(broken, checksums=False)  # same size: only the checksum sees it
    r = run_cli("shards", str(broken), "--verify", "true")
    assert r.returncode == 2 and "sha256 mismatch" in r.stderr
    shard.write_bytes(bytes(data[:-2]))
    r = run_cli("shards", str(broken))
    assert r.returncode == 2 and "size" in r.stderr
    r = run_cli("prepare", "hf:" + str(tmp_path / "nope"), "x", str(tmp_path / "o"))
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_hub_code_path_on_local_files(corpus, tokenizer_dir, tmp_path):
    root, docs = corpus
    hub = tmp_path / "hubdata"
    hub.mkdir()
    (hub / "train.jsonl").write_text((root / "docs.jsonl").read_text())
    src = open_source("hf:" + str(hub), split="train", streaming=True)
    assert list(src) == docs
    import datasets

    datasets.Dataset.from_dict({"text": docs[:10]}).to_parquet(str(tmp_path / "p.parquet"))
    assert list(open_source(str(tmp_path / "p.parquet"))) == docs[:10]
    datasets.Dataset.from_dict({"text": docs[:5]}).save_to_disk(str(tmp_path / "saved"))
    assert list(open_source(str(tmp_path / "saved"))) == docs[:5]
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs[:3]}),
                                   "test": datasets.Dataset.from_dict({"text": docs[3:5]})})
    splits.save_to_disk(str(tmp_path / "splits"))
    assert list(open_source(str(tmp_path / "splits"))) == docs[:3]
    assert list(open_source(str(tmp_path / "splits"), split="test")) == docs[3:5]
    with pytest.raises(UserError, match="no split 'dev'"):
        list(open_source(str(tmp_path / "splits"), split="dev"))
    # `lillm prepare FOLDER --split test` on the saved DatasetDict, and prepare() on an in-memory Dataset and
    # IterableDataset: the same documents give the same shards.
    r = run_cli("prepare", str(tmp_path / "splits"), str(tokenizer_dir), str(tmp_path / "from_dict"), "--split",
                "test", "--val_fraction", "0", "--shard_tokens", "4096")
    assert r.returncode == 0, r.stderr[-2000:]
    from_dict = read_manifest(tmp_path / "from_dict")
    for i, ds in enumerate((splits["test"], splits["test"].to_iterable_dataset())):
        m = prepare(ds, tokenizer_dir, tmp_path / f"mem{i}", shard_tokens=4096, val_fraction=0, progress=False)
        assert m["totals"]["documents"] == 2
        assert [s["sha256"] for s in m["splits"]["train"]["shards"]] == [
            s["sha256"] for s in from_dict["splits"]["train"]["shards"]]
    with pytest.raises(UserError, match=r"no column 'text' \(has \['body'\]\)"):
        prepare(splits["test"].rename_column("text", "body"), tokenizer_dir, tmp_path / "bad", progress=False)


def test_interrupted_prepare_leaves_no_manifest_and_reruns_cleanly(tokenizer_dir, tmp_path):
    big = tmp_path / "big"
    big.mkdir()
    for i in range(40):
        (big / f"{i:03d}.txt").write_text(f"lorem ipsum dolor sit amet {i} " * 20000)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lillm.cli", "prepare", str(big), str(tokenizer_dir), str(out),
           "--shard_tokens", "20000", "--num_workers", "1"]
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not any(out.glob("train-*.bin")):
        time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert any(out.glob("*.bin")) and not (out / "manifest.json").exists()
    r = run_cli("prepare", str(big), str(tokenizer_dir), str(out), "--shard_tokens", "20000")
    assert r.returncode == 0, r.stderr
    m = verify(out)
    named = {s["file"] for sp in m["splits"].values() for s in sp["shards"]}
    assert {f.name for f in out.glob("*.bin*")} == named
    r = run_cli("prepare", str(big), str(tokenizer_dir), str(out), "--shard_tokens", "20000")
    assert r.returncode == 0 and "already prepared" in r.stdout
    r = run_cli("prepare", str(big), str(tokenizer_dir), str(out), "--shard_tokens", "30000")
    assert r.returncode == 2 and "--overwrite" in r.stderr
    assert verify(out) == m  # nothing lost



def test_huge_documents_are_encoded_in_pieces_to_the_same_ids(corpus, tokenizer_dir, tmp_path, monkeypatch):
    from lillm.data import prepare as prep

    _, docs = corpus
    tok = load_tokenizer(tokenizer_dir)
    text = "\n\n".join(docs[:60]) + "  x  \t y  end"  # paragraphs, doubled spaces, a tab
    for limit in (500, 2000, 7777):
        pieces = prep._pieces(text, limit)
        assert "".join(pieces) == text and max(map(len, pieces)) <= limit and len(pieces) > 1
        assert [i for p in pieces for i in tok.encode(p)] == tok.encode(text), limit
    spaceless = "z" * 3000 + " end"  # no place to cut between tokens: cut at the limit, nothing lost
    assert [len(p) for p in prep._pieces(spaceless, 1000)] == [1000, 1000, 1000, 4]
    # Through prepare: one huge single-line document gives the shards it gives in one piece.
    (tmp_path / "one.txt").write_text(text.replace("\n", " "))
    manifests = []
    for limit in (1 << 30, 1000):
        monkeypatch.setattr(prep, "PIECE_CHARS", limit)
        manifests.append(prepare(open_source(str(tmp_path / "one.txt")), tokenizer_dir, tmp_path / str(limit),
                                 shard_tokens=4096, val_fraction=0, progress=False))
    assert [s["sha256"] for s in manifests[0]["splits"]["train"]["shards"]] == \
        [s["sha256"] for s in manifests[1]["splits"]["train"]["shards"]]
