"""Token shards on disk: a writer of memory-mapped token files with a document index, and a packed, resumable loader.

Layout of a shard directory (written to a temporary name and renamed when complete):

    meta.json             {"format": 1, "dtype": "uint16"|"uint32", "vocab_size", "eos_id", "num_tokens",
                           "num_docs", "shards": [{"tokens": "tokens-00000.bin", "docs": "docs-00000.npy",
                           "mask": "mask-00000.bin" | null, "num_tokens", "num_docs"}], ...writer extras}
    tokens-NNNNN.bin      raw token ids (dtype above), documents back to back, each ending with EOS
    docs-NNNNN.npy        int64 start offset of every document within its shard file
    mask-NNNNN.bin        optional uint8 loss mask per token (1 = train on predicting this token), e.g. SFT

Documents never straddle two shard files. The loader sees all shards as one token stream, cuts it into rows of
`seq_len` tokens, shuffles the rows per epoch with the seed, deals them to ranks, and returns per row:
`input_ids`, `targets` (the next token; -100 at the last token of each document so no target crosses a document
boundary, and where the loss mask is 0), `positions` (restarting at 0 at every document start and at the row
start) and `doc_ids` (0, 1, 2... per document within the row, for block-diagonal attention).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from mellum.data.outputs import check_output_dir, replace_dir

IGNORE_INDEX = -100
FORMAT_VERSION = 1


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in 16 bits, uint32 otherwise."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# ---- writing ----------------------------------------------------------------------------------------------


@dataclass
class ShardWriterConfig:
    shard_tokens: int = 1 << 28  # start a new shard file once this many tokens are written (~512 MiB as uint16)


class ShardWriter:
    """Append tokenized documents; `close()` writes the index and renames the temporary directory into place.

    Use as a context manager: on an exception the temporary directory is removed and nothing is left behind
    that looks like a finished shard directory.
    """

    def __init__(
        self,
        out: str | os.PathLike,
        vocab_size: int,
        eos_id: int,
        force: bool = False,
        config: ShardWriterConfig | None = None,
        extra_meta: dict | None = None,
    ):
        self.out = Path(out)
        check_output_dir(self.out, force, "meta.json")
        self.config = config or ShardWriterConfig()
        self.vocab_size = int(vocab_size)
        self.eos_id = int(eos_id)
        self.dtype = token_dtype(self.vocab_size)
        self.force = force
        self.extra_meta = dict(extra_meta or {})
        self.tmp = self.out.with_name(f".{self.out.name}.tmp-{os.getpid()}")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        self.shards: list[dict] = []
        self.num_tokens = 0
        self.num_docs = 0
        self.has_mask = False
        self._open_shard()

    def _open_shard(self) -> None:
        index = len(self.shards)
        self._tokens_name = f"tokens-{index:05d}.bin"
        self._mask_name = f"mask-{index:05d}.bin"
        self._tokens_file = open(self.tmp / self._tokens_name, "wb")
        self._mask_file = open(self.tmp / self._mask_name, "wb")
        self._doc_starts: list[int] = []
        self._shard_tokens = 0

    def _close_shard(self) -> None:
        self._tokens_file.close()
        self._mask_file.close()
        name_docs = self._tokens_name.replace("tokens-", "docs-").replace(".bin", ".npy")
        np.save(self.tmp / name_docs, np.asarray(self._doc_starts, dtype=np.int64))
        self.shards.append(
            {
                "tokens": self._tokens_name,
                "docs": name_docs,
                "mask": self._mask_name,
                "num_tokens": self._shard_tokens,
                "num_docs": len(self._doc_starts),
            }
        )

    def add(self, ids: Sequence[int] | np.ndarray, mask: Sequence[int] | np.ndarray | None = None) -> None:
        """Append one document. EOS is appended if the ids do not already end with it (mask 1 for it)."""
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise ValueError(f"token id out of range [0, {self.vocab_size})")
        m = np.ones(arr.size, dtype=np.uint8) if mask is None else np.asarray(mask, dtype=np.uint8)
        if m.size != arr.size:
            raise ValueError(f"mask has {m.size} entries for {arr.size} tokens")
        if mask is not None:
            self.has_mask = True
        if arr.size == 0 or arr[-1] != self.eos_id:
            arr = np.append(arr, self.eos_id)
            m = np.append(m, np.uint8(1))
        if self._shard_tokens and self._shard_tokens + arr.size > self.config.shard_tokens:
            self._close_shard()
            self._open_shard()
        self._doc_starts.append(self._shard_tokens)
        self._tokens_file.write(arr.astype(self.dtype).tobytes())
        self._mask_file.write(m.tobytes())
        self._shard_tokens += int(arr.size)
        self.num_tokens += int(arr.size)
        self.num_docs += 1

    def close(self) -> Path:
        """Finish the last shard, write meta.json, and move the directory to its final name."""
        self._close_shard()
        if not self.has_mask:  # all-ones masks carry no information: drop them
            for shard in self.shards:
                (self.tmp / shard["mask"]).unlink()
                shard["mask"] = None
        meta = {
            "format": FORMAT_VERSION,
            "dtype": self.dtype.name,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "num_tokens": self.num_tokens,
            "num_docs": self.num_docs,
            "shards": self.shards,
            **self.extra_meta,
        }
        (self.tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        replace_dir(self.tmp, self.out)  # an earlier output is there only with force=True
        return self.out

    def abort(self) -> None:
        for f in (self._tokens_file, self._mask_file):
            f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# ---- reading ----------------------------------------------------------------------------------------------


class ShardSet:
    """All shards of a directory as one token stream with global document starts (memory-mapped, read-only)."""

    def __init__(self, shard_dir: str | os.PathLike):
        self.dir = Path(shard_dir)
        meta_file = self.dir / "meta.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{self.dir} is not a shard directory (no meta.json); run `mellum data shards`")
        try:
            self.meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:  # cut short by a full disk, edited by hand
            raise ValueError(f"{meta_file} is not valid JSON ({exc}); write the shards again with `mellum data "
                             "shards`") from None
        if not isinstance(self.meta, dict) or self.meta.get("format") != FORMAT_VERSION:
            found = self.meta.get("format") if isinstance(self.meta, dict) else type(self.meta).__name__
            raise ValueError(f"{self.dir}: unsupported shard format {found!r}")
        dtype = np.dtype(self.meta["dtype"])
        self.tokens: list[np.memmap] = []
        self.masks: list[np.memmap | None] = []
        starts = []
        self.offsets = [0]  # global offset of each shard's first token
        for shard in self.meta["shards"]:
            n = shard["num_tokens"]
            self.tokens.append(np.memmap(self.dir / shard["tokens"], dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype))
            mask = shard.get("mask")
            self.masks.append(np.memmap(self.dir / mask, dtype=np.uint8, mode="r", shape=(n,)) if mask and n else None)
            starts.append(np.load(self.dir / shard["docs"]) + self.offsets[-1])
            self.offsets.append(self.offsets[-1] + n)
        self.num_tokens = self.offsets[-1]
        self.doc_starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        self.has_mask = any(m is not None for m in self.masks)
        self.eos_id = int(self.meta["eos_id"])
        self.vocab_size = int(self.meta["vocab_size"])

    @property
    def num_docs(self) -> int:
        return int(self.doc_starts.size)

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens [start, stop) as int64 and their loss mask (uint8), across shard files."""
        out = np.empty(stop - start, dtype=np.int64)
        mask = np.ones(stop - start, dtype=np.uint8)
        pos = start
        while pos < stop:
            s = int(np.searchsorted(self.offsets, pos, side="right")) - 1
            end = min(stop, self.offsets[s + 1])
            lo, hi = pos - self.offsets[s], end - self.offsets[s]
            out[pos - start : end - start] = self.tokens[s][lo:hi]
            if self.masks[s] is not None:
                mask[pos - start : end - start] = self.masks[s][lo:hi]
            pos = end
        return out, mask

    def document(self, index: int) -> np.ndarray:
        """The token ids of one document (EOS included)."""
        start = int(self.doc_starts[index])
        stop = int(self.doc_starts[index + 1]) if index + 1 < self.num_docs else self.num_tokens
        return self.read(start, stop)[0]


def mtp_targets(targets: torch.Tensor, depth: int = 1) -> torch.Tensor:
    """Targets `depth` tokens further ahead (t+1+depth) that never cross a document boundary.

    A target is kept only if every intermediate next-token target is valid, so a -100 anywhere in between
    (the end of a document) masks it. targets [B,L] → [B,L].
    """
    out = targets.clone()
    valid = targets != IGNORE_INDEX
    for _ in range(depth):
        shifted = torch.full_like(out, IGNORE_INDEX)
        shifted[:, :-1] = out[:, 1:]
        out = torch.where(valid, shifted, torch.full_like(out, IGNORE_INDEX))
        valid = out != IGNORE_INDEX
    return out


class PackedLoader:
    """Packed rows of `seq_len` tokens from a shard directory; deterministic given `seed`; resumable exactly.

    Iterating yields dicts of int64 tensors [batch_size, seq_len]: `input_ids`, `targets`, `positions`, `doc_ids`.
    Rows are shuffled per epoch (permutation seeded by `seed + epoch`) and dealt round-robin to ranks, each rank
    getting the same number of rows (the remainder is dropped), so ranks read disjoint data. `epochs=None`
    iterates forever. `state_dict()` after a batch, loaded into a fresh loader, continues with the next batch.
    """

    def __init__(
        self,
        shard_dir: str | os.PathLike,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        epochs: int | None = None,
    ):
        if seq_len < 1 or batch_size < 1:
            raise ValueError("seq_len and batch_size must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.shards = ShardSet(shard_dir)
        self.seq_len, self.batch_size = int(seq_len), int(batch_size)
        self.seed, self.rank, self.world_size, self.epochs = int(seed), int(rank), int(world_size), epochs
        # A row needs seq_len inputs plus one more token for the last target.
        self.num_rows = max(0, (self.shards.num_tokens - 1) // self.seq_len)
        self.rows_per_rank = self.num_rows // self.world_size
        self.batches_per_epoch = self.rows_per_rank // self.batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{shard_dir} holds {self.shards.num_tokens} tokens: too few for one batch of "
                f"{self.batch_size}×{self.seq_len} tokens on each of {self.world_size} ranks"
            )
        self.epoch = 0
        self.step = 0  # batches already returned in this epoch
        self.tokens_seen = 0
        self._order: np.ndarray | None = None

    def __len__(self) -> int:
        return self.batches_per_epoch

    # ---- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_tokens": self.shards.num_tokens,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "seq_len", "batch_size", "world_size", "num_tokens"):
            mine = self.state_dict()[key]
            if state[key] != mine:
                raise ValueError(f"loader state has {key}={state[key]}, this loader has {mine}: cannot resume exactly")
        self.epoch, self.step, self.tokens_seen = int(state["epoch"]), int(state["step"]), int(state["tokens_seen"])
        self._order = None

    # ---- iteration -----------------------------------------------------------------------------------
    def _rows_of_epoch(self) -> np.ndarray:
        if self._order is None or self._order_epoch != self.epoch:
            perm = np.random.default_rng(self.seed + self.epoch).permutation(self.num_rows)
            self._order = perm[self.rank : self.rows_per_rank * self.world_size : self.world_size]
            self._order_epoch = self.epoch
        return self._order

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while self.epochs is None or self.epoch < self.epochs:
            if self.step >= self.batches_per_epoch:
                self.epoch, self.step = self.epoch + 1, 0
                continue
            rows = self._rows_of_epoch()[self.step * self.batch_size : (self.step + 1) * self.batch_size]
            batch = self.batch(rows)
            self.step += 1
            self.tokens_seen += self.batch_size * self.seq_len
            yield batch

    def batch(self, rows: Sequence[int]) -> dict[str, torch.Tensor]:
        """The tensors of the given row indices (no state change)."""
        parts = [self._row(int(r)) for r in rows]
        return {key: torch.from_numpy(np.stack([p[key] for p in parts])) for key in parts[0]}

    def _row(self, row: int) -> dict[str, np.ndarray]:
        L = self.seq_len
        start = row * L
        tokens, mask = self.shards.read(start, start + L + 1)  # [L+1]
        starts = self.shards.doc_starts
        # Which positions of [start, start+L] begin a document.
        lo, hi = np.searchsorted(starts, [start, start + L + 1])
        is_start = np.zeros(L + 1, dtype=bool)
        is_start[starts[lo:hi] - start] = True
        begins = is_start[:L].copy()
        begins[0] = True  # a row starting mid-document restarts positions too
        idx = np.arange(L)
        segment_start = np.maximum.accumulate(np.where(begins, idx, 0))
        positions = idx - segment_start
        doc_ids = np.cumsum(begins) - 1
        targets = tokens[1:].copy()
        # The last token of a document (the next one starts a document) predicts nothing; nor do masked targets.
        targets[is_start[1:]] = IGNORE_INDEX
        targets[mask[1:] == 0] = IGNORE_INDEX
        return {
            "input_ids": tokens[:L],
            "targets": targets,
            "positions": positions.astype(np.int64),
            "doc_ids": doc_ids.astype(np.int64),
        }
