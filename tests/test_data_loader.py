"""dataloader.py: batches equal the token stream, offsets, masks, wrap-around, resume, DDP order, damage."""
import json
import mmap
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import base_data_preparer as bdp  # noqa: E402
from data_file_utils import DataError, read_manifest, write_manifest  # noqa: E402
from dataloader import TokenDataLoader  # noqa: E402


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    """A small synthetic-math set whose train split spans several shards (batches cross shard boundaries)."""
    d = bdp.prepare("synthetic-math", "bytes", tmp_path_factory.mktemp("data"), max_tokens=60_000,
                    shard_tokens=7_000, num_workers=1, quiet=True)
    assert len(read_manifest(d)["splits"]["train"]["shards"]) >= 8
    return d


def stream(d, split, mask=False):
    info = read_manifest(d)["splits"][split]
    names = info["mask_shards"] if mask else info["shards"]
    return np.concatenate([np.fromfile(Path(d) / n, dtype=np.uint8 if mask else np.uint16) for n in names])


def batches(loader, n):
    return [loader.next_batch() for _ in range(n)]


def same(a, b):
    return len(a) == len(b) and all(all(torch.equal(u, v) for u, v in zip(p, q)) for p, q in zip(a, b))


@pytest.mark.parametrize("offset", [1, 64])
def test_batches_are_the_stream(ds, offset):
    s = stream(ds, "train").astype(np.int64)
    B, T = 4, 96
    loader = TokenDataLoader(ds, "train", B, T, target_offset=offset)
    assert loader.chunks_per_epoch == (len(s) - offset) // (B * T)
    for k in range(loader.chunks_per_epoch + 3):  # a whole epoch and into the next
        x, y = loader.next_batch()
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (B, T)
        p = (k % loader.chunks_per_epoch) * B * T
        assert np.array_equal(x.numpy().ravel(), s[p:p + B * T])
        assert np.array_equal(y.numpy().ravel(), s[p + offset:p + offset + B * T])
        assert torch.equal(y.view(-1)[:-offset], x.view(-1)[offset:])
    assert loader.epoch == 1 and loader.position == 3 * B * T


def test_wraps_to_start_and_counts_epochs(ds):
    loader = TokenDataLoader(ds, "val", 1, 64)
    first = loader.next_batch()
    for _ in range(loader.chunks_per_epoch - 1):
        loader.next_batch()
    assert loader.epoch == 1 and loader.position == 0
    assert same([loader.next_batch()], [first])
    loader.reset()
    assert loader.epoch == 0 and same([loader.next_batch()], [first])


def test_loss_mask_is_aligned_with_targets(ds):
    s, m = stream(ds, "train"), stream(ds, "train", mask=True)
    B, T = 2, 128
    loader = TokenDataLoader(ds, "train", B, T, with_loss_mask=True)
    assert loader.manifest["has_loss_mask"]
    for k in range(20):
        x, y, mask = loader.next_batch()
        p = k * B * T
        assert mask.dtype == torch.float32 and mask.shape == (B, T)
        assert np.array_equal(mask.numpy().ravel(), m[p + 1:p + 1 + B * T].astype(np.float32))
        assert not bool(((y == loader.eot_token) & (mask > 0)).any())  # no loss on the separator
    # semantic check on the stream: after "\nAnswer:" the mask switches on, at <|endoftext|> it switches off
    text = bytes(np.where(s == 256, ord("\x01"), s).astype(np.uint8)).decode("utf-8")
    for i in range(len(text) - 9):
        if text[i:i + 8] == "\nAnswer:":
            assert m[i + 7] == 0 and m[i + 8] == 1
    assert m.sum() > 0.4 * len(m)


def test_resume_gives_identical_batches(ds):
    B, T = 3, 50
    a = TokenDataLoader(ds, "train", B, T, with_loss_mask=True)
    batches(a, 37)
    state = json.loads(json.dumps(a.state_dict()))  # survives a checkpoint (plain JSON types)
    expected = batches(a, 25)  # crosses the end of the epoch
    b = TokenDataLoader(ds, "train", B, T, with_loss_mask=True)
    b.load_state_dict(state)
    assert (b.position, b.epoch) == (state["position"], state["epoch"])
    assert same(batches(b, 25), expected)
    fresh = TokenDataLoader(ds, "train", B, T, with_loss_mask=True)
    assert same(batches(fresh, 3), batches(TokenDataLoader(ds, "train", B, T, with_loss_mask=True), 3))


def test_resume_with_another_micro_batch_continues_at_the_same_token(ds):
    a = TokenDataLoader(ds, "train", 4, 32)
    batches(a, 10)  # position 1280
    b = TokenDataLoader(ds, "train", 2, 32)
    b.load_state_dict(a.state_dict())
    assert b.position == 1280 and torch.equal(b.next_batch()[0].reshape(-1), a.next_batch()[0].reshape(-1)[:64])


def test_resume_refuses_another_dataset(ds, tmp_path):
    other = bdp.prepare("synthetic-math", "bytes", tmp_path, max_tokens=60_000, seed=3, num_workers=1, quiet=True)
    state = TokenDataLoader(ds, "train", 2, 16).state_dict()
    with pytest.raises(DataError, match="another dataset"):
        TokenDataLoader(other, "train", 2, 16).load_state_dict(state)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ddp_ranks_read_what_one_process_reads(ds, world_size):
    """W ranks x k micro-steps == 1 process x W*k micro-steps, step by step, also across the epoch end."""
    B, T = 2, 64
    single = TokenDataLoader(ds, "train", B, T, target_offset=1)
    steps = single.chunks_per_epoch // world_size + 4
    expected = batches(single, steps * world_size)
    ranks = [TokenDataLoader(ds, "train", B, T, rank=r, world_size=world_size) for r in range(world_size)]
    got = []
    for _ in range(steps):
        got.extend(r.next_batch() for r in ranks)
    assert same(got, expected)
    assert {r.position for r in ranks} == {single.position} and ranks[0].state_dict() == single.state_dict()


def test_releasing_read_pages_changes_nothing(ds, monkeypatch):
    import dataloader
    expected = batches(TokenDataLoader(ds, "train", 4, 100, with_loss_mask=True), 300)  # > 1 epoch
    monkeypatch.setattr(dataloader, "RELEASE_BYTES", 4096)  # release after every page
    assert same(batches(TokenDataLoader(ds, "train", 4, 100, with_loss_mask=True), 300), expected)


def test_memory_maps_not_copies(ds):
    loader = TokenDataLoader(ds, "train", 2, 16)
    for shard in loader._shards:
        assert shard.array.dtype == np.uint16 and not shard.array.flags.owndata
        assert isinstance(shard.map, mmap.mmap)  # the tokens stay on disk, mapped
    assert loader.tokens == read_manifest(ds)["splits"]["train"]["tokens"]
    assert loader.bytes == read_manifest(ds)["splits"]["train"]["bytes"]
    assert (loader.vocab_size, loader.eot_token) == (257, 256)


def test_split_too_small_for_one_batch(ds):
    n = read_manifest(ds)["splits"]["val"]["tokens"]
    TokenDataLoader(ds, "val", 1, n - 1)  # exactly enough: T + 1 tokens
    with pytest.raises(DataError, match="lower --micro-batch-size / --seq-len or use more data"):
        TokenDataLoader(ds, "val", 1, n)


def _copy(ds, tmp_path):
    d = tmp_path / ds.name
    shutil.copytree(ds, d)
    return d


def test_shard_size_mismatch_and_missing_shard(ds, tmp_path):
    d = _copy(ds, tmp_path)
    shard = d / read_manifest(d)["splits"]["train"]["shards"][2]
    data = shard.read_bytes()
    shard.write_bytes(data[:-2])
    with pytest.raises(DataError, match=rf"{shard.name} has {len(data) - 2:,} bytes, the manifest says {len(data):,}"):
        TokenDataLoader(d, "train", 2, 16)
    assert shard.exists() and len(shard.read_bytes()) == len(data) - 2  # nothing deleted or "repaired"
    shard.unlink()
    with pytest.raises(DataError, match="is missing"):
        TokenDataLoader(d, "train", 2, 16)
    TokenDataLoader(d, "val", 2, 16)  # the other splits still load
    mask = d / read_manifest(d)["splits"]["val"]["mask_shards"][0]
    mask.write_bytes(mask.read_bytes() + b"\x00")
    with pytest.raises(DataError, match="manifest says"):
        TokenDataLoader(d, "val", 2, 16, with_loss_mask=True)


def test_missing_or_corrupt_manifest(ds, tmp_path):
    with pytest.raises(DataError, match="manifest.json is missing"):
        TokenDataLoader(tmp_path, "train", 2, 16)
    d = _copy(ds, tmp_path)
    (d / "manifest.json").write_text('{"splits": ')
    with pytest.raises(DataError, match="unreadable"):
        TokenDataLoader(d, "train", 2, 16)
    m = read_manifest(ds)
    m["splits"]["train"]["tokens"] += 5
    write_manifest(d, m)
    with pytest.raises(DataError, match="inconsistent"):
        TokenDataLoader(d, "train", 2, 16)
    assert len(list(d.glob("train_*.bin"))) == 2 * len(m["splits"]["train"]["shards"])  # tokens + masks, all kept


def test_token_ids_outside_the_vocabulary_are_refused(ds, tmp_path):
    """A shard with an id >= vocab_size (bytes: 257) would index past the embedding: refused when opened."""
    d = _copy(ds, tmp_path)
    m = read_manifest(d)
    shard = d / m["splits"]["train"]["shards"][3]
    ids = np.fromfile(shard, dtype=np.uint16)
    ids[len(ids) // 2] = 300
    ids.tofile(shard)  # same size: only the values tell
    with pytest.raises(DataError, match=rf"{shard.name} holds token id 300, outside 0..256"):
        TokenDataLoader(d, "train", 2, 16)
    TokenDataLoader(d, "val", 2, 16)  # the other splits are fine
    mask = d / m["splits"]["val"]["mask_shards"][0]
    values = np.fromfile(mask, dtype=np.uint8)
    values[0] = 7
    values.tofile(mask)
    with pytest.raises(DataError, match=rf"{mask.name} holds loss-mask value 7, outside 0..1"):
        TokenDataLoader(d, "val", 2, 16, with_loss_mask=True)


@pytest.mark.parametrize("name", ["../train_000000.bin", "/etc/passwd", "sub/train_000000.bin", "..", "",
                                  ".hidden.bin", 7])
def test_shard_names_must_be_plain_names_in_the_folder(ds, tmp_path, name):
    d = _copy(ds, tmp_path)
    m = read_manifest(d)
    (tmp_path / "train_000000.bin").write_bytes((d / m["splits"]["train"]["shards"][0]).read_bytes())  # a decoy
    m["splits"]["train"]["shards"][0] = name
    write_manifest(d, m)
    with pytest.raises(DataError, match="not a plain file name inside the dataset folder"):
        TokenDataLoader(d, "val", 2, 16)  # refused whichever split is asked for: the manifest is bad


def test_cheap_to_construct(ds):
    import time
    t = time.perf_counter()
    for _ in range(50):
        TokenDataLoader(ds, "val", 2, 32).next_batch()
    assert (time.perf_counter() - t) / 50 < 0.05  # eval loaders are made fresh for every evaluation


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_equal_cpu_batches(ds):
    cpu = TokenDataLoader(ds, "train", 4, 64, with_loss_mask=True)
    gpu = TokenDataLoader(ds, "train", 4, 64, with_loss_mask=True, device="cuda")
    assert gpu.pin
    for _ in range(30):
        a, b = cpu.next_batch(), gpu.next_batch()
        assert all(t.device.type == "cuda" for t in b)
        assert all(torch.equal(u, v.cpu()) for u, v in zip(a, b))
