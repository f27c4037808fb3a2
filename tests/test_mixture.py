"""Data mixtures: the interleave's shares and counts, stages, exact resume at any world size, and mixture
changes on resume."""

import numpy as np
import pytest

from lillm.data.loader import PackedWindows, PretrainLoader, ShardSet
from lillm.data.mixture import Schedule, Segment, integer_weights, stage_schedule
from lillm.errors import UserError

SEQ, BSZ = 16, 2


def _numbered(root, first, tokens, shard_tokens=8000):
    """Synthetic shards counting up from `first`: a window's first token names its source and place."""
    from lillm.data.prepare import ShardWriter
    from lillm.files import write_json_atomic

    root.mkdir()
    w = ShardWriter(root, "train", "0000abcd", shard_tokens, np.dtype(np.uint16), eos_id=65535)
    w.add(np.arange(first, first + tokens, dtype=np.uint16))
    w.flush()
    write_json_atomic(root / "manifest.json", {
        "format_version": 1, "dtype": "uint16", "splits": {"train": w.summary()},
        "tokenizer": {"fingerprint": "synthetic", "vocab_size": 65535},
    })
    return root


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    """'prose': tokens 0..20000 (1247 windows of 16); 'code': tokens 40000..44000 (249 windows), so 'code'
    runs through several epochs in the tests."""
    root = tmp_path_factory.mktemp("mix")
    return {"prose": _numbered(root / "prose", 0, 20000), "code": _numbered(root / "code", 40000, 4000)}


STAGES = [(6, {"prose": 0.8, "code": 0.2}), (10, {"prose": 0.5, "code": 0.5})]


def _loaders(dirs, world, stages=STAGES, workers=1, accum=2):
    shards = {n: ShardSet(d) for n, d in dirs.items()}
    return [PretrainLoader(shards, SEQ, BSZ, r, world, seed=7, num_workers=workers, stages=stages,
                           windows_per_step=BSZ * accum * world) for r in range(world)]


def _run(loaders, batches, state=None):
    """Each rank's first `batches` micro-batches, interleaved in global order; and rank 0's state after."""
    for ld in loaders:
        if state is not None:
            ld.load_state_dict(state)
    per_rank = []
    for ld in loaders:
        it, got = iter(ld), []
        for _ in range(batches):
            got.append(next(it))
        per_rank.append(got)
    stream = [int(row[0]) for m in range(batches) for r in range(len(loaders)) for row in per_rank[r][m]]
    return stream, loaders[0].state_dict()


def test_integer_weights_are_exact_for_simple_fractions_and_rounded_otherwise():
    assert integer_weights([0.8, 0.2]).tolist() == [4, 1]
    assert integer_weights([3, 1]).tolist() == [3, 1]
    assert integer_weights([1, 1, 1]).tolist() == [1, 1, 1]
    assert integer_weights([0.5, 0.5, 0.0]).tolist() == [1, 1, 0]
    m = integer_weights([np.pi, np.e, 1.0])
    assert m.sum() == 10_000 and np.allclose(m / 1e4, np.array([np.pi, np.e, 1]) / (np.pi + np.e + 1), atol=1e-4)


@pytest.mark.parametrize("trial", range(40))
def test_every_prefix_is_within_one_position_of_its_share(trial):
    rng = np.random.default_rng(trial)
    k = int(rng.integers(2, 7))
    weights = rng.integers(1, 50, size=k).astype(float) if trial % 2 else rng.random(k) + 0.01
    if trial % 5 == 0:
        weights[0] = 0.0
    s = Schedule([f"s{i}" for i in range(k)], [Segment(0, tuple(weights))])
    shares = np.array(list(s.shares(0).values()))
    assert np.allclose(shares, weights / weights.sum(), atol=1e-4)
    n = min(3 * s._periods[0] + 17, 40_000)
    source, own = s.assign(np.arange(n))
    counts = np.zeros((n + 1, k))
    counts[np.arange(1, n + 1), source] = 1
    counts = counts.cumsum(axis=0)
    prefix = np.arange(n + 1)[:, None]
    assert np.abs(counts - prefix * shares).max() < 1  # share within 1/N after every N positions
    for i in range(k):  # each source's own positions are 0, 1, 2 ... in the order it is read
        assert own[source == i].tolist() == list(range(int((source == i).sum())))
    for p in (0, 1, n // 3, n - 1, n):
        assert s.counts(p).tolist() == counts[p].astype(int).tolist()  # the O(1) count, no replay


def test_counts_across_stages_and_assign_agree():
    s = stage_schedule(["a", "b", "c"], [(5, {"a": 1, "b": 1}), (9, {"c": 1}), (12, {"a": 0.2, "b": 0.3, "c": 0.5})],
                       windows_per_step=7)
    assert [seg.start for seg in s.segments] == [0, 35, 63]
    source, own = s.assign(np.arange(200))
    assert set(source[35:63].tolist()) == {2} and set(source[:35].tolist()) == {0, 1}
    for i in range(3):
        assert own[source == i].tolist() == list(range(int((source == i).sum())))
    for p in (0, 34, 35, 36, 63, 64, 199):
        assert s.counts(p).tolist() == [int((source[:p] == i).sum()) for i in range(3)]
    assert s.names == sorted(s.names)  # the config's key order changes nothing


def test_stages_switch_at_the_configured_step_and_sources_cycle_their_epochs(two_sources):
    (loader,) = _loaders(two_sources, 1)
    stream, state = _run([loader], 30)  # 60 windows, 4 per step: steps 0-14
    code = np.array([t >= 40000 for t in stream])
    assert code[:24].sum() == round(24 * 0.2) and code[24:].sum() == 18  # stage 1 ends at step 6 = window 24
    assert state["step"] == 15 and state["position"] == 60
    assert loader.source_progress() == {"code": (23, 23 / 249), "prose": (37, 37 / 1247)}
    # A long run: every window of 'code' once per epoch of it, each epoch in a new order.
    (loader,) = _loaders(two_sources, 1, stages=[(0, {"prose": 1, "code": 3})])
    stream, _ = _run([loader], 400)
    code = [t for t in stream if t >= 40000]
    starts = sorted(40000 + j * SEQ for j in range(249))
    assert sorted(code[:249]) == starts and sorted(code[249:498]) == starts and code[:249] != code[249:498]


@pytest.mark.parametrize("before,after,stop", [(2, 2, 4), (2, 1, 42), (1, 2, 36), (3, 2, 6)])
def test_resume_is_exact_at_any_world_size_across_stages(two_sources, before, after, stop):
    """Stop after `stop` global micro-batches and continue on another number of ranks, with a global batch of
    12 windows per step whatever the world size: stage 1 ends at step 6, micro-batch 36."""
    def loaders(world):
        return _loaders(two_sources, world, accum=6 // world)

    reference, _ = _run(loaders(1), 60)
    code = np.array([t >= 40000 for t in reference])
    assert code[:72].sum() == 14 and code[72:].sum() == 24  # 0.2 of 72 (to within one), then half of 48
    first, state = _run(loaders(before), stop // before)
    second, _ = _run(loaders(after), (60 - stop) // after, state)
    assert first + second == reference


def test_resume_with_new_weights_keeps_each_source_in_place(two_sources):
    said = []
    (loader,) = _loaders(two_sources, 1)
    first, state = _run([loader], 8)  # 16 windows: step 4 of stage 1
    shards = {n: ShardSet(d) for n, d in two_sources.items()}
    changed = PretrainLoader(shards, SEQ, BSZ, seed=7, num_workers=0, stages=[(10, {"prose": 0.0, "code": 1.0})],
                             windows_per_step=4, say=said.append)
    second, _ = _run([changed], 4, state)
    assert len(said) == 1 and "data mixture changed on resume at step 4" in said[0] and "code 1" in said[0]
    # 'code' continues from its own place: its next windows are the ones the first run would have read next.
    (ref,) = _loaders(two_sources, 1, stages=[(0, {"prose": 0, "code": 1})])
    code_order, _ = _run([ref], 40)
    seen = [t for t in first if t >= 40000]
    assert second == code_order[len(seen) : len(seen) + 8]
    # The same change, resumed again later under the same config: no new line, and the exact continuation.
    later_state = changed.state_dict()
    again = PretrainLoader(shards, SEQ, BSZ, seed=7, num_workers=0, stages=[(10, {"prose": 0.0, "code": 1.0})],
                           windows_per_step=4, say=said.append)
    third, _ = _run([again], 2, later_state)
    assert len(said) == 1 and third == code_order[len(seen) + 8 : len(seen) + 12]
    # Unchanged config: no line either.
    (same,) = _loaders(two_sources, 1)
    same.say = said.append
    same.load_state_dict(state)
    assert len(said) == 1


def test_resume_refuses_a_removed_source_or_changed_data(two_sources, tmp_path):
    (loader,) = _loaders(two_sources, 1)
    _, state = _run([loader], 3)
    only = PretrainLoader({"prose": ShardSet(two_sources["prose"])}, SEQ, BSZ, num_workers=0,
                          stages=[(0, {"prose": 1})])
    with pytest.raises(UserError, match="source 'code' .* is not in data.sources now"):
        only.load_state_dict(state)
    single = PretrainLoader(ShardSet(two_sources["prose"]), SEQ, BSZ, num_workers=0)
    with pytest.raises(UserError, match="trained on a mixture of data.sources"):
        single.load_state_dict(state)
    with pytest.raises(UserError, match="trained on one data.dir"):
        loader.load_state_dict(single.state_dict())
    shorter = _numbered(tmp_path / "code", 40000, 3000)
    other = _loaders({"prose": two_sources["prose"], "code": shorter}, 1)[0]
    with pytest.raises(UserError, match="source 'code' .* has 187 windows, 249 when saved"):
        other.load_state_dict(state)
    rewritten = _numbered(tmp_path / "code2", 41000, 4000)  # same size, other bytes
    other = _loaders({"prose": two_sources["prose"], "code": rewritten}, 1)[0]
    with pytest.raises(UserError, match="allow_changed"):
        other.load_state_dict(state)


def test_a_single_source_stream_is_unchanged(two_sources):
    """data.dir reads as before the mixtures: position p is the source's p-th window, in the run seed's order."""
    from lillm.data.loader import SourceWindows, permute

    shards = ShardSet(two_sources["prose"])
    ds = PackedWindows(shards, SEQ, BSZ, seed=3)
    src = SourceWindows(shards, SEQ, seed=3)
    order = permute(np.arange(50), 1247, 3, 0)  # 3 shards: 499 + 499 + 249 windows
    assert (src.window_ids(np.arange(50)) == order).all()
    assert (ds.tokens(np.arange(50))[:, 0] == order // 499 * 8000 + order % 499 * SEQ).all()


def test_equal_mixtures_are_one_segment_and_odd_weights_are_refused_in_the_config():
    from lillm.train.config import DataConfig, SourceConfig, StageConfig

    same = stage_schedule(["a", "b"], [(6, {"a": 0.3, "b": 0.3}), (10, {"a": 1, "b": 1}), (12, {"a": 1, "b": 0})],
                          windows_per_step=4)
    assert [s.start for s in same.segments] == [0, 40]  # 0.3/0.3 then 1/1: one unbroken layout
    rescaled = stage_schedule(["a", "b"], [(10, {"a": 2, "b": 2}), (12, {"a": 5, "b": 0})], step=3, position=12,
                              windows_per_step=4)
    resumed, changed = same.resumed(12, rescaled)
    assert not changed and resumed.to_dict()["segments"] == [[0, [0.3, 0.3]], [40, [5.0, 0.0]]]
    assert integer_weights([1e308, 1e308]).tolist() == [1, 1]
    for sources, match in (({1: SourceConfig("x")}, "not a usable source name"),
                           ({"a": SourceConfig("x", 1e308)}, "weight must be a number from 0 to 1e"),
                           ({"a": SourceConfig("x", 0.0)}, "sum to 0")):
        with pytest.raises(ValueError, match=match):
            DataConfig(sources=sources)
    with pytest.raises(ValueError, match=r"stages\[0\].weights.a must be a number"):
        DataConfig(sources={"a": SourceConfig("x")}, stages=[StageConfig(5, {"a": float("nan")})])
