"""The optimizers `train` builds: AdamW (the default), or Muon for the blocks' weight matrices beside AdamW.

Muon (momentum orthogonalized by Newton-Schulz, Jordan et al. 2024, as the nanoGPT speedruns and nanochat train)
updates each hidden weight matrix by the nearest semi-orthogonal matrix to its momentum: every direction of the
update moves by the same amount, where Adam's elementwise steps let a few directions dominate. Embeddings, the tied
head, biases and LayerNorms stay with AdamW. One optimizer object holds both kinds of groups, so that the training
loop, GradScaler, checkpoints and DDP see one optimizer whichever is chosen.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import Any

import torch

from tinygpt_cli.config import TrainConfig

# the quintic Newton-Schulz iteration's coefficients (Jordan et al.): they push every singular value of a matrix
# scaled to norm 1 into about [0.7, 1.2] in five steps, which is as orthogonal as the update needs to be
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)
NEWTON_SCHULZ_STEPS = 5
# matrices of one shape orthogonalized together (under DDP, gathered together): fewer, larger kernels, a bounded
# extra copy
MUON_STACK = 8


def orthogonalize(matrices: torch.Tensor, steps: int = NEWTON_SCHULZ_STEPS) -> torch.Tensor:
    """Approximately U V^T of each matrix U S V^T in `matrices` (..., rows, cols): its singular values moved
    near 1. In bf16 on CUDA (the iteration is stable in it, and it runs on the tensor cores); fp32 elsewhere,
    where bf16 matmuls are often emulated."""
    a, b, c = NEWTON_SCHULZ
    x = matrices.to(torch.bfloat16 if matrices.is_cuda else torch.float32)
    wide = x.size(-2) <= x.size(-1)
    if not wide:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x.reshape(-1, *x.shape[-2:])  # a batch of matrices, for bmm
    x = x / (torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm at most 1
    for _ in range(steps):  # x <- a x + (b G + c G^2) x, G = x x^T, the sums inside the matmuls
        gram = torch.bmm(x, x.mT)
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    x = x.reshape(*matrices.shape[:-2], *x.shape[-2:])
    if not wide:
        x = x.mT
    return x.to(matrices.dtype)


def muon_parameters(model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """The weight matrices Muon trains: the blocks' attention (fused q, k, v apart) and MLP matmuls, as (the
    q/k/v weights, the others). The embeddings and the tied head are not hidden matrices: they stay with AdamW."""
    qkv, others = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad or parameter.dim() != 2 or ".h." not in f".{name}":
            continue
        (qkv if name.endswith("attn.c_attn.weight") else others).append(parameter)
    return qkv, others


class MuonAdamW(torch.optim.AdamW):
    """AdamW over the groups without a "muon" key; Muon over those with one ("split": the matrix stacks that many
    square blocks along its rows, orthogonalized apart, as c_attn's q, k and v).

    Muon's step on a (rows, cols) weight: momentum m = μ m + g; the update is orthogonalize(g + μ m) (Nesterov)
    scaled by √max(1, rows/cols), so that the update's RMS per element is about lr / √cols whatever the shape;
    decoupled weight decay multiplies the weight by 1 - lr·wd first. A `found_inf` set on the optimizer (the
    training loop's non-finite step, or GradScaler's) leaves weights and momenta untouched without a host sync,
    as fused AdamW does. In an initialized process group it takes the gradients to be the same on every rank (DDP's,
    after its all-reduce) and shares the orthogonalization among the ranks: every rank must step together.
    """

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        groups = self.param_groups
        self.param_groups = [group for group in groups if not group.get("muon")]
        try:
            loss = _adamw_step()(self, closure)
        finally:
            self.param_groups = groups
        found_inf = getattr(self, "found_inf", None)
        grad_scale = getattr(self, "grad_scale", None)  # GradScaler's, where its gradients were not unscaled
        with torch.no_grad():
            for group in groups:
                if group.get("muon"):
                    self._muon_step(group, None if found_inf is None else found_inf > 0, grad_scale)
        return loss

    def _muon_step(self, group: dict[str, Any], skip: torch.Tensor | None, grad_scale: torch.Tensor | None) -> None:
        momentum, lr, decay, split = group["momentum"], group["lr"], group["weight_decay"], group.get("split", 1)
        world, rank = _ranks()
        by_shape: dict[torch.Size, list[torch.Tensor]] = {}
        for parameter in group["params"]:
            if parameter.grad is not None:
                by_shape.setdefault(parameter.shape, []).append(parameter)
        for (rows, cols), same in by_shape.items():
            scale = lr * max(1.0, rows / split / cols) ** 0.5
            # the layers' matrices of one shape orthogonalized together, a chunk at a time: the directions of one
            # chunk are what the step holds beside the state. Under DDP each rank orthogonalizes its share of a
            # chunk (the gradients are the same everywhere) and the ranks gather the others' shares: N ranks do
            # the work of one, and every rank applies the same bytes whatever its GPU
            per_chunk = max(MUON_STACK, world)  # the gathered updates held at once: about MUON_STACK matrices
            for first in range(0, len(same), per_chunk):
                chunk = same[first:first + per_chunk]
                share = -(-len(chunk) // world)
                mine = chunk[rank * share:(rank + 1) * share]
                directions = [self._direction(parameter, momentum, grad_scale) for parameter in mine]
                directions += [torch.zeros_like(chunk[0])] * (share - len(mine))  # the last rank's short share
                stacked = torch.stack(directions)
                del directions
                updates = orthogonalize(stacked.reshape(share * split, rows // split, cols)).reshape(stacked.shape)
                del stacked
                if world > 1:  # into one buffer: no list of shares, no copy of them
                    gathered = updates.new_empty((world * share, rows, cols))
                    _gather_into(gathered, updates.contiguous())
                    updates = gathered
                for parameter, update in zip(chunk, updates.unbind(0)[:len(chunk)], strict=True):
                    buffer = self._momentum(parameter)
                    self.state[parameter]["step"] += 1 if skip is None else (~skip).float()
                    new_momentum = buffer * momentum + self._grad(parameter, grad_scale)
                    update = update * scale
                    if decay:
                        update = update + (lr * decay) * parameter
                    if skip is not None:  # where, not a product: a NaN times 0 is NaN
                        new_momentum = torch.where(skip, buffer, new_momentum)
                        update = torch.where(skip, torch.zeros_like(update), update)
                    buffer.copy_(new_momentum)
                    parameter.sub_(update)

    @staticmethod
    def _grad(parameter: torch.Tensor, grad_scale: torch.Tensor | None) -> torch.Tensor:
        return parameter.grad if grad_scale is None else parameter.grad / grad_scale

    def _direction(self, parameter: torch.Tensor, momentum: float, grad_scale: torch.Tensor | None) -> torch.Tensor:
        """What Muon orthogonalizes (Nesterov): the gradient plus the momentum's share of the new momentum."""
        grad = self._grad(parameter, grad_scale)
        return grad + momentum * (self._momentum(parameter) * momentum + grad)

    def _momentum(self, parameter: torch.Tensor) -> torch.Tensor:
        """The parameter's momentum buffer, made (zeros) at its first step with the step count AdamW's state has
        (its loading code reads a "step" in every state)."""
        state = self.state[parameter]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(parameter, memory_format=torch.preserve_format)
            state["step"] = torch.zeros((), dtype=torch.float32, device=parameter.device)
        return state["momentum_buffer"]


def _gather_into(output: torch.Tensor, mine: torch.Tensor) -> None:
    """Every rank's `mine`, in rank order, into `output`: all_gather_single, the name newer torch gives
    all_gather_into_tensor (which it deprecates), else that."""
    distributed = torch.distributed
    gather = getattr(distributed, "all_gather_single", None) or distributed.all_gather_into_tensor
    gather(output, mine)


def _ranks() -> tuple[int, int]:
    """(world size, rank) of the process group the training runs in; (1, 0) in one process."""
    distributed = torch.distributed
    if distributed.is_available() and distributed.is_initialized():
        return distributed.get_world_size(), distributed.get_rank()
    return 1, 0


def _adamw_step() -> Any:
    """AdamW's own step. torch wraps an optimizer class's `step` for its hooks and profiler once an instance of it
    exists: MuonAdamW's is wrapped so, and AdamW's wrapper would run the hooks a second time, on AdamW's groups."""
    step = torch.optim.AdamW.step
    return getattr(step, "__wrapped__", step) if getattr(step, "hooked", False) else step


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on 2-D weights (matmuls, embeddings) only; biases and LayerNorms undecayed.
    train.optimizer=muon: the blocks' matrices in Muon groups instead (`MuonAdamW`), decayed alike."""
    params = [p for p in model.parameters() if p.requires_grad]
    qkv, matrices = muon_parameters(model) if cfg.optimizer == "muon" else ([], [])
    by_muon = {id(p) for p in qkv + matrices}
    rest = [p for p in params if id(p) not in by_muon]
    groups: list[dict[str, Any]] = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
    ]
    # fused: one kernel for all parameters (on CPU too: 15x faster than foreach on the 2-core CI machine), and
    # it reads `optimizer.found_inf` on the device, which lets the loop skip non-finite steps without a sync
    options = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": 1e-8, "fused": True}
    if cfg.optimizer != "muon":
        return torch.optim.AdamW(groups, **options)
    muon = {"muon": True, "lr": cfg.muon_lr, "momentum": cfg.muon_momentum, "weight_decay": cfg.weight_decay}
    groups += [group for group in ({"params": matrices, **muon}, {"params": qkv, **muon, "split": 3})
               if group["params"]]
    return MuonAdamW(groups, **options)


@functools.lru_cache(maxsize=4)  # read at every step: a lookup, not a new config validated each time
def muon_schedule(cfg: TrainConfig) -> TrainConfig:
    """The schedule of Muon's LR: train.lr's (warmup, shape, steps), peaking at train.muon_lr, its floor min_lr
    scaled alike. `training.learning_rate` of it is train.muon_lr / train.lr times the AdamW LR, but a resume
    climbs it from the Muon LR the run last had, as it climbs the AdamW LR from its own."""
    return replace(cfg, lr=cfg.muon_lr, min_lr=cfg.min_lr * cfg.muon_lr / cfg.lr)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float, muon_lr: float | None = None) -> None:
    """This step's LR on every group: `lr` on AdamW's, `muon_lr` on Muon's."""
    for group in optimizer.param_groups:
        group["lr"] = muon_lr if group.get("muon") else lr


def apply_hyperparameters(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> None:
    """Set the config's settings on `optimizer`'s groups (as `make_optimizer` made them): loading a checkpoint's
    optimizer state also loads the hyperparameters it was saved with, which a resume's --set train.weight_decay /
    beta1 / beta2 / muon_momentum must replace. The LR is set at every step."""
    adam = [group for group in optimizer.param_groups if not group.get("muon")]
    for group, decay in zip(adam, (cfg.weight_decay, 0.0), strict=True):  # decayed first (`make_optimizer`)
        group["weight_decay"] = decay
        group["betas"] = (cfg.beta1, cfg.beta2)
    for group in optimizer.param_groups:
        if group.get("muon"):
            group["momentum"] = cfg.muon_momentum
            group["weight_decay"] = cfg.weight_decay
