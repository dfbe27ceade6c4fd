"""The native backend: runs a `mellum.model.Transformer` in-process over token ids, with the KV and prefix caches,
chunked prefill, batched decoding, speculative decoding (prompt lookup or MTP) and int8 weights on CPU."""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
from dataclasses import dataclass, fields
from typing import Callable, Sequence as Seq

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from mellum.checkpoint import DTYPES
from mellum.engine import cpu_kernels
from mellum.engine.api import GenerationResult
from mellum.engine.kernels import KernelChooser, fuse_projections, fuse_state_dict, split_linears
from mellum.engine.kv_cache import KVCache
from mellum.engine.prefix_cache import PrefixCache
from mellum.engine.sampling import (PositionNoise, SamplingParams, constrain, draw, make_generator, probabilities,
                                    sample, token_ids)
from mellum.engine.scheduler import Scheduler, Sequence
from mellum.engine.speculative import DraftLength, NgramDrafter, accept_coupled, accept_greedy

SPECULATIVE_MODES = (None, "lookup", "mtp")
_EAGER_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def layer_loop(model, ids: torch.Tensor, positions: torch.Tensor, view, last_only: bool):
    """The transformer's forward (mellum.model.Transformer) computing logits only where needed:
    [B, T] ids → (logits [B, 1 or T, V], hidden [B, T, C]). Long prefills skip T×V output-head work."""
    x = model.embed_tokens(ids)  # [B, T, C]
    positions, inputs = model.layer_inputs(positions, None, view, ids.shape, x.dtype)
    for layer in model.layers:
        x, _ = layer(x, *inputs[layer.layer_type], positions, view)
    out = x[:, -1:] if last_only else x
    return model.lm_head(model.norm(out)), x


@functools.cache
def compiled_layer_loop() -> Callable:
    """`layer_loop` under torch.compile with dynamic shapes, one for the process: the model is an argument, so the
    engines of one process share its compiled graphs (a new graph per model structure or token count, not per engine
    or key length: tests/engine/test_compiled_step.py), within dynamo's limit of 8 per function."""
    return torch.compile(layer_loop, dynamic=True)


@dataclass
class EngineOptions:
    """Budgets and knobs of the native engine (token counts unless named otherwise)."""

    max_batch: int = 4  # concurrent sequences (cache rows); fewer when the KV cache budget holds fewer
    kv_cache_mb: float | None = None  # KV cache budget; None: a quarter of the machine's memory on CPU, unbounded on GPU
    max_seq_len: int | None = None  # tokens per sequence; None: the model's context, at most 8192
    prefill_chunk: int | None = None  # prompt tokens per prefill forward (between decode steps); None: 512 CPU, 2048 GPU
    first_chunk: int | None = None  # tokens of a cold prompt's first chunk (causal, no mask); None: prefill_chunk if
    # that is set, else 2048 CPU / 8192 GPU
    prefix_cache_mb: float = 256.0  # byte budget of the cross-request prefix cache (0 turns off all reuse across requests)
    block_tokens: int = 16  # prefix-cache granularity
    ring_slack: int = 64  # extra ring entries of sliding layers (speculative rollback, prefix-cache copy-out)
    speculative: str | None = "lookup"  # None | "lookup" (prompt n-grams) | "mtp" (the model's MTP layer)
    max_draft: int = 8  # longest prompt-lookup draft
    max_mtp_draft: int = 2  # longest MTP draft: the MTP layer chained on its own hidden state after the first token
    min_ngram: int = 2
    max_ngram: int = 4
    cuda_graphs: bool = True  # replay captured graphs for single-sequence decode steps on CUDA
    fused_decode: bool = True  # CPU: forwards of up to 16 tokens (decode, verify) through the fused C++ forward
    # KV cache element type; None: the compute dtype. torch.float16 (or "float16") on CPU halves the bytes attention
    # reads per decode step and the cache's memory (llama.cpp's default cache type); keys and values are then rounded
    # to fp16, so greedy tokens may differ from an fp32 cache's where two logits nearly tie.
    kv_dtype: torch.dtype | str | None = None


class NativeEngine:
    """In-process inference over token ids; `generate` is thread-safe and requests are batched continuously.

    The engine takes the model over: it is moved to `device`, its parameters cast to `dtype`, and with
    `quantize="int8"` its linear layers are replaced in place. `newline_ids`: ids whose text contains a newline
    (for `SamplingParams.max_lines`); the engine never sees text.
    """

    def __init__(self, model, config=None, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 quantize: str | None = None, compile: bool = False, newline_ids: Seq[int] = (), **options):
        known = {f.name for f in fields(EngineOptions)}
        unknown = set(options) - known
        if unknown:
            raise ValueError(f"unknown engine options {sorted(unknown)}; known: {sorted(known)}")
        self.options = opts = EngineOptions(**options)
        if opts.speculative not in SPECULATIVE_MODES:
            raise ValueError(f"speculative must be one of {SPECULATIVE_MODES}, got {opts.speculative!r}")
        self.config = config = config if config is not None else model.config
        if opts.speculative == "mtp" and not getattr(config, "num_mtp_layers", 0):
            raise ValueError("speculative='mtp' needs a model with an MTP layer (config.num_mtp_layers = 1)")
        if quantize not in (None, "int8"):
            raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
        self.device = torch.device(device)
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.dtype = dtype
        # Parameters take the compute dtype; buffers (rotary frequencies) stay fp32 for long-context accuracy.
        self.model = model.to(device=self.device).eval()
        for param in self.model.parameters():
            if param.is_floating_point():
                param.data = param.data.to(dtype)
        fuse_projections(self.model)  # one product for q/k/v and one for gate/up
        if self.device.type == "cpu":
            # Mellum's decode kernels and fused decoder (built once, ~30 s); PyTorch's products if unavailable.
            if cpu_kernels.load(quiet=False):
                for module in self.model.modules():
                    if hasattr(module, "decode_attention"):
                        module.decode_attention = cpu_kernels.decode_attention
        if quantize == "int8":
            from mellum.engine.quant import quantize_int8

            # Experts too on CPU; the CUDA graphs' sync-free expert path reads float expert weights.
            quantize_int8(self.model, experts=self.device.type == "cpu")
        self._split, self._choosers, self._parallel = None, {}, True
        if quantize is None and self.device.type == "cpu" and torch.get_num_threads() > 1:
            # Decode products over all cores, kept only while they are faster (mellum.engine.kernels); one chooser
            # per step size (1, 2-4, 5-16, more tokens), so that compared steps do the same work.
            self._split = split_linears(self.model)
        if opts.first_chunk is None:  # an explicit prefill_chunk also sizes the first chunk
            opts.first_chunk = opts.prefill_chunk or (8192 if self.device.type == "cuda" else 2048)
        if opts.prefill_chunk is None:
            opts.prefill_chunk = 2048 if self.device.type == "cuda" else 512
        self.kv_dtype = self._kv_dtype(opts.kv_dtype)
        self.vocab_size = config.vocab_size
        self.max_len = opts.max_seq_len or min(config.max_position_embeddings, 8192)
        self.newline_ids = frozenset(int(i) for i in newline_ids)
        # Cache layers: the main layers, plus the MTP layer (index num_layers) when it drafts.
        n_layers = config.num_layers + (1 if opts.speculative == "mtp" else 0)
        self.windows = [config.window(i) for i in range(n_layers)]
        slack = max(opts.ring_slack, opts.max_draft + 1, 2 * opts.block_tokens)
        opts.max_batch = self._fit_rows(config, slack)
        self.cache = KVCache(self.windows, rows=opts.max_batch, max_len=self.max_len,
                             num_kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=self.kv_dtype,
                             device=self.device, slack=slack,
                             separate_layers=tuple(range(config.num_layers, n_layers)))
        self.prefix_cache = PrefixCache(int(opts.prefix_cache_mb * 2**20), opts.block_tokens, self.windows,
                                        mtp_layer=config.num_layers if opts.speculative == "mtp" else None)
        self._resident: dict[int, Sequence] = {}  # row → the last request that ran there (its KV stays until reused)
        self._layered = hasattr(self.model, "layers") and hasattr(self.model, "layer_inputs")
        self._forward_layers = self._layers_forward
        graphs = opts.cuda_graphs and self.device.type == "cuda" and self._layered
        compiled = None
        if compile:
            compiled = functools.partial(compiled_layer_loop(), self.model)
            if not graphs:
                self._forward_layers = compiled
        self._fused = self._fused_mtp = None
        if opts.fused_decode and self.device.type == "cpu" and self._layered:
            from mellum.engine.fused import FusedDecoder

            self._fused, why = FusedDecoder.build(self.model, self.cache)
            self.fused_status = why or "in use"
            if self._fused is not None and opts.speculative == "mtp":  # the draft layer fused too
                self._fused_mtp, _ = FusedDecoder.build(self.model, self.cache, mtp=True)
        else:
            self.fused_status = ("off (fused_decode=False)" if not opts.fused_decode
                                 else "not on CPU" if self.device.type != "cpu" else "not a mellum Transformer")
        # Steps on all cores or on one, by measurement (`_forward`), wherever there are cores to choose between.
        self._choose_threads = (self.device.type == "cpu" and torch.get_num_threads() > 1
                                and (self._split is not None or self._fused is not None))
        self._graphs = None
        if graphs:
            from mellum.engine.cuda_graphs import GraphedDecode

            # With compile=True the graphs replay the compiled step (its fused kernels); long prefill chunks stay
            # eager.
            self._graphs = GraphedDecode(self, step=compiled)
        self.scheduler = Scheduler(self, opts.max_batch, speculative=opts.speculative is not None)

    def _kv_dtype(self, kv_dtype) -> torch.dtype:
        """The cache's element type: the compute dtype, or float16 beside fp32 compute on CPU."""
        if kv_dtype is None:
            return self.dtype
        if isinstance(kv_dtype, str):
            if kv_dtype not in DTYPES:
                raise ValueError(f"unknown kv_dtype {kv_dtype!r}; use one of {', '.join(DTYPES)}")
            kv_dtype = DTYPES[kv_dtype]
        if kv_dtype != self.dtype and not (self.device.type == "cpu" and kv_dtype == torch.float16
                                           and self.dtype == torch.float32):
            raise ValueError(f"kv_dtype {kv_dtype} with compute dtype {self.dtype} on {self.device.type}: only the "
                             "compute dtype, or float16 beside float32 on CPU")
        return kv_dtype

    def _fit_rows(self, config, slack: int) -> int:
        """Cache rows that fit the KV budget (at most max_batch). A Mellum-4B row of 8,192 tokens holds 6 GB of fp32
        KV on a CPU, so four rows would not fit beside the weights on most machines: the engine runs fewer
        concurrent sequences (later requests queue) and says so."""
        opts = self.options
        budget_mb = opts.kv_cache_mb
        if budget_mb is None and self.device.type == "cpu":
            try:
                budget_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 4 / 2**20
            except (ValueError, OSError, AttributeError):  # not reported on this platform: no limit
                budget_mb = None
        if budget_mb is None:
            return opts.max_batch
        row_bytes = KVCache.row_nbytes(self.windows, self.max_len, config.num_kv_heads, config.head_dim,
                                       self.kv_dtype, slack)
        rows = min(opts.max_batch, int(budget_mb * 2**20 // row_bytes))
        if rows < 1:
            raise ValueError(f"one sequence of {self.max_len} tokens needs {row_bytes / 2**20:,.0f} MB of KV cache, "
                             f"more than the {budget_mb:,.0f} MB budget: lower max_seq_len or raise kv_cache_mb")
        if rows < opts.max_batch:
            print(f"mellum.engine: {rows} concurrent sequence(s) instead of {opts.max_batch}: each needs "
                  f"{row_bytes / 2**20:,.0f} MB of KV cache and the budget is {budget_mb:,.0f} MB (kv_cache_mb)",
                  file=sys.stderr)
        return rows

    @classmethod
    def from_pretrained(cls, path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, **kwargs):
        """Load weights and config from a model directory (see `mellum.load_pretrained`)."""
        from mellum import load_pretrained

        if dtype is None:
            dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        model = load_pretrained(path, dtype=dtype, device=device)
        return cls(model, model.config, device=device, dtype=dtype, **kwargs)

    # ---- public interface -------------------------------------------------------------------------------
    def submit(self, prompt_ids: Seq[int], params: SamplingParams, cancel: threading.Event | None = None,
               on_token: Callable[[int], None] | None = None) -> Sequence:
        """Queue a request and return at once; `seq.done` is set when it finished (see `wait`)."""
        prompt = self._check_prompt(prompt_ids)
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        params.validate_ids(self.vocab_size)
        if params.max_lines is not None and not self.newline_ids:
            raise ValueError("max_lines needs the ids whose text holds a newline: build the engine with newline_ids")
        seq = Sequence(prompt, params, cancel, on_token, self.newline_ids, self.max_len)
        return self.scheduler.submit(seq)

    def wait(self, seq: Sequence) -> GenerationResult:
        # Poll so that a cancel is answered within a step even when the caller's thread is the waiter.
        while not seq.done.wait(0.05):
            if seq.cancel is not None and seq.cancel.is_set():
                self.scheduler.wake()
        if seq.stop_reason == "error" and seq.error is not None:
            raise RuntimeError(f"generation failed: {seq.error}") from seq.error
        return seq.result()

    def generate(self, prompt_ids: Seq[int], params: SamplingParams, cancel: threading.Event | None = None,
                 on_token: Callable[[int], None] | None = None) -> GenerationResult:
        """Generate after `prompt_ids`; blocks until a stop condition. `on_token` runs on the engine thread."""
        return self.wait(self.submit(prompt_ids, params, cancel, on_token))

    @torch.inference_mode()
    def score(self, prompt_ids: Seq[int], target_ids: Seq[int]) -> list[float]:
        """Log-probabilities (nats) of `target_ids` following `prompt_ids`, one per target token, from one uncached
        forward pass (teacher forcing). For evaluation, e.g. how much context raises the likelihood of the right
        line; it runs on the caller's thread beside the scheduler and touches no cache."""
        prompt, target = self._check_ids(prompt_ids, "prompt"), self._check_ids(target_ids, "target")
        if len(prompt) + len(target) > self.max_len:
            raise ValueError(f"score: prompt ({len(prompt)}) and target ({len(target)}) exceed the "
                             f"{self.max_len}-token window")
        ids = torch.tensor([prompt + target], device=self.device)
        logits = self.model(ids[:, :-1]).logits[0, len(prompt) - 1:].float()
        picked = torch.log_softmax(logits, dim=-1).gather(1, ids[0, len(prompt):, None])
        return picked[:, 0].tolist()

    @torch.no_grad()
    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Copy an (unfused, unquantized) model state dict into the engine's weights, e.g. after a training
        step; every key must exist. Call it between requests: cached KV (prefix cache, rows) is dropped."""
        own = self.model.state_dict()
        for key, value in fuse_state_dict(state).items():
            if key not in own:
                raise ValueError(f"load_weights: unexpected key {key!r} (int8 engines are rebuilt instead)")
            own[key].copy_(value.to(own[key].dtype))
        self.prefix_cache.clear()
        self._resident.clear()

    @property
    def busy_slots(self) -> int:
        return self.scheduler.busy_slots

    def close(self) -> None:
        self.scheduler.close()

    def _check_ids(self, ids, what: str) -> list[int]:
        ids = token_ids(ids, what)
        if not ids:
            raise ValueError(f"the {what} is empty: at least one token id is needed")
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"{what} has token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")
        return ids

    def _check_prompt(self, prompt_ids) -> list[int]:
        prompt = self._check_ids(prompt_ids, "prompt")
        if len(prompt) >= self.max_len:
            raise ValueError(f"the prompt has {len(prompt)} tokens but the context window holds {self.max_len} "
                             "(prompt plus at least one generated token): shorten the context before calling the engine")
        return prompt

    # ---- model calls ----------------------------------------------------------------------------------
    def _layers_forward(self, ids: torch.Tensor, positions: torch.Tensor, view, last_only: bool):
        return layer_loop(self.model, ids, positions, view, last_only)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, view, last_only: bool = False,
                 graphs: bool = True):
        """`graphs=False` for prefill chunks: their lengths vary per request, and capturing a graph for each new
        (length, key bucket) costs more than one eager forward, so they replay graphs only of shapes that recur
        (`GraphedDecode.wants_prefill`: a keystroke's few new tokens)."""
        if not self._choose_threads or not graphs:
            return self._forward_once(ids, positions, view, last_only, graphs)
        # A decode or verify step on every core or on one (split products or not; the fused decoder multi- or
        # single-threaded), whichever recent steps ran faster with.
        n = ids.numel()
        chooser = self._choosers.setdefault(0 if n == 1 else 1 if n <= 4 else 2 if n <= 16 else 3, KernelChooser())
        self._parallel = chooser.choose()
        if self._split is not None:
            self._split.enabled = self._parallel
        t0 = time.perf_counter()
        out = self._forward_once(ids, positions, view, last_only, graphs)
        chooser.record(time.perf_counter() - t0)
        return out

    def _fusable(self, fused, ids: torch.Tensor) -> bool:
        """Whether a forward of ids [B, T] runs through `fused` (the main or the MTP decoder): it exists, takes that
        many tokens, and the kernels are loaded."""
        return fused is not None and fused.fits(ids) and cpu_kernels.ready()

    def _forward_once(self, ids: torch.Tensor, positions: torch.Tensor, view, last_only: bool, graphs: bool):
        fused = self._fused
        if self._fusable(fused, ids) and not view.padded:
            # A few tokens: every layer in one C++ call (each row's positions are consecutive in every caller).
            return fused(ids, view.rows, positions[:, 0].tolist(), last_only, one_thread=not self._parallel)
        if (self._graphs is not None and ids.shape[0] == 1 and ids.shape[1] <= self._graphs.MAX_TOKENS
                and (graphs or ids.shape[1] == 1
                     or self._graphs.wants_prefill(view.rows[0], view.kv_len, ids.shape[1], last_only))):
            try:
                return self._graphs.run(view.rows[0], view.kv_len, ids, positions, last_only)
            except RuntimeError as exc:  # capture unsupported by some op: stay eager from now on
                if self._graphs.compiled:  # compilation or its capture failed: graphs of the eager step instead
                    print(f"mellum.engine: the compiled decode step failed ({exc}); capturing the eager step")
                    self._graphs.use_eager_step()
                    return self._forward_once(ids, positions, view, last_only, graphs)
                print(f"mellum.engine: CUDA graphs disabled ({exc})")
                self._graphs = None
        if self._layered:
            if self.device.type == "cuda":
                # cuDNN attention builds a plan per new key length (~50 ms each, measured on H100): eager
                # forwards, whose key length changes every call, use the other SDPA kernels.
                with sdpa_kernel(_EAGER_SDPA):
                    return self._forward_layers(ids, positions, view, last_only)
            return self._forward_layers(ids, positions, view, last_only)
        out = self.model(ids, positions, view)  # any model with the Transformer interface (e.g. test stubs)
        return (out.logits[:, -1:] if last_only else out.logits), out.hidden

    def _mtp(self, hidden: torch.Tensor, next_ids: list[int], start: int, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the MTP layer over positions [start, start + n) of one row (filling its cache): logits [V] and the
        layer's output hidden state [1, 1, C] at the last position (the input of a chained draft)."""
        ids = torch.tensor([next_ids], device=self.device)  # [1, n]
        fused = self._fused_mtp
        if self._fusable(fused, ids):
            logits, out = fused.forward_hidden(self.model.mtp.combine(hidden, ids), [row], [start], True,
                                               one_thread=not self._parallel)
            return logits[0, -1], out[:, -1:]
        positions = torch.arange(start, start + len(next_ids), device=self.device)[None]  # [1, n]
        view = self.cache.view([row], start + len(next_ids))
        logits, out = self.model.mtp(hidden, ids, positions, view, return_hidden=True)
        return logits[0, -1].float(), out[:, -1:]

    def _mtp_draft(self, seq: Sequence, k: int) -> list[int]:
        """Up to k draft tokens from the MTP layer (sampled ones drawn with the noise of their positions).

        The first comes from the MTP logits of the last verified position (main hidden state h_p and token p+1
        predict token p+2, DeepSeek-V3 §2.2). Each further one runs the same layer again one position on, with its
        own output hidden state standing in for the main model's, which is not known before verification (the
        recursive use of one MTP module for longer drafts). Verification decides; the layer's cache entries written
        here are recomputed from the main model's hidden states once the draft is verified."""
        logits, hidden = seq.state["mtp_logits"], seq.state["mtp_hidden"]
        noise = None if seq.params.greedy else seq.state["noise"].take(len(seq.generated), k)  # [k, V]
        draft = []
        for i in range(k):
            if noise is None:
                token = int(torch.argmax(logits))
            else:
                token = int(draw(probabilities(logits[None], seq.params)[0], noise[i]))
            draft.append(token)
            if i + 1 < k:  # MTP at position filled + i: the draft token just made is its "next token" input
                logits, hidden = self._mtp(hidden, [token], seq.filled + i, seq.row)
        return draft

    @staticmethod
    def _noise(seq: Sequence, n: int = 1) -> torch.Tensor | None:
        """The Gumbel noise [n, V] of a sampled request's next n positions; None when greedy."""
        noise = seq.state.get("noise")
        return None if noise is None else noise.take(len(seq.generated), n)

    def _tensor(self, rows: list[list[int]]) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    # ---- runner interface used by the scheduler -------------------------------------------------------
    def start(self, seq: Sequence) -> None:
        """Claim the row: keep the KV its previous request left for a shared prefix, or reset it and copy the
        longest cached prompt prefix into it, whichever covers more of the prompt."""
        seq.generator = make_generator(seq.params, self.device)
        if seq.generator is not None:
            seq.state["noise"] = PositionNoise(seq.generator, self.vocab_size, self.device)
        # The last prompt token is always recomputed: its logits start the generation.
        match = self.prefix_cache.match(seq.prompt, len(seq.prompt) - 1)
        resident = self._resident_prefix(seq)
        if resident and resident >= match.tokens:
            # A keystroke after a request in the same row: nothing to copy (at 4k tokens the copy out of the
            # prefix cache cost about as much as prefilling the new characters on CPU).
            self.cache.forget(seq.row, resident)
            seq.filled = seq.cached = resident
        else:
            self.cache.reset(seq.row)
            self.prefix_cache.load(match, self.cache, seq.row)
            # The MTP layer's entry at the last matched position reads the token after it, which the blocks do not
            # fix (mellum.engine.prefix_cache): prefill from that position, one token more, to recompute it.
            seq.filled = seq.cached = match.tokens - (1 if match.tokens and self.options.speculative == "mtp" else 0)
        self._resident[seq.row] = seq
        if self.options.speculative == "lookup":
            seq.state["drafter"] = NgramDrafter(seq.prompt, self.options.min_ngram, self.options.max_ngram)
            seq.state["draft_len"] = DraftLength(maximum=self.options.max_draft, current=min(4, self.options.max_draft))
        seq.state["mtp"] = self.options.speculative == "mtp"
        if seq.state["mtp"]:
            seq.state["draft_len"] = DraftLength(maximum=max(1, self.options.max_mtp_draft), current=1)

    def _resident_prefix(self, seq: Sequence) -> int:
        """Prompt tokens whose KV the row's previous request left valid: its tokens [0, filled) that the new prompt
        starts with (its generated tokens too, when the user accepted them). Not with MTP drafting (the MTP layer's
        cache has gaps after batched steps), and only when every sliding ring still holds the window before."""
        prev = self._resident.get(seq.row)
        if (prev is None or prev.error is not None or self.options.speculative == "mtp"
                or self.prefix_cache.budget_bytes <= 0):  # a zero budget turns every reuse across requests off
            return 0
        # Accepted drafts after a stop (a stop id, the last line) have KV but are not among the tokens.
        limit = min(prev.filled, len(prev.tokens), len(seq.prompt) - 1)
        common = 0
        old, new = prev.tokens, seq.prompt
        while common < limit and old[common] == new[common]:
            common += 1
        # A sliding layer must hold the window before the reuse point: a ring overwrote older positions, and a load
        # from the prefix cache brought in only the window before its own reuse point.
        for i, layer in enumerate(self.cache.layers):
            if layer.window and self.cache.held_from(i, seq.row, common) > max(0, common - layer.window + 1):
                return 0
        return common

    def prefill_chunk(self, seq: Sequence) -> None:
        t0 = time.perf_counter()
        n = len(seq.prompt)
        a = seq.filled
        # The first chunk of a request is the large one (causal from position 0, or causal after its cached prefix).
        b = min(n, a + (self.options.first_chunk if a == seq.cached else self.options.prefill_chunk))
        ids = self._tensor([seq.prompt[a:b]])  # [1, T]
        positions = torch.arange(a, b, device=self.device)[None]  # [1, T]
        last = b == n
        view = self.cache.view([seq.row], b, fresh=a == 0)
        logits, hidden = self._forward(ids, positions, view, last_only=True, graphs=False)
        seq.filled = b
        if seq.state["mtp"] and not last:
            self._mtp(hidden, seq.prompt[a + 1:b + 1], a, seq.row)
        if not last:
            # Share the chunk at once: when the user types on and this request is cancelled, the next keystroke's
            # request still finds the prompt's prefix prefilled so far.
            self.prefix_cache.insert(seq.prompt, b, self.cache, seq.row, b)
            seq.prefill_s += time.perf_counter() - t0
            return
        token = int(sample(logits[:, -1], seq.params, None, seq.allowed_ids(), self._noise(seq))[0])
        if seq.state["mtp"]:
            seq.state["mtp_logits"], seq.state["mtp_hidden"] = self._mtp(hidden, seq.prompt[a + 1:] + [token], a,
                                                                         seq.row)
        # Blocks ending before the last prompt token: their KV (MTP layer included) depends on prompt tokens only.
        self.prefix_cache.insert(seq.prompt, n - 1, self.cache, seq.row, seq.filled)
        seq.prefilling = False
        seq.prefill_s += time.perf_counter() - t0
        seq.emit(token)

    def decode_step(self, seqs: list[Sequence]) -> None:
        """One token for every sequence in the batch (the last token of each gets its KV)."""
        if len(seqs) == 1 and seqs[0].state.get("mtp"):
            self._verify(seqs[0], [])
            return
        rows = [s.row for s in seqs]
        ids = self._tensor([[s.tokens[-1]] for s in seqs])  # [B, 1]
        positions = self._tensor([[s.filled] for s in seqs])  # [B, 1]
        view = self.cache.view(rows, max(s.filled for s in seqs) + 1)
        logits, _ = self._forward(ids, positions, view, last_only=True)  # [B, 1, V]
        for i, seq in enumerate(seqs):
            seq.state["mtp"] = False  # batched steps do not run the MTP layer; its cache would have gaps
            seq.filled += 1
            try:
                seq.emit(int(sample(logits[i:i + 1, -1], seq.params, None, seq.allowed_ids(), self._noise(seq))[0]))
            except Exception as exc:  # noqa: BLE001 - the request's own callbacks (on_token, allowed_next) failed:
                seq.error, seq.stop_reason = exc, "error"  # it ends alone, not the batch it shares the step with

    def speculative_step(self, seq: Sequence) -> None:
        """Draft, verify in one forward, accept the draft tokens that equal the target's (argmax, or the draw with
        the position's noise when sampling)."""
        room = min(seq.params.max_new_tokens - len(seq.generated), self.max_len - seq.filled - 1) - 1
        if seq.allowed_ids() is not None:  # a constrained token (token healing) is never drafted
            self.decode_step([seq])
            return
        if seq.state.get("mtp"):
            k = min(seq.state["draft_len"].current, room) if room >= 1 else 0
            self._verify(seq, self._mtp_draft(seq, k))
            return
        drafter: NgramDrafter = seq.state.get("drafter")
        if drafter is None:
            self.decode_step([seq])
            return
        drafter.extend(seq.tokens[len(drafter.tokens):])
        draft = drafter.propose(min(seq.state["draft_len"].current, room))
        if not draft:
            self.decode_step([seq])
            return
        self._verify(seq, draft)

    def _verify(self, seq: Sequence, draft: list[int]) -> None:
        """Run [last token, *draft] at positions filled.., accept a prefix, emit it plus one target token."""
        k, start = len(draft), seq.filled
        ids = self._tensor([[seq.tokens[-1]] + draft])  # [1, k+1]
        positions = torch.arange(start, start + k + 1, device=self.device)[None]  # [1, k+1]
        logits, hidden = self._forward(ids, positions, self.cache.view([seq.row], start + k + 1))
        logits = logits[0].float()  # [k+1, V]
        if not k:  # only undrafted steps can be constrained (speculative_step never drafts them)
            logits = constrain(logits, seq.allowed_ids())
        if seq.params.greedy:
            n, token = accept_greedy(draft, logits)
        else:
            n, token = accept_coupled(draft, probabilities(logits, seq.params), self._noise(seq, k + 1))
        seq.filled = start + n + 1  # KV of the last token and the accepted drafts is valid; the rest is masked
        if k:
            seq.draft_tokens += k
            seq.accepted_tokens += n
            if "draft_len" in seq.state:
                seq.state["draft_len"].update(k, n)
        emitted = draft[:n] + [token]
        for t in emitted:
            if seq.emit(t):
                return
        if seq.state.get("mtp"):
            # MTP at position p reads the main model's hidden state at p and token p+1 (mellum.model.mtp).
            seq.state["mtp_logits"], seq.state["mtp_hidden"] = self._mtp(hidden[:, :n + 1], emitted, start, seq.row)
