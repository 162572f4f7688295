"""
Batches of token ids from the shards that base_data_preparer.py wrote.

    loader = TokenDataLoader("data/synthetic-math-10M__bytes", "train", batch_size=16, seq_len=128)
    x, y = loader.next_batch()          # int64 (B, T); y is x shifted by target_offset (default 1)

The split's shards are one logical token stream, read through memory maps: nothing is loaded into RAM up
front, and only the B*T + offset tokens of the current batch are converted to int64.

Order (as build-nanogpt): the stream is cut into chunks of B*T tokens; chunk c starts at token c*B*T.
Every optimizer step the W ranks of a DDP run read chunks c, c+1, ..., c+W-1 (rank r reads chunk c+r) and
then c advances by W. So W ranks with W x fewer micro-steps consume exactly the chunks one process would,
in the same steps. After the last whole chunk the stream starts again at chunk 0 and `epoch` goes up.

Loss mask (with_loss_mask=True, datasets that have one): a float32 (B, T) tensor aligned with y,
1.0 where the target token y is part of an answer, 0.0 for question/prompt tokens and <|endoftext|>.
With score_answer_end=True the <|endoftext|> that directly follows an answer token is 1.0 as well: the end of
the answer is part of it, so an answer-only loss still teaches the model to stop (the trainer's --loss-on answer).

A loader holds its dataset (data_file_utils.hold_dataset: a shared lock) from its creation until close() or until
it is collected: base_data_preparer.py --replace is refused meanwhile, so the shards under its memory maps and
the manifest the next loader reads are the ones it was made with. A new loader whose data differ from those an
open loader of this process reads stops in one line.
"""
import bisect
import mmap
from pathlib import Path

import numpy as np
import torch

from data_file_utils import DataError, Split, hold_dataset, os_error_advice, os_error_reason, release_run_hold

RELEASE_BYTES = 32 << 20  # give back memory-mapped pages we have read past, every 32 MB


class _Shard:
    """One shard file as a read-only memory map (what np.memmap does; kept as our own mmap so that pages
    already read can be released with madvise, so the resident memory does not grow with the data)."""

    def __init__(self, path: Path, dtype, count: int):
        with open(path, "rb") as f:  # the map stays valid after the file is closed
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.array = np.frombuffer(self.map, dtype=dtype, count=count)
        self.released = 0  # bytes [0, released) have been given back

    def release_before(self, nbytes: int, now: bool = False):
        """Drop the mapped pages before byte `nbytes` from this process (they stay in the page cache).
        Done in steps of RELEASE_BYTES, or at once with now=True (we are done with this shard)."""
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        end = nbytes - nbytes % mmap.PAGESIZE
        if end < self.released:  # wrapped around to the start: count again from there
            self.released = 0
        if end <= self.released or (end < self.released + RELEASE_BYTES and not now):
            return
        self.map.madvise(mmap.MADV_DONTNEED, 0, end)
        self.released = end


CHECK_CHUNK = 1 << 24  # values per piece when a shard's ids are checked (32 MB of uint16)
_checked = set()  # (path, size, mtime_ns, limit) of the shards this process has checked already


def _check_values(shard: "_Shard", path: Path, limit: int, what: str, dataset_dir: Path):
    """Every value of the shard must be < limit (token ids: the vocabulary size; mask bytes: 2). Vectorised, in
    pieces, once per process and file version; the pages read are given back afterwards."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, limit)
    if key in _checked or len(shard.array) == 0:
        return
    largest = max(int(shard.array[i:i + CHECK_CHUNK].max()) for i in range(0, len(shard.array), CHECK_CHUNK))
    shard.release_before(len(shard.array) * shard.array.itemsize, now=True)
    if largest >= limit:
        raise DataError(f"shard {path} holds {what} {largest}, outside 0..{limit - 1}; the dataset is damaged: delete "
                        f"{dataset_dir} and prepare the data again")
    _checked.add(key)


class TokenDataLoader:
    def __init__(self, dataset_dir, split, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1,
                 target_offset: int = 1, with_loss_mask: bool = False, device="cpu",
                 score_answer_end: bool = False):
        self.dataset_dir = Path(dataset_dir)
        self.split = Split(split)
        self.B, self.T, self.offset = int(batch_size), int(seq_len), int(target_offset)
        self.rank, self.world_size = int(rank), int(world_size)
        self.with_loss_mask = with_loss_mask
        self.score_answer_end = score_answer_end
        self.device = torch.device(device)
        if self.B < 1 or self.T < 1 or self.offset < 0:
            raise DataError(f"batch size, sequence length must be >= 1 and target offset >= 0, "
                            f"got {self.B}, {self.T}, {self.offset}")
        if not 0 <= self.rank < self.world_size:
            raise DataError(f"rank {self.rank} is not in 0..{self.world_size - 1}")

        self._hold, self.manifest = hold_dataset(self.dataset_dir)  # held for as long as this loader lives
        info = self.manifest["splits"][self.split.value]
        self.vocab_size = int(self.manifest["vocab_size"])
        self.eot_token = int(self.manifest["eot_token"])
        self.tokens = int(info["tokens"])
        self.bytes = int(info["bytes"])
        if with_loss_mask and not self.manifest.get("has_loss_mask"):
            raise DataError(f"{self.dataset_dir} has no loss mask (only synthetic-math and question/answer JSON have "
                            f"one); use --loss-on all or such a dataset")

        sizes = [int(n) for n in info["shard_tokens"]]
        if sum(sizes) != self.tokens or len(sizes) != len(info["shards"]):
            raise DataError(f"{self.dataset_dir}/manifest.json is inconsistent for split {self.split.value}; "
                            f"delete the folder and prepare the data again")
        self._shards = [self._open(name, np.uint16, n) for name, n in zip(info["shards"], sizes)]
        self._masks = [self._open(name, np.uint8, n) for name, n in zip(info["mask_shards"], sizes)] \
            if with_loss_mask else []
        # ids outside the vocabulary would index past the embedding (a CUDA assert) or train unused rows
        for name, shard in zip(info["shards"], self._shards):
            _check_values(shard, self.dataset_dir / name, self.vocab_size, "token id", self.dataset_dir)
        for name, shard in zip(info["mask_shards"] if with_loss_mask else [], self._masks):
            _check_values(shard, self.dataset_dir / name, 2, "loss-mask value", self.dataset_dir)
        self._starts = np.cumsum([0] + sizes)[:-1].tolist()  # first stream position of each shard

        self.chunk_tokens = self.B * self.T
        need = self.chunk_tokens + self.offset
        if self.tokens < need:
            raise DataError(f"the {self.split.value} split of {self.dataset_dir} has {self.tokens:,} tokens, fewer than "
                            f"one batch needs ({self.B} x {self.T} + {self.offset} = {need:,}); lower "
                            f"--micro-batch-size / --seq-len or use more data (e.g. a larger --max-tokens)")
        self.chunks_per_epoch = (self.tokens - self.offset) // self.chunk_tokens  # whole chunks that fit
        self.pin = self.device.type == "cuda"
        self.reset()
        release_run_hold(self.dataset_dir)  # the run's data are held by its loader now

    def close(self):
        """Done reading: drop the memory maps and the hold on the dataset (another command may replace it now)."""
        self._shards, self._masks = [], []
        if self._hold is not None:
            self._hold.close()
            self._hold = None

    def _open(self, name, dtype, count):
        path = self.dataset_dir / name
        expected = count * np.dtype(dtype).itemsize
        damaged = f"the dataset is damaged: delete {self.dataset_dir} and prepare the data again"
        try:
            st = path.stat()
        except FileNotFoundError:
            raise DataError(f"shard {path} is missing; {damaged}") from None
        except OSError as e:
            raise DataError(f"cannot read shard {path} ({os_error_reason(e)}); {os_error_advice(e, 'read')}") from None
        if not path.is_file():
            raise DataError(f"shard {path} is not a file; {damaged}")
        if st.st_size != expected:
            raise DataError(f"shard {path} has {st.st_size:,} bytes, the manifest says {expected:,}; {damaged}")
        try:
            return _Shard(path, dtype, count)
        except OSError as e:
            raise DataError(f"cannot read shard {path} ({os_error_reason(e)}); {os_error_advice(e, 'read')}") from None

    # ------------------------------------------------------------------ position

    def reset(self):
        """Back to the first chunk, epoch 0."""
        self.chunk = 0  # next chunk index of rank 0, counted from the very start (across epochs)

    @property
    def epoch(self) -> int:
        return self.chunk // self.chunks_per_epoch

    @property
    def position(self) -> int:
        """Stream position (token index) where rank 0's next chunk starts."""
        return (self.chunk % self.chunks_per_epoch) * self.chunk_tokens

    def state_dict(self) -> dict:
        """Where the loader is. The same on every DDP rank, so saving rank 0's is enough."""
        return {"position": self.position, "epoch": self.epoch, "chunk": self.chunk, "chunk_tokens": self.chunk_tokens,
                "split": self.split.value, "tokens": self.tokens, "content_hash": self.manifest.get("content_hash")}

    def load_state_dict(self, state: dict):
        if state.get("content_hash") not in (None, self.manifest.get("content_hash")) or \
                state.get("tokens") not in (None, self.tokens):
            raise DataError(f"the saved data position belongs to another dataset than {self.dataset_dir} "
                            f"(prepared again with other settings?); resume with the same data or start a new run")
        if state.get("chunk_tokens") == self.chunk_tokens and "chunk" in state:
            self.chunk = int(state["chunk"])  # exact
        else:  # another micro-batch shape: continue at the next chunk boundary at or after the saved position
            within = -(-int(state["position"]) // self.chunk_tokens)
            self.chunk = int(state["epoch"]) * self.chunks_per_epoch + min(within, self.chunks_per_epoch)

    # ------------------------------------------------------------------ reading

    def _read(self, shards, start: int, n: int, dtype) -> np.ndarray:
        """Tokens [start, start+n) of the split's stream, as `dtype`; may span shards."""
        out = np.empty(n, dtype=dtype)
        i = bisect.bisect_right(self._starts, start) - 1
        done = 0
        while done < n:
            shard = shards[i]
            lo = start + done - self._starts[i]
            take = min(n - done, len(shard.array) - lo)
            out[done:done + take] = shard.array[lo:lo + take]  # converts only this slice
            at_end = lo + take == len(shard.array)
            shard.release_before((lo + take if at_end else lo) * shard.array.itemsize, now=at_end)
            done += take
            i += 1
        return out

    def read(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start+n) of the split's stream (int64), for readers that pick their own spans."""
        return self._read(self._shards, start, n, np.int64)

    def documents(self):
        """(starts, ends): the stream positions of the split's documents, the stream cut at <|endoftext|> (the
        preparer writes one before each document) with the separators left out and empty ones skipped. One pass
        over the stream (train_simcse.py's texts)."""
        eots = np.concatenate([np.flatnonzero(shard.array == self.eot_token) + start
                               for shard, start in zip(self._shards, self._starts)])
        for shard in self._shards:  # done with the pages this pass read
            shard.release_before(len(shard.array) * shard.array.itemsize, now=True)
        ends = np.append(eots[1:], self.tokens)
        keep = ends > eots + 1
        return eots[keep] + 1, ends[keep]

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.pin:
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def next_batch(self):
        """(x, y) or (x, y, mask): x = stream[p : p+B*T], y = stream[p+off : p+off+B*T], as (B, T)."""
        chunk = self.chunk + self.rank
        p = (chunk % self.chunks_per_epoch) * self.chunk_tokens
        self.chunk += self.world_size
        n = self.chunk_tokens
        buf = self._read(self._shards, p, n + self.offset, np.int64)
        x = torch.from_numpy(buf[:n]).view(self.B, self.T)
        y = torch.from_numpy(buf[self.offset:self.offset + n].copy()).view(self.B, self.T)  # no aliasing with x
        out = [self._to_device(x), self._to_device(y)]
        if self.with_loss_mask:
            if self.score_answer_end and self.offset >= 1:
                m = self._read(self._masks, p, n + self.offset, np.float32)  # the mask of x's tokens too
                mask = m[self.offset:]
                before = m[self.offset - 1:self.offset - 1 + n]  # the mask of the token just before each target
                mask = np.where((buf[self.offset:] == self.eot_token) & (before > 0), np.float32(1.0), mask)
            else:
                mask = self._read(self._masks, p + self.offset, n, np.float32)
            out.append(self._to_device(torch.from_numpy(mask).view(self.B, self.T)))
        return tuple(out)

    def __iter__(self):
        while True:
            yield self.next_batch()

    def __repr__(self):
        return (f"TokenDataLoader({self.dataset_dir}, {self.split.value}, B={self.B}, T={self.T}, "
                f"rank={self.rank}/{self.world_size}, offset={self.offset}, tokens={self.tokens:,}, epoch={self.epoch})")
