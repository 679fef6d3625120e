"""The probe: a fixed set of already-seen training samples, re-run forward-only
every P steps (no grad, eval mode, micro-batched), for per-sample loss and
memorization exactly as the paper measures them (METRICS.md §4).

Cost: probe_size / max_samples_per_step forward passes of micro-batches of
max_samples_per_step rows every P steps, on the training thread, plus the
routing reductions of each. The samples' token ids stay on the device
(probe_size x seq_len int64).
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch
import torch.nn.functional as F

from grokwatch.agent.capture import Capture
from grokwatch.agent.config import AgentConfig
from grokwatch.agent.summaries import Summaries
from grokwatch.wire import FRESH_PREFIX


class Host(Protocol):
    """What the probe uses of the Monitor."""

    model: torch.nn.Module
    config: AgentConfig
    capture: Capture
    summaries: Summaries

    @property
    def disabled(self) -> bool: ...


def causal_lm_loss(model, input_ids_BS: torch.Tensor, attention_mask_BS: torch.Tensor) -> torch.Tensor:
    """Per-sample mean next-token NLL over real tokens (METRICS.md §4)."""
    out = model(input_ids=input_ids_BS, attention_mask=attention_mask_BS)
    logits = out.logits if hasattr(out, "logits") else out[0]
    nll_BS = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids_BS[:, 1:], reduction="none")
    target_mask = (attention_mask_BS[:, 1:] * attention_mask_BS[:, :-1]).float()
    return (nll_BS * target_mask).sum(1) / target_mask.sum(1).clamp_min(1.0)


class Probe:
    """``loss_fn(model, input_ids, attention_mask) -> loss per sample`` runs the
    forward itself (so the routers' hooks fire); the default is a causal LM's."""

    def __init__(self, monitor: Host, size: int, loss_fn=None):
        self.monitor = monitor
        self.size = size
        self.loss_fn = loss_fn or causal_lm_loss
        self.samples: dict[str, tuple[torch.Tensor, str]] = {}  # id -> (token ids [S_i] on device, group)
        # Fresh documents (never trained on), run after the training samples of each round under the group
        # label FRESH_PREFIX + group: the collector's transfer metric and fresh-loss gap (METRICS.md §6).
        self.fresh: dict[str, tuple[torch.Tensor, str]] = {}

    def set_samples(self, samples) -> None:
        """Replace the sample set: (id, group, token ids) triples (the replay's)."""
        self.samples = {}
        for sid, group, ids in samples:
            self.samples[str(sid)] = (torch.as_tensor(ids, dtype=torch.long, device=self.monitor.summaries.device), str(group))

    def set_fresh(self, samples) -> None:
        """Replace the fresh documents: (id, group, token ids) triples of each group's held-back slice."""
        self.fresh = {}
        for sid, group, ids in samples:
            self.fresh[str(sid)] = (torch.as_tensor(ids, dtype=torch.long, device=self.monitor.summaries.device),
                                    FRESH_PREFIX + str(group))

    def remember(self, input_ids_BS: torch.Tensor, attention_mask_BS: Optional[torch.Tensor], rows, ids, groups):
        """Keep the first ``size`` distinct samples seen (their real tokens)."""
        for r in rows:
            if len(self.samples) >= self.size:
                return
            sid = str(ids[r])
            if sid in self.samples:
                continue
            tokens = input_ids_BS[r].detach()
            if attention_mask_BS is not None:
                # Real tokens only. Boolean indexing would sync; keep the row and its mask instead.
                tokens = torch.where(attention_mask_BS[r].bool(), tokens, torch.full_like(tokens, -1))
            self.samples[sid] = (tokens.clone(), str(groups[r]))

    @torch.no_grad()
    def run(self, step: int, source: str = "probe") -> None:
        mon = self.monitor
        if not (self.samples or self.fresh) or mon.disabled:
            return
        model = mon.model
        was_training = model.training
        model.eval()
        try:
            with mon.capture.probing():
                batch = mon.config.max_samples_per_step
                # the training samples first, then the fresh documents (their own micro-batches): the collector
                # compares each fresh document with the round's training samples already in the window
                for items in (list(self.samples.items()), list(self.fresh.items())):
                    for start in range(0, len(items), batch):
                        self._micro_batch(step, items[start:start + batch], source)
        finally:
            model.train(was_training)

    def _micro_batch(self, step: int, items, source: str) -> None:
        mon = self.monitor
        width = max(t.shape[0] for _, (t, _) in items)
        rows = []
        for _, (tokens, _) in items:
            rows.append(F.pad(tokens, (0, width - tokens.shape[0]), value=-1))
        ids_BS = torch.stack(rows)
        mask_BS = (ids_BS >= 0).to(torch.long)
        input_ids = ids_BS.clamp_min(0)
        sample_ids = [sid for sid, _ in items]
        groups = [g for _, (_, g) in items]
        ctx = mon.summaries.context(source, step, list(range(len(items))), sample_ids, groups, len(items), width,
                          mask_BS, None)
        ctx.deferred = True
        loss_B = mon.capture.run(ctx, lambda: self.loss_fn(mon.model, input_ids, mask_BS))
        if loss_B is None:  # a hook error dropped the context
            return
        mon.summaries.finalize(ctx, losses_B=loss_B)
