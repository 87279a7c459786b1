r"""Muon: momentum whose update matrix is orthogonalised by a Newton–Schulz iteration,
and :class:`MuonWithAdamW` / :func:`muon_with_adamw` to train a whole model with it."""

from __future__ import annotations

import ctypes
import functools
import math
import sys
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ravine import transforms as T
from ravine.kernels import cpu as _cpu
from ravine.optim.adam import AdamW
from ravine.optim.base import RavineOptimizer, check_range, narrowest_dtype, scalar

__all__ = [
    "Muon",
    "MuonWithAdamW",
    "muon_with_adamw",
    "zeropower_via_newton_schulz",
    "zeropower_via_newton_schulz_compiled",
    "zeropower_via_newton_schulz_float32",
    "adjusted_lr",
]

# The quintic Newton–Schulz coefficients and defaults of torch.optim.Muon (from
# Jordan et al., 2024).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
EPS = 1e-7
NS_STEPS = 5
ADJUST_LR_FNS = (None, "original", "match_rms_adamw")


def zeropower_via_newton_schulz(
    matrix: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float
) -> Tensor:
    r"""An approximately orthogonal matrix with the singular vectors of ``matrix``:
    :math:`U S' V^\top` for :math:`M = U S V^\top`, with :math:`S'_{ii}` roughly in
    [0.5, 1.5] (Jordan et al., 2024).

    In bfloat16, on the wide orientation (:math:`X X^\top` is the smaller Gram matrix):

    .. math::
        X_0 = \frac{M}{\max(\lVert M\rVert_F, \epsilon)}, \qquad
        X_{k+1} = a X_k + (b A_k + c A_k^2) X_k, \quad A_k = X_k X_k^\top

    The coefficients :math:`(a, b, c)` maximise the slope at zero, so small singular
    values grow fast; the result is returned in bfloat16, as torch.optim.Muon does.
    """
    a, b, c = coefficients
    ortho = matrix.bfloat16()
    tall = matrix.size(0) > matrix.size(1)
    if tall:
        ortho = ortho.T
    ortho.div_(ortho.norm().clamp(min=eps))  # spectral norm at most 1
    for _ in range(steps):
        gram = ortho @ ortho.T
        polynomial = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        ortho = torch.addmm(ortho, polynomial, ortho, beta=a)
    return ortho.T if tall else ortho


def zeropower_via_newton_schulz_float32(
    matrices: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float
) -> Tensor:
    r""":func:`zeropower_via_newton_schulz` of a batch of same-shaped matrices
    (``matrices`` is ``(batch, rows, columns)``), for CPUs without a native bfloat16
    matrix product where :func:`zeropower_via_newton_schulz_compiled` does not match
    torch: the same iteration with the same roundings to bfloat16, but every matrix
    product runs as a float32 ``bmm``/``baddbmm``.

    Every matrix holds bfloat16 values throughout (stored in float32), and each step
    rounds to bfloat16 exactly where torch's bfloat16 operations round: after the norm,
    after the division by it, after :math:`X X^\top`, after :math:`bA + cA^2` and after
    :math:`aX + (bA + cA^2)X` (an ``addmm`` in bfloat16 computes ``beta * C + alpha *
    (A @ B)`` in float32 and rounds once). A product of two bfloat16 numbers is exact in
    float32, so the only difference from torch's bfloat16 path is the order in which
    float32 adds up each dot product; it moves a rounding to bfloat16 by one unit now
    and then, and the iteration carries such differences on (see docs/fast_path.md for
    how often and how far). Returns float32 ``(batch, rows, columns)`` with bfloat16
    values.
    """
    a, b, c = coefficients
    ortho = matrices.bfloat16()
    tall = matrices.size(1) > matrices.size(2)
    if tall:
        ortho = ortho.transpose(1, 2)
    # torch rounds the norm to bfloat16 and clamps it there, then divides in float32
    # and rounds the quotient: the same operations on a batch.
    ortho = ortho.float()
    norms = torch.linalg.vector_norm(ortho, dim=(1, 2)).bfloat16().clamp(min=eps).float()
    ortho_bf16 = torch.empty_like(ortho, dtype=torch.bfloat16)
    _round_to_bfloat16_(ortho.div_(norms[:, None, None]), ortho_bf16)
    if steps == 0:
        return ortho.transpose(1, 2) if tall else ortho
    batch, rows, _ = ortho.shape
    gram = ortho.new_empty(batch, rows, rows)
    polynomial = torch.empty_like(gram)
    gram_bf16 = torch.empty_like(gram, dtype=torch.bfloat16)
    following = torch.empty_like(ortho)
    for _ in range(steps):
        # A = X X^T;  B = b A + c A A;  X <- a X + B X, each rounded to bfloat16.
        _round_to_bfloat16_(torch.bmm(ortho, ortho.transpose(1, 2), out=gram), gram_bf16)
        _round_to_bfloat16_(torch.baddbmm(gram, gram, gram, beta=b, alpha=c, out=polynomial), gram_bf16)
        _round_to_bfloat16_(torch.baddbmm(ortho, polynomial, ortho, beta=a, out=following), ortho_bf16)
        ortho, following = following, ortho
    return ortho.transpose(1, 2) if tall else ortho


def _round_to_bfloat16_(values: Tensor, scratch: Tensor) -> Tensor:
    """Round ``values`` (float32) to the nearest bfloat16, ties to even, in place,
    through ``scratch`` (a bfloat16 tensor of the same shape): two copies, faster
    than allocating a bfloat16 tensor and a float32 one."""
    scratch.copy_(values)
    return values.copy_(scratch)


def _float32_products_apply(param: Tensor, direction: Tensor) -> bool:
    """Whether the float32 orthogonalisation takes this parameter: a dense float32 or
    float64 CPU matrix (not a DTensor) on a CPU without a native bfloat16 product."""
    return (
        param.device.type == "cpu"
        and not _native_bfloat16_matmul("cpu")
        and param.dtype in (torch.float32, torch.float64)
        and direction.layout == torch.strided
        and type(param) in (torch.Tensor, torch.nn.Parameter)  # not a DTensor or another subclass
    )


@functools.cache
def _native_bfloat16_matmul(device_type: str) -> bool:
    """Whether torch's bfloat16 matrix product is fast on this device type: everywhere
    but on a CPU that oneDNN cannot run it on (no AVX-512 or AMX), where torch falls
    back to a scalar loop 60 to 100 times slower than float32's."""
    if device_type != "cpu":
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def zeropower_via_newton_schulz_compiled(
    matrices: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float
) -> Tensor:
    r""":func:`zeropower_via_newton_schulz` of a batch of same-shaped matrices
    (``(batch, rows, columns)``, at least 2 x 2) with torch's numbers, bit for bit,
    where torch has no native bfloat16 matrix product: its loops then add up each dot
    product in float32 in an order fixed by the operands' layout, and ravine's compiled
    step (``kernels/muon_ns.cpp``) adds up in the same orders and rounds to bfloat16
    where torch does, with vectorised loops and one thread per matrix. The norm and
    the division are torch's own bfloat16 operations. Returns float32
    ``(batch, rows, columns)`` with bfloat16 values.
    """
    a, b, c = coefficients
    ortho = matrices.bfloat16()
    tall = matrices.size(1) > matrices.size(2)
    for matrix in ortho:  # torch's operations, on the view torch takes the norm of
        view = matrix.T if tall else matrix
        view.div_(view.norm().clamp(min=eps))
    ortho = (ortho.transpose(1, 2) if tall else ortho).float().contiguous()
    batch, rows, columns = ortho.shape
    if steps > 0 and batch > 0:
        # threads share the work when it is large: whole matrices, or one matrix's rows
        threads = torch.get_num_threads() if ortho.numel() * rows >= 1 << 16 else 1
        _compiled_library().ravine_muon_newton_schulz(
            ortho.data_ptr(), batch, rows, columns, int(tall), a, b, c, steps, threads
        )
    return ortho.transpose(1, 2) if tall else ortho


def _compiled_library():
    """ravine's compiled library with the Newton-Schulz entry point's argument types."""
    library = _cpu.load()
    if library.ravine_muon_newton_schulz.argtypes is None:
        library.ravine_muon_newton_schulz.restype = None
        library.ravine_muon_newton_schulz.argtypes = [
            ctypes.c_void_p,  # matrices, overwritten
            ctypes.c_int64,  # batch
            ctypes.c_int64,  # rows (<= columns)
            ctypes.c_int64,  # columns
            ctypes.c_int32,  # tall: the matrices are transposed parameters
            ctypes.c_float,  # a
            ctypes.c_float,  # b
            ctypes.c_float,  # c
            ctypes.c_int64,  # steps
            ctypes.c_int32,  # threads
        ]
    return library


@functools.cache
def compiled_matches_torch() -> bool:
    """Whether the compiled Newton-Schulz step gives torch's numbers here, checked once
    on a few matrices (wide and tall, with and without the 64-element blocks and
    tails of torch's dot products); False where the library does not build or torch
    runs its bfloat16 products another way (another version, native bfloat16)."""
    if _cpu.unavailable_reason() is not None or _native_bfloat16_matmul("cpu"):
        return False
    generator = torch.Generator().manual_seed(0)
    for shape in ((2, 3), (9, 5), (19, 150), (150, 19), (70, 70)):
        matrices = torch.randn((2, *shape), generator=generator)
        ours = zeropower_via_newton_schulz_compiled(matrices, NS_COEFFICIENTS, NS_STEPS, EPS)
        for matrix, result in zip(matrices, ours):
            if not torch.equal(zeropower_via_newton_schulz(matrix, NS_COEFFICIENTS, NS_STEPS, EPS).float(), result):
                return False
    return True


#: At most this many elements per stacked batch of matrices in the float32
#: orthogonalisation (16 MiB a float32 temporary), so memory stays bounded.
BATCH_ELEMENTS = 1 << 22


def adjusted_lr(lr: float | Tensor, adjust_lr_fn: str | None, shape: torch.Size) -> float | Tensor:
    r"""Muon's learning rate for an :math:`A \times B` matrix:
    :math:`\eta\sqrt{\max(1, A/B)}` for ``"original"`` (or None; Jordan et al., 2024),
    :math:`0.2\,\eta\sqrt{\max(A, B)}` for ``"match_rms_adamw"`` (the update's RMS then
    matches AdamW's, so AdamW's learning rate and weight decay carry over; Liu et al.,
    2025, "Muon is Scalable for LLM Training")."""
    rows, columns = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        ratio = math.sqrt(max(1, rows / columns))
    elif adjust_lr_fn == "match_rms_adamw":
        ratio = 0.2 * math.sqrt(max(rows, columns))
    else:
        ratio = 1.0
    return lr * ratio


class Muon(RavineOptimizer):
    r"""Muon (Jordan et al., 2024, "Muon: An optimizer for hidden layers in neural
    networks"), for matrices (2-D parameters) only, as :class:`torch.optim.Muon`.

    .. math::
        B_t &= \mu B_{t-1} + (1 - \mu)\, g_t \\
        \tilde B_t &= \mu B_t + (1 - \mu)\, g_t \ \text{(Nesterov)} \quad\text{or}\quad \tilde B_t = B_t \\
        O_t &= \mathrm{NS}^{(a,b,c)}_k(\tilde B_t; \epsilon)
            \quad\text{(see :func:`zeropower_via_newton_schulz`)} \\
        \theta_t &= (1 - \eta\lambda)\,\theta_{t-1} - \eta'\, O_t,
            \qquad \eta' = \text{AdjustLR}(\eta; A \times B) \ \text{(see :func:`adjusted_lr`)}

    Every singular value of the step is about the same, so the update moves all
    directions of the matrix at a similar rate however ill-conditioned the gradient is.
    Biases, norms and embeddings need another optimizer: :func:`muon_with_adamw` builds
    one optimizer that gives a whole model's matrices to Muon and the rest to AdamW.

    Signature, defaults and ``state_dict`` (``momentum_buffer`` only, no step count) are
    those of :class:`torch.optim.Muon`. Parameters that are not 2-D or are complex raise
    ``ValueError`` when given.

    Args:
        lr: :math:`\eta` >= 0 (float or 1-element tensor). weight_decay: :math:`\lambda`
        >= 0 (decoupled). momentum: :math:`\mu` >= 0. nesterov: look ahead by one momentum
        step. ns_coefficients: :math:`(a, b, c)`. eps: :math:`\epsilon` >= 0. ns_steps:
        :math:`k`, an integer in [0, 100). adjust_lr_fn: None, ``"original"`` or
        ``"match_rms_adamw"``. impl (ravine only, keyword): ``"plain"`` runs torch's
        bfloat16 Newton-Schulz iteration; ``"auto"`` and ``"fast"`` run it in
        ravine's compiled library on CPUs without a native bfloat16 matrix product
        (:func:`zeropower_via_newton_schulz_compiled`, torch's numbers bit for bit,
        many times faster). All three are bit-equal to torch.optim.Muon; where a
        check at first use finds the compiled step does not match this torch, Muon
        uses float32 products instead (:func:`zeropower_via_newton_schulz_float32`,
        close to torch's but not bit-equal), except in exact mode
        (``RAVINE_EXACT_SQRT=1``) with ``"auto"``.
    """

    #: The update of a matrix depends on all of it: coordinates are not independent.
    elementwise = False
    real_view_for_complex = False
    reads_step_counts = False
    #: The rule acts on matrices; a lone vector (a landscape point) has none.
    needs_matrices = True
    #: On CPUs without a native bfloat16 matrix product, the Newton-Schulz iteration
    #: runs in the compiled library with torch's numbers
    #: (:func:`zeropower_via_newton_schulz_compiled`), batched over same-shaped
    #: matrices; ``impl="plain"`` keeps torch's bfloat16 products.
    own_compiled_step = True

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = EPS,
        ns_steps: int = NS_STEPS,
        adjust_lr_fn: str | None = None,
        *,
        impl: str = "auto",
    ) -> None:
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "nesterov": nesterov,
            "ns_coefficients": ns_coefficients,
            "eps": eps,
            "ns_steps": ns_steps,
            "adjust_lr_fn": adjust_lr_fn,
        }
        self.check_group(defaults)
        super().__init__(params, defaults, impl=impl)

    def check_group(self, group: dict[str, Any]) -> None:
        # lr, weight_decay and momentum scale the parameters and the buffer (the
        # parameters' dtype); the Newton-Schulz iteration, with eps and the coefficients,
        # runs in bfloat16.
        dtype = narrowest_dtype(group)
        largest_lr = None
        if dtype is not None and group["adjust_lr_fn"] in ADJUST_LR_FNS:
            # the step applies lr times the shape's adjustment (adjusted_lr), which must fit too
            shapes = {p.shape for p in group["params"] if p.ndim == 2}
            ratios = [adjusted_lr(1.0, group["adjust_lr_fn"], shape) for shape in shapes]
            largest_lr = float(torch.finfo(dtype).max) / max([1.0, *ratios])
        check_range("lr", group["lr"], 0.0, largest_lr, representable_in=dtype)
        check_range("weight_decay", group["weight_decay"], 0.0, representable_in=dtype)
        check_range("momentum", group["momentum"], 0.0, representable_in=dtype)
        coefficients = group["ns_coefficients"]
        if not isinstance(coefficients, (tuple, list)) or len(coefficients) != 3:
            raise ValueError(f"ns_coefficients must be three numbers (a, b, c), got {coefficients!r}")
        for index, value in enumerate(coefficients):
            check_range(f"ns_coefficients[{index}]", value, representable_in=torch.bfloat16)
        check_range("eps", group["eps"], 0.0, representable_in=torch.bfloat16)
        steps = group["ns_steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps < 100:
            raise ValueError(f"ns_steps must be an integer in [0, 100), got {steps!r}")
        if group["adjust_lr_fn"] not in ADJUST_LR_FNS:
            raise ValueError(
                f"adjust_lr_fn must be one of {', '.join(map(repr, ADJUST_LR_FNS))}, got {group['adjust_lr_fn']!r}"
            )
        for p in group.get("params", ()):
            if p.ndim != 2 or torch.is_complex(p):
                raise ValueError(
                    "params must be real matrices (2-D): Muon orthogonalises matrix updates, got a "
                    f"parameter of shape {tuple(p.shape)} and dtype {p.dtype}; train biases, norms and "
                    "embeddings with ravine.optim.muon.muon_with_adamw (Muon for matrices, AdamW for the rest)"
                )

    def init_state(self, group, param, state) -> None:
        state["momentum_buffer"] = torch.zeros_like(param.grad, memory_format=torch.preserve_format)

    def state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("momentum_buffer",)

    def block_elements(self, group: dict[str, Any]) -> int:
        # Orthogonalisation acts on whole matrices, so a matrix is never cut into slices.
        return sys.maxsize

    def advance_steps(self, group, dense) -> list[float]:
        return [0.0] * len(dense)  # Muon keeps no step count

    def update(self, group, params, grads, states, steps) -> None:
        lr = group["lr"]
        momentum = group["momentum"]
        buffers = [state["momentum_buffer"] for state in states]
        T.moving_average_(buffers, grads, momentum)
        directions = torch._foreach_lerp(grads, buffers, momentum) if group["nesterov"] else buffers
        if group["weight_decay"] != 0:
            T.decay_weights_(params, scalar(1 - lr * group["weight_decay"]))
        # Same-shaped matrices are orthogonalised together: by the compiled step (torch's
        # numbers) where it matches torch here, else by float32 products (close to
        # torch's, not bit-equal: not in exact mode).
        batched: dict[tuple, list[int]] = {}
        compiled = self.use_compiled_step(bit_equal=True) and compiled_matches_torch()
        float32 = self.use_compiled_step(bit_equal=False)
        if compiled or float32:
            for index, param in enumerate(params):
                if not _float32_products_apply(param, directions[index]):
                    continue
                if compiled and min(param.shape) >= 2:
                    batched.setdefault((True, param.shape, param.dtype), []).append(index)
                elif float32:
                    batched.setdefault((False, param.shape, param.dtype), []).append(index)
        for (exact, shape, _), indices in batched.items():
            alpha = -scalar(adjusted_lr(lr, group["adjust_lr_fn"], shape))
            size = max(1, BATCH_ELEMENTS // max(1, math.prod(shape)))
            orthogonalise = zeropower_via_newton_schulz_compiled if exact else zeropower_via_newton_schulz_float32
            for start in range(0, len(indices), size):
                chunk = indices[start : start + size]
                stacked = torch.stack([directions[index] for index in chunk])
                orthogonal = orthogonalise(stacked, group["ns_coefficients"], group["ns_steps"], group["eps"])
                # Adding the float32 copy of a bfloat16 update gives the same sums as
                # adding the bfloat16 tensor (torch converts it exactly first).
                torch._foreach_add_([params[index] for index in chunk], list(orthogonal.unbind(0)), alpha=alpha)
        done = {index for indices in batched.values() for index in indices}
        for index, (param, direction) in enumerate(zip(params, directions)):
            if index in done:
                continue
            orthogonal = zeropower_via_newton_schulz(direction, group["ns_coefficients"], group["ns_steps"], group["eps"])
            param.add_(orthogonal, alpha=-scalar(adjusted_lr(lr, group["adjust_lr_fn"], param.shape)))


# Keys of a Muon group that an AdamW group of MuonWithAdamW does not carry.
_MUON_ONLY_KEYS = ("momentum", "nesterov", "ns_coefficients", "ns_steps", "adjust_lr_fn")


class MuonWithAdamW(Muon):
    r"""One optimizer for a whole model: Muon for its matrices, AdamW for the rest.

    Each param group has ``use_muon``. A group given without it is split: its 2-D
    parameters form a Muon group (with the group's own options), every other parameter
    (biases, norm gains, scalars) an AdamW group with ``lr=adamw_lr``,
    ``betas=adamw_betas``, ``eps=adamw_eps`` and ``weight_decay=adamw_weight_decay``.
    A group given with ``use_muon=False`` is an AdamW group with AdamW's keys (``lr``,
    ``betas``, ``eps``, ``weight_decay``, ``amsgrad``, ``maximize``); with
    ``use_muon=True`` a Muon group, whose parameters must be 2-D. So matrices that should
    not be orthogonalised (embeddings, often the first and last layers) are put in a
    ``use_muon=False`` group; :func:`muon_with_adamw` does this from a model.

    Muon groups follow :class:`Muon` and AdamW groups :class:`ravine.AdamW`, number
    for number (the state_dict holds ``momentum_buffer`` for Muon's parameters and
    ``step``, ``exp_avg``, ``exp_avg_sq`` for AdamW's). Every group has an ``lr``, so
    learning-rate schedulers scale both kinds together.

    Args:
        lr, weight_decay, momentum, nesterov, ns_coefficients, eps, ns_steps,
        adjust_lr_fn: Muon's, as in :class:`Muon`. adamw_lr: the AdamW groups'
        learning rate; None uses ``lr`` (a good match with
        ``adjust_lr_fn="match_rms_adamw"``, which gives Muon's update AdamW's RMS).
        adamw_betas, adamw_eps: AdamW's betas and eps. adamw_weight_decay: AdamW's
        decoupled weight decay; None uses ``weight_decay``. impl: Muon's, as in
        :class:`Muon` (AdamW's groups take AdamW's plain path).
    """

    reads_step_counts = True  # the AdamW groups' bias corrections read them

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = EPS,
        ns_steps: int = NS_STEPS,
        adjust_lr_fn: str | None = None,
        *,
        adamw_lr: float | None = None,
        adamw_betas: tuple[float, float] = (0.9, 0.999),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float | None = None,
        impl: str = "auto",
    ) -> None:
        self.adamw_defaults = {
            "lr": lr if adamw_lr is None else adamw_lr,
            "betas": adamw_betas,
            "eps": adamw_eps,
            "weight_decay": weight_decay if adamw_weight_decay is None else adamw_weight_decay,
            "amsgrad": False,
            "maximize": False,
            "foreach": None,
            "capturable": False,
            "differentiable": False,
            "fused": None,
            "decoupled_weight_decay": True,
        }
        try:
            _adamw_rule().check_group(self.adamw_defaults)
        except ValueError as error:
            # AdamW's checks name its own keys (lr, betas, ...): name the argument given here.
            # lr and weight_decay come from Muon's own when adamw_lr/adamw_weight_decay are None.
            given = ["betas", "eps"]
            if adamw_lr is not None:
                given.append("lr")
            if adamw_weight_decay is not None:
                given.append("weight_decay")
            message = str(error)
            if not any(message.startswith(key) for key in given):
                raise
            raise ValueError(f"adamw_{message}") from None
        # An AdamW group that sets its own lr keeps it; one split off a group follows
        # that group's lr when adamw_lr is None.
        self._adamw_lr_follows_lr = adamw_lr is None
        super().__init__(
            params, lr, weight_decay, momentum, nesterov, ns_coefficients, eps, ns_steps, adjust_lr_fn, impl=impl
        )

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim pickles only defaults, state and param groups.
        return {
            **super().__getstate__(),
            "adamw_defaults": self.adamw_defaults,
            "_adamw_lr_follows_lr": self._adamw_lr_follows_lr,
        }

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "use_muon" in param_group:
            parts = [param_group]
        else:
            params = param_group["params"]
            params = [params] if isinstance(params, Tensor) else list(params)
            matrices = [p for p in params if p.ndim == 2]
            others = [p for p in params if p.ndim != 2]
            parts = []
            if matrices or not others:
                parts.append({**param_group, "params": matrices, "use_muon": True})
            if others:
                adamw_part = {"params": others, "use_muon": False}
                if self._adamw_lr_follows_lr and "lr" in param_group:
                    adamw_part["lr"] = param_group["lr"]
                parts.append(adamw_part)
        for part in parts:
            if part["use_muon"]:
                super().add_param_group(part)
                continue
            part = {**self.adamw_defaults, **part}
            given = set(part)
            RavineOptimizer.add_param_group(self, part)
            group = self.param_groups[-1]
            for key in _MUON_ONLY_KEYS:
                if key not in given:
                    group.pop(key, None)  # filled in from Muon's defaults; AdamW has no use for it

    def check_group(self, group: dict[str, Any]) -> None:
        if group.get("use_muon", True):
            super().check_group(group)
            return
        _adamw_rule().check_group(group)
        for p in group["params"]:
            if torch.is_complex(p):
                raise ValueError(f"params must be real: MuonWithAdamW does not support complex parameters, got {p.dtype}")

    def init_state(self, group, param, state) -> None:
        if group["use_muon"]:
            super().init_state(group, param, state)
        else:
            _adamw_rule().init_state(group, param, state)

    def state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return super().state_names(group) if group.get("use_muon", True) else _adamw_rule().state_names(group)

    def block_elements(self, group: dict[str, Any]) -> int:
        return super().block_elements(group) if group["use_muon"] else RavineOptimizer.block_elements(self, group)

    def advance_steps(self, group, dense) -> list[float]:
        return super().advance_steps(group, dense) if group["use_muon"] else RavineOptimizer.advance_steps(self, group, dense)

    def update(self, group, params, grads, states, steps) -> None:
        if group["use_muon"]:
            super().update(group, params, grads, states, steps)
        else:
            _adamw_rule().update(group, params, grads, states, steps)


@functools.cache
def _adamw_rule() -> AdamW:
    """An AdamW whose methods apply AdamW's checks and rule to the AdamW groups of a
    MuonWithAdamW (they read only the group and tensors they are given)."""
    return AdamW([torch.zeros(0, requires_grad=True)])


def muon_with_adamw(
    model_or_params: torch.nn.Module | Iterable[Tensor],
    lr: float = 1e-3,
    *,
    adamw: Iterable[str | Tensor | torch.nn.Module] = (),
    adamw_lr: float | None = None,
    **kwargs: Any,
) -> MuonWithAdamW:
    """A :class:`MuonWithAdamW` for a model: Muon for its matrices, AdamW for the rest.

    ``model_or_params`` is a module or an iterable of parameters. Matrices (2-D
    parameters) go to Muon, except those named in ``adamw``, and every other parameter
    (biases, norms) goes to AdamW. ``adamw`` holds modules (all their parameters),
    parameters, or names from ``model.named_parameters()`` (a name also matches every
    parameter under it: ``"head"`` matches ``"head.weight"``); a name that matches
    nothing raises ``ValueError``. With a module, the weights of its
    ``torch.nn.Embedding`` layers go to AdamW too: a lookup table is not a linear map.

    Example::

        optimizer = muon_with_adamw(model, lr=0.02, adamw_lr=3e-4, adamw=[model.head])

    Other keyword arguments (``weight_decay``, ``momentum``, ``adjust_lr_fn``,
    ``adamw_betas``, ...) go to :class:`MuonWithAdamW`.
    """
    if isinstance(model_or_params, torch.nn.Module):
        named = list(model_or_params.named_parameters())
        embedding_weights = {
            id(module.weight) for module in model_or_params.modules() if isinstance(module, torch.nn.Embedding)
        }
    else:
        named = [(None, p) for p in model_or_params]
        embedding_weights = set()
    to_adamw = set(embedding_weights)
    for item in [adamw] if isinstance(adamw, (str, Tensor, torch.nn.Module)) else adamw:
        if isinstance(item, torch.nn.Module):
            to_adamw.update(id(p) for p in item.parameters())
        elif isinstance(item, Tensor):
            to_adamw.add(id(item))
        elif isinstance(item, str):
            matches = [p for name, p in named if name is not None and (name == item or name.startswith(item + "."))]
            if not matches:
                names = [name for name, _ in named if name is not None]
                raise ValueError(
                    f"adamw names {item!r}, which matches no parameter name; names: {', '.join(names) or 'none (pass a module to use names)'}"
                )
            to_adamw.update(id(p) for p in matches)
        else:
            raise ValueError(f"adamw must hold modules, parameters or parameter names, got {item!r}")
    params = [p for _, p in named if p.requires_grad]
    muon = [p for p in params if p.ndim == 2 and id(p) not in to_adamw]
    rest = [p for p in params if p.ndim != 2 or id(p) in to_adamw]
    groups = []
    if muon:
        groups.append({"params": muon, "use_muon": True})
    if rest:
        groups.append({"params": rest, "use_muon": False})
    if not groups:
        raise ValueError("model_or_params has no trainable parameters")
    return MuonWithAdamW(groups, lr, adamw_lr=adamw_lr, **kwargs)
