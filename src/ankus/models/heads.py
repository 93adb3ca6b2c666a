"""Small heads that sit on a causal LM's hidden states: a scalar value head (PPO,
reward models) and the Q/V heads of ILQL (Snell et al. 2022).

Every head has trlX's shape: Linear(h → 2h) → ReLU → Linear(2h → out)
(trlX ``utils/modeling.py::make_head``). Heads cast incoming hidden states to their own
dtype, so a bf16 body can feed float32 heads (Q/V regression suffers in bf16).

ILQL's Q heads come in two forms: trlX's (``q_head="mlp"``, a vocabulary-wide last layer) and
:class:`UnembeddingQHead` (``q_head="unembedding"``), which reads an MLP's output through the
LM's own frozen unembedding, Q(s, a) = g(h)·W_lm[a] + b[a], with g's last layer and b at zero:
Q starts at 0 for every token (so β·(Q − V) starts as a shift shared by all tokens, which
sampling ignores), a token absent from the data still moves with the tokens near it in the LM's
embedding space, and the trainable part is h x 2h x h instead of 2h x vocab.
"""

from __future__ import annotations

import copy
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

__all__ = ["make_head", "ValueHead", "UnembeddingQHead", "ILQLHeads", "q_at", "output_head_bypassed",
           "save_ilql_heads", "load_ilql_heads"]


@contextmanager
def output_head_bypassed(model: nn.Module) -> Iterator[Callable[[torch.Tensor], bool]]:
    """Within the block the model's output head returns its input, so the model's forward returns
    its final hidden states at the kept positions (B, T, H) where it would return logits (B, T, V);
    the vocabulary-wide logits can then be made a few rows at a time
    (:func:`ankus.losses.ppo.head_logprobs` with ``model.get_output_embeddings()``).

    Yields ``untouched(t)``: whether ``t``, what the forward returned as logits (or a view of it),
    is the head's input itself. It is not when the model transforms its logits after the head
    (Gemma's soft-capping, a logit scale, an upcast of half-precision logits); the head's input is
    then not what the logits are made from, and the caller must run the ordinary forward instead.
    """
    head = model.get_output_embeddings()
    inputs: list[tuple[int, int]] = []  # (storage, version) of what the head was given

    def passthrough(x: torch.Tensor) -> torch.Tensor:
        inputs.append((x.untyped_storage().data_ptr(), x._version))
        return x

    earlier = head.__dict__.get("forward")  # an instance-level forward set by someone else, restored after
    head.forward = passthrough
    try:
        yield lambda t: (t.untyped_storage().data_ptr(), t._version) in inputs  # a new tensor, or changed in place: no
    finally:
        if earlier is None:
            del head.forward
        else:
            head.forward = earlier


def make_head(hidden_size: int, out_size: int) -> nn.Sequential:
    """Two-layer MLP head: Linear(h, 2h) → ReLU → Linear(2h, out)."""
    return nn.Sequential(
        nn.Linear(hidden_size, 2 * hidden_size),
        nn.ReLU(),
        nn.Linear(2 * hidden_size, out_size),
    )


def _gather_positions(hidden_states: torch.Tensor, ixs: torch.Tensor | None) -> torch.Tensor:
    """Pick positions ``ixs`` (B, K) along T of hidden_states (B, T, H) -> (B, K, H)."""
    if ixs is None:
        return hidden_states
    return hidden_states.gather(1, ixs.unsqueeze(-1).expand(-1, -1, hidden_states.shape[-1]))


class ValueHead(nn.Module):
    """Scalar value per position: (B, T, H) hidden states -> (B, T) values."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.head = make_head(hidden_size, 1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.to(self.head[0].weight.dtype)
        return self.head(x).squeeze(-1)  # (B, T)


class UnembeddingQHead(nn.Module):
    """Q(s, ·) = W_lm · g(h) + b on hidden states h: (..., H) -> (..., vocab).

    ``g`` is trlX's MLP shape h → 2h → d (d = the unembedding's width), its last layer and the
    per-token bias ``b`` zero-initialised, so every Q value starts at exactly 0. ``unembedding``
    (vocab, d) is the LM's output embedding, held as a non-persistent buffer: never trained,
    not saved with the heads (:func:`ankus.trainers.ilql.load_ilql` passes the LM's back in), and
    shared, not copied, between a head and its Polyak target (see :class:`ILQLHeads`)."""

    def __init__(self, hidden_size: int, unembedding: torch.Tensor):
        super().__init__()
        self.mlp = make_head(hidden_size, unembedding.shape[1])
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        self.bias = nn.Parameter(torch.zeros(unembedding.shape[0]))
        self.register_buffer("unembedding", unembedding, persistent=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        g = self.mlp(hidden_states)  # (..., d)
        return g @ self.unembedding.to(g.dtype).T + self.bias  # (..., vocab)

    def at(self, hidden_states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Q at the given tokens only: (..., H), (...) long -> (...); d multiply-adds a step."""
        g = self.mlp(hidden_states)  # (..., d)
        return (g * self.unembedding[actions].to(g.dtype)).sum(-1) + self.bias[actions]


def q_at(head: nn.Module, hidden_states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """A Q head's value at the taken tokens only: (..., H), (...) -> (...), without the
    vocabulary-wide output: the rows of the last layer (or of the unembedding) for those tokens.
    Equal to ``head(hidden_states).gather(-1, actions[..., None])[..., 0]``."""
    if isinstance(head, UnembeddingQHead):
        return head.at(hidden_states, actions)
    first, act, last = head
    z = act(first(hidden_states))  # (..., 2H)
    return (z * last.weight[actions]).sum(-1) + last.bias[actions]


class ILQLHeads(nn.Module):
    """ILQL's Q heads (vocab-sized), their Polyak-averaged targets, and the V head.

    Args:
        hidden_size: width of the LM hidden states.
        vocab_size: number of actions (tokens); each Q head outputs one value per token.
        two_qs: keep two Q heads (clipped double-Q: the V target is their targets' min).
        alpha: Polyak weight of the *online* heads in :meth:`sync_target_q_heads`
            (trlX's convention: ``target ← α·Q + (1 − α)·target``; trlX default 0.001,
            so targets move slowly; α = 1 copies the online heads).
        unembedding: optional (vocab, d) frozen LM output embedding; given, the Q heads are
            :class:`UnembeddingQHead` (zero at init) instead of trlX's vocabulary-wide MLPs.

    Target heads are frozen (``requires_grad=False``) deep copies, so an optimizer built
    from ``parameters()`` with a ``requires_grad`` filter never updates them.
    """

    def __init__(self, hidden_size: int, vocab_size: int, two_qs: bool = True, alpha: float = 0.001,
                 unembedding: torch.Tensor | None = None):
        super().__init__()
        self.alpha = alpha
        self.vocab_size = vocab_size
        n_qs = 2 if two_qs else 1
        if unembedding is None:
            self.q_heads = nn.ModuleList(make_head(hidden_size, vocab_size) for _ in range(n_qs))
            memo = {}
        else:
            if unembedding.shape[0] != vocab_size:
                raise ValueError(f"unembedding has {unembedding.shape[0]} rows, vocab_size is {vocab_size}")
            unembedding = unembedding.detach().clone()  # frozen even where the LM's own trains
            self.q_heads = nn.ModuleList(UnembeddingQHead(hidden_size, unembedding) for _ in range(n_qs))
            memo = {id(unembedding): unembedding}  # the targets share the frozen matrix, not a copy
        self.target_q_heads = nn.ModuleList(copy.deepcopy(q, dict(memo)) for q in self.q_heads)
        for p in self.target_q_heads.parameters():
            p.requires_grad_(False)
        self.v_head = make_head(hidden_size, 1)

    @torch.no_grad()
    def sync_target_q_heads(self, alpha: float | None = None) -> None:
        """Polyak update: each target parameter ← α·online + (1 − α)·target."""
        alpha = self.alpha if alpha is None else alpha
        for target_head, q_head in zip(self.target_q_heads, self.q_heads):
            for target_p, p in zip(target_head.parameters(), q_head.parameters()):
                target_p.mul_(1.0 - alpha).add_(p, alpha=alpha)

    def forward(
        self,
        hidden_states: torch.Tensor,
        states_ixs: torch.Tensor | None = None,
        actions_ixs: torch.Tensor | None = None,
    ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], torch.Tensor]:
        """Q, target-Q and V on hidden states.

        Args:
            hidden_states: (B, T, H).
            states_ixs: optional (B, S) positions at which to evaluate V (default: all T).
            actions_ixs: optional (B, K) positions at which to evaluate the Q heads
                (default: all T). The hidden state at position i scores the token at i+1.

        Returns:
            ``(qs, target_qs, vs)``: tuples of (B, K, V) tensors (one per Q head; the
            targets computed without grad) and vs (B, S).
        """
        hidden_states = hidden_states.to(self.v_head[0].weight.dtype)
        actions_hs = _gather_positions(hidden_states, actions_ixs)  # (B, K, H)
        states_hs = _gather_positions(hidden_states, states_ixs)  # (B, S, H)
        qs = tuple(q(actions_hs) for q in self.q_heads)  # each (B, K, V)
        with torch.no_grad():
            target_qs = tuple(q(actions_hs) for q in self.target_q_heads)  # each (B, K, V)
        vs = self.v_head(states_hs).squeeze(-1)  # (B, S)
        return qs, target_qs, vs


def save_ilql_heads(heads: ILQLHeads, directory: str | Path) -> None:
    """``ilql_heads.safetensors`` (the state, targets included) and ``ilql_heads.json`` (the
    shape :func:`load_ilql_heads` rebuilds) in ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    save_file({k: v.detach().contiguous().cpu() for k, v in heads.state_dict().items()},
              str(directory / "ilql_heads.safetensors"))
    (directory / "ilql_heads.json").write_text(json.dumps({
        "hidden_size": heads.v_head[0].in_features, "vocab_size": heads.vocab_size,
        "two_qs": len(heads.q_heads) == 2, "alpha": heads.alpha,
        "q_head": "mlp" if isinstance(heads.q_heads[0], nn.Sequential) else "unembedding"}))


def load_ilql_heads(directory: str | Path, unembedding: torch.Tensor) -> ILQLHeads:
    """The heads :func:`save_ilql_heads` wrote to ``directory``, in eval mode. ``unembedding`` is
    the LM's output embedding (vocab, d), which ``unembedding`` Q heads read through and do not save."""
    from safetensors.torch import load_file

    directory = Path(directory)
    meta = json.loads((directory / "ilql_heads.json").read_text())
    q_head = meta.get("q_head", "mlp")
    if q_head not in ("mlp", "unembedding"):
        raise ValueError(f"{directory / 'ilql_heads.json'}: q_head must be 'mlp' or 'unembedding', got {q_head!r}")
    heads = ILQLHeads(meta["hidden_size"], meta["vocab_size"], two_qs=meta["two_qs"], alpha=meta["alpha"],
                      unembedding=unembedding.float() if q_head == "unembedding" else None)
    heads.load_state_dict(load_file(str(directory / "ilql_heads.safetensors")))
    return heads.eval()
