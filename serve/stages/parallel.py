"""One video's denoising on several ranks: CFG-parallel and Ulysses sequence-parallel CogVideoX.

Every rank holds the whole transformer and runs the same step loop (serve/stages/denoising.py) on the same
latents; rank 0 is the Denoiser replica, the others its worker actors (deployments/denoiser.py), or `torchrun`
processes in the benchmark. With `world = cfg * ulysses` ranks, rank r is CFG branch `r // ulysses` and sequence
shard `r % ulysses`:

- **CFG-parallel** (`cfg: 2`): rank group {c * U + u} for each u. Branch 0 computes the unconditional half of the
  CFG batch, branch 1 the conditional half; the noise predictions are all-gathered (in batch order) and every rank
  combines the guidance and steps the scheduler itself, identically.
- **Ulysses** (`ulysses: U`): rank group {c * U + u} for each c. The patch embedding runs whole on every rank; its
  video tokens are padded with zero rows to a multiple of U and each rank keeps its 1/U (`ShardState`). The text
  tokens (226) stay whole on every rank. Everything in a block but attention is per token, so it runs on the
  shard. Attention: q/k/v of the video shard go through one all-to-all (rank u receives every token of heads
  group u), the padding rows are dropped, the text's q/k/v of that heads group are sliced locally, the rotary
  embedding is applied to the whole video sequence (as in the one-process model), attention runs over
  text + video for H/U heads, and a second all-to-all returns each rank its tokens with all heads; the text's
  output heads are all-gathered. After the last block the output projection's rows are all-gathered and the
  padding dropped, so unpatchify (1.5's temporal patches included) sees the whole sequence.

Step-level decisions are made once for all ranks: rank 0's cancel flag is broadcast before every step, and the
First Block Cache decision is taken from residual sums all-gathered from every rank (padding excluded), so no rank
skips blocks (and their collectives) that another computes. PAB and FasterCache skip by timestep, the same on every
rank. Every collective has the process group's timeout.

No Ray here: `init_distributed` joins a group from an address, the way `torchrun` does.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from serve.config.parallel import ParallelConfig, check_heads


@dataclass
class CommStats:
    """Bytes this rank put on the wire, by collective (the payload of the ideal algorithm: an all-to-all sends
    (U-1)/U of its input, an all-gather and a broadcast root send U-1 copies of the input), and calls."""

    bytes_sent: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, nbytes: int) -> None:
        self.bytes_sent[kind] = self.bytes_sent.get(kind, 0) + int(nbytes)
        self.calls[kind] = self.calls.get(kind, 0) + 1

    def total(self) -> int:
        return sum(self.bytes_sent.values())

    def reset(self) -> None:
        self.bytes_sent.clear()
        self.calls.clear()


def init_distributed(rank: int, world_size: int, address: str, port: int, *, backend: str = "auto",
                     timeout_s: float = 120.0, device: str = "cpu") -> str:
    """Join the default process group (TCP rendezvous at `address:port`, rank 0 listens); returns the backend.
    `timeout_s` bounds every collective, so no rank waits forever on one that died."""
    if backend == "auto":
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    kwargs = {}
    if backend == "nccl":
        kwargs["device_id"] = torch.device(device if torch.device(device).index is not None else "cuda:0")
    dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return backend


@dataclass
class ShardState:
    """The sequence split of the forward pass in progress (set by the patch embedding's hook)."""

    text_tokens: int = 0
    video_tokens: int = 0  # real ones, over all shards
    local: int = 0  # rows per shard (padding included): ceil(video_tokens / U)

    def real_rows(self, shard: int) -> int:
        """Rows of shard `shard` that are real video tokens (the last shards hold the padding)."""
        return max(0, min(self.local, self.video_tokens - shard * self.local))


class ParallelContext:
    """This rank's place in the `cfg x ulysses` mesh, its process groups, and the collectives the loop uses."""

    def __init__(self, plan: ParallelConfig, device: str = "cpu") -> None:
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: call init_distributed first")
        self.plan = plan
        self.world = dist.get_world_size()
        if self.world != plan.world_size:
            raise ValueError(f"the process group has {self.world} ranks but model.parallel needs "
                             f"cfg * ulysses = {plan.world_size}")
        self.rank = dist.get_rank()
        self.device = torch.device(device)
        self.cfg, self.ulysses = plan.cfg, plan.ulysses
        self.cfg_rank, self.sp_rank = divmod(self.rank, self.ulysses)
        # every rank creates every group, in the same order (torch.distributed's rule)
        self.sp_group = self.cfg_group = None
        for c in range(self.cfg):
            group = dist.new_group([c * self.ulysses + u for u in range(self.ulysses)])
            if c == self.cfg_rank:
                self.sp_group = group
        for u in range(self.ulysses):
            group = dist.new_group([c * self.ulysses + u for c in range(self.cfg)])
            if u == self.sp_rank:
                self.cfg_group = group
        self.stats = CommStats()
        self.shard = ShardState()
        # the First Block Cache decisions of the last request: (local ratio, agreed ratio, computed) per step
        self.cache_log: list[tuple[float, float, bool]] = []

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict[str, int]:
        return {"rank": self.rank, "world": self.world, "cfg": self.cfg, "ulysses": self.ulysses,
                "cfg_rank": self.cfg_rank, "sp_rank": self.sp_rank}

    # -- collectives (counted) ------------------------------------------------------------------------------

    def agree(self, flag: bool) -> bool:
        """Rank 0's `flag` on every rank (the cancel decision before a step)."""
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self._comm_device())
        if self.is_leader:
            self.stats.add("broadcast", t.numel() * t.element_size() * (self.world - 1))
        dist.broadcast(t, src=0)
        return bool(t.item())

    def all_gather(self, x: torch.Tensor, group, size: int, kind: str) -> list[torch.Tensor]:
        x = x.contiguous()
        out = [torch.empty_like(x) for _ in range(size)]
        self.stats.add(kind, x.numel() * x.element_size() * (size - 1))
        dist.all_gather(out, x, group=group)
        return out

    def all_to_all(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        """Split dim 0 into U chunks, chunk j to sequence rank j; returns what each rank sent us, in rank order."""
        x = x.contiguous()
        out = torch.empty_like(x)
        self.stats.add(kind, x.numel() * x.element_size() * (self.ulysses - 1) // self.ulysses)
        dist.all_to_all_single(out, x, group=self.sp_group)
        return out

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    # -- CFG ------------------------------------------------------------------------------------------------

    def splits_cfg(self, do_cfg: bool) -> bool:
        return self.cfg > 1 and do_cfg

    def cfg_half(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's half of a CFG batch `[unconditional, conditional]`."""
        return x[self.cfg_rank:self.cfg_rank + 1]

    def gather_cfg(self, noise_pred: torch.Tensor) -> torch.Tensor:
        """Both branches' predictions, `[unconditional, conditional]` as the one-process batch."""
        return torch.cat(self.all_gather(noise_pred, self.cfg_group, self.cfg, "cfg_all_gather"), dim=0)

    # -- Ulysses --------------------------------------------------------------------------------------------

    def install(self, transformer, attention_backend: str = "sdpa") -> None:
        """Make `transformer` run sequence-parallel (no-op for ulysses 1). Call after the attention backend is
        installed (serve.stages.accel.apply_accel), which sets the processors this replaces."""
        if self.ulysses == 1:
            return
        check_heads(self.plan, transformer.config.num_attention_heads, "this transformer")
        for handle in getattr(transformer, "_videogen_parallel_hooks", ()):
            handle.remove()
        transformer._videogen_parallel_hooks = [
            transformer.patch_embed.register_forward_hook(self._shard_tokens),
            transformer.proj_out.register_forward_hook(self._gather_tokens),
        ]
        transformer.set_attn_processor(UlyssesAttnProcessor(self, attention_backend))

    def _shard_tokens(self, module, args, output: torch.Tensor) -> torch.Tensor:
        """patch_embed's output `[text | video]` -> `[text | this rank's video rows]` (zero-padded to U rows)."""
        text_tokens = args[0].shape[1]
        video = output[:, text_tokens:]
        n = video.shape[1]
        local = math.ceil(n / self.ulysses)
        self.shard = ShardState(text_tokens=text_tokens, video_tokens=n, local=local)
        pad = local * self.ulysses - n
        if pad:
            video = F.pad(video, (0, 0, 0, pad))
        mine = video[:, self.sp_rank * local:(self.sp_rank + 1) * local]
        return torch.cat([output[:, :text_tokens], mine], dim=1)

    def _gather_tokens(self, module, args, output: torch.Tensor) -> torch.Tensor:
        """proj_out's rows of this shard -> every video token's, padding dropped (what unpatchify needs)."""
        rows = self.all_gather(output, self.sp_group, self.ulysses, "sp_all_gather_out")
        return torch.cat(rows, dim=1)[:, :self.shard.video_tokens]

    def real(self, video_rows: torch.Tensor) -> torch.Tensor:
        """This shard's rows without padding."""
        if self.ulysses == 1:
            return video_rows
        return video_rows[:, :self.shard.real_rows(self.sp_rank)]

    # -- First Block Cache: one decision for every rank -------------------------------------------------------

    def agree_cache_decisions(self, transformer) -> int:
        """Make every First Block Cache head hook of `transformer` (installed per request) decide from residual sums
        over all ranks (all-gathered, summed in rank order: the same bits everywhere). Returns the hooks patched."""
        from diffusers.hooks.first_block_cache import FBCHeadBlockHook

        self.cache_log = []
        patched = 0
        for module in transformer.modules():
            registry = getattr(module, "_diffusers_hook", None)
            if registry is None:
                continue
            for hook in registry.hooks.values():
                if isinstance(hook, FBCHeadBlockHook):
                    hook._should_compute_remaining_blocks = self._fbc_decider(hook)
                    patched += 1
        return patched

    def _fbc_decider(self, hook) -> Callable[[torch.Tensor], bool]:
        @torch.compiler.disable
        def decide(residual: torch.Tensor) -> bool:
            state = hook.state_manager.get_state()
            prev = state.head_block_residual
            if prev is None:  # the first step computes everything, on every rank
                self.cache_log.append((math.inf, math.inf, True))
                return True
            prev = self.real(prev)
            local = torch.stack([(self.real(residual) - prev).abs().sum(), prev.abs().sum()]).to(torch.float64)
            parts = self.all_gather(local.to(self._comm_device()), None, self.world, "cache_all_gather")
            totals = torch.stack([p.cpu() for p in parts]).sum(dim=0)
            ratio = float(totals[0] / totals[1])
            local_ratio = float(local[0] / local[1])
            computed = ratio > hook.threshold
            self.cache_log.append((local_ratio, ratio, computed))
            return computed

        return decide


class UlyssesAttnProcessor:
    """CogVideoX's joint text+video attention (diffusers' `CogVideoXAttnProcessor2_0`) on a video shard, with the
    heads split across the sequence-parallel ranks; see the module docstring. `backend` pins the SDPA kernel as
    serve.stages.attention does ('sdpa': PyTorch chooses)."""

    def __init__(self, ctx: ParallelContext, backend: str = "sdpa") -> None:
        from serve.stages.attention import SDPA_BACKENDS

        self.ctx = ctx
        self.backend = backend
        self._kernels = None if backend == "sdpa" else [SDPA_BACKENDS[backend]]

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        if attention_mask is not None:
            raise ValueError("sequence-parallel attention takes no attention mask (CogVideoX passes none)")
        ctx = self.ctx
        u, shard = ctx.ulysses, ctx.shard
        text_len = encoder_hidden_states.size(1)
        batch, local = hidden_states.shape[0], hidden_states.shape[1]
        heads = attn.heads
        mine = heads // u
        joint = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        qkv = torch.stack([attn.to_q(joint), attn.to_k(joint), attn.to_v(joint)])  # (3, B, T + L, H * d)
        head_dim = qkv.shape[-1] // heads
        qkv = qkv.view(3, batch, text_len + local, heads, head_dim)
        heads_of_mine = slice(ctx.sp_rank * mine, (ctx.sp_rank + 1) * mine)
        text = qkv[:, :, :text_len, heads_of_mine]  # (3, B, T, H/U, d): the text is on every rank
        # video: (3, B, L, U, H/U, d) -> heads group j to rank j -> (U ranks' rows, 3, B, L, H/U, d)
        video = qkv[:, :, text_len:].reshape(3, batch, local, u, mine, head_dim).permute(3, 0, 1, 2, 4, 5)
        video = ctx.all_to_all(video, "sp_all_to_all_qkv")
        video = video.permute(1, 2, 0, 3, 4, 5).reshape(3, batch, u * local, mine, head_dim)
        video = video[:, :, :shard.video_tokens]  # the padding rows never reach the attention
        q, k, v = (torch.cat([text[i], video[i]], dim=1).transpose(1, 2) for i in range(3))  # (B, H/U, S, d)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if image_rotary_emb is not None:
            q[:, :, text_len:] = apply_rotary_emb(q[:, :, text_len:], image_rotary_emb)
            if not attn.is_cross_attention:
                k[:, :, text_len:] = apply_rotary_emb(k[:, :, text_len:], image_rotary_emb)
        if self._kernels is None:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        else:
            from torch.nn.attention import sdpa_kernel

            with sdpa_kernel(self._kernels):
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2)  # (B, S, H/U, d)
        text_out = torch.stack(ctx.all_gather(out[:, :text_len], ctx.sp_group, u, "sp_all_gather_text"), dim=2)
        text_out = text_out.reshape(batch, text_len, heads * head_dim)
        video_out = out[:, text_len:]
        pad = u * local - shard.video_tokens
        if pad:
            video_out = F.pad(video_out, (0, 0, 0, 0, 0, pad))
        # (B, U * L, H/U, d) -> rows of rank j to rank j -> (U heads groups, B, L, H/U, d) -> (B, L, H * d)
        video_out = video_out.reshape(batch, u, local, mine, head_dim).permute(1, 0, 2, 3, 4)
        video_out = ctx.all_to_all(video_out, "sp_all_to_all_out")
        video_out = video_out.permute(1, 2, 0, 3, 4).reshape(batch, local, heads * head_dim)
        joint = torch.cat([text_out, video_out], dim=1)
        joint = attn.to_out[1](attn.to_out[0](joint))
        encoder_out, video_rows = joint.split([text_len, local], dim=1)
        return video_rows, encoder_out
