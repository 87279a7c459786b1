r"""8-bit optimizer state: moments quantized block-wise with a dynamic codebook.

Each moment buffer of a large parameter is stored as one byte per element plus one
float32 scale per block of 256 elements (Dettmers et al., 2022, "8-bit Optimizers
via Block-wise Quantization"; the scheme of bitsandbytes and torchao):

.. math::
    s_b = \max_{i \in b} |x_i|, \qquad
    q_i = \operatorname*{arg\,min}_k \bigl|\,c_k - x_i / s_b\,\bigr|, \qquad
    \tilde x_i = s_b\, c_{q_i}

where :math:`c` is a 256-entry *dynamic* codebook (:func:`dynamic_codebook`):
about a decade of magnitudes per exponent step, so small values keep their relative
precision (a linear map would round them to zero). The first moment and the
momentum buffer use the signed codebook, second moments (never negative) the
unsigned one, which spends the sign bit on precision.

A step reads each block's state back to float32, runs the optimizer's own update
rule there (:class:`~ravine.optim.Adam`'s, :class:`~ravine.optim.SGD`'s, ...), and
quantizes the new state with fresh scales, a chunk of up to 262,144 elements
(several small parameters, or a slice of a large one, each padded to whole blocks)
at a time: the float32 copy never holds more than one chunk, in work buffers of
1 MiB per state kept between steps (plus three of scratch). Each stage is one large
torch operation over the chunk (a gather from a table of code pairs to read the
state, ``amax``/``amin`` over a (blocks, 256) view for the scales, integer shifts
and ``index_select`` on a lookup table for the nearest codes), so the same code
runs on any device. The codes and scales do not depend on how the parameters are
cut into chunks (stochastic rounding draws its random numbers in parameter order).
That is the plain path (``impl="plain"``). On the CPU, :class:`Adam8bit`,
:class:`AdamW8bit` and :class:`SGD8bit` take a compiled step by default
(:mod:`ravine.kernels.quantized`): one pass per block, with the same codes, scales
and parameters bit for bit (square roots aside, see :mod:`ravine.kernels.cpu`).

Parameters with fewer than ``min_8bit_size`` elements (4096, as in bitsandbytes)
keep float32 state: the saving would be small and biases and norms are sensitive.
:func:`~ravine.optim.lowmem.state_bytes` counts that state as it is.

State of a quantized parameter: ``exp_avg`` (uint8 codes, the parameter's shape),
``exp_avg_absmax`` (float32, one per block), and likewise ``exp_avg_sq``,
``max_exp_avg_sq`` or ``momentum_buffer``; ``step`` as the float optimizer keeps it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ravine.kernels import quantized as _compiled
from ravine.optim.adam import Adam
from ravine.optim.lion import Lion
from ravine.optim.lowmem import check_real_params, check_working_range, restore_state_dtypes, run_in_working_precision
from ravine.optim.sgd import SGD

__all__ = [
    "BLOCK_SIZE",
    "Adam8bit",
    "AdamW8bit",
    "BlockwiseQuantizedState",
    "Lion8bit",
    "SGD8bit",
    "dequantize_blockwise",
    "dynamic_codebook",
    "quantize_blockwise",
]

#: Elements sharing one absmax scale.
BLOCK_SIZE = 256
# Elements dequantized, updated and quantized together (a multiple of BLOCK_SIZE):
# the size of the float32 work buffers kept between steps.
_CHUNK = 1 << 18
#: Which codebook each state buffer uses: signed (True) or unsigned (False).
SIGNED_STATES = {"exp_avg": True, "momentum_buffer": True, "exp_avg_sq": False, "max_exp_avg_sq": False}


def dynamic_codebook(signed: bool) -> Tensor:
    r"""The 256 values of the dynamic (tree) quantization map, sorted, in [-1, 1].

    For exponent :math:`j = 0, \dots, 6` the map holds the midpoints of
    :math:`n_j` equal steps of :math:`[0.1, 1]`, scaled by :math:`10^{j-6}`, with
    :math:`n_j = 2^j` (signed: each also negated) or :math:`2^{j+1}` (unsigned);
    then 0 and 1. That is 254 + 2 = 256 values (the map of bitsandbytes'
    ``create_dynamic_map``): relative spacing :math:`0.9 / n_j` within a decade.
    """
    values = [0.0, 1.0]
    for exponent in range(7):
        steps = 2**exponent if signed else 2 ** (exponent + 1)
        bounds = torch.linspace(0.1, 1.0, steps + 1, dtype=torch.float64)
        means = ((bounds[:-1] + bounds[1:]) / 2 * 10.0 ** (exponent - 6)).tolist()
        values += means
        if signed:
            values += [-mean for mean in means]
    assert len(values) == 256
    return torch.tensor(sorted(values), dtype=torch.float32)


_CODEBOOKS: dict[tuple[bool, torch.device], tuple[Tensor, Tensor, Tensor]] = {}
# Nearest-code search by table: the top 17 bits of a float32 (sign, exponent, 8
# significand bits) cut [-1, 1] into buckets 2^-8 wide relative to their values, finer
# than the codebook's closest midpoints (0.9/128 apart near 1 in the unsigned map,
# 0.7%), so a bucket holds at most one midpoint and one comparison settles the code.
_TABLE_SHIFT = 15


def _codebook(signed: bool, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """The codebook on ``device``, the midpoints between its neighbours, and for each
    float32 bucket (see ``_TABLE_SHIFT``) the number of midpoints below the bucket."""
    key = (signed, torch.device(device))
    if key not in _CODEBOOKS:
        codes = dynamic_codebook(signed)
        midpoints = (codes[1:] + codes[:-1]) / 2
        starts = torch.arange(1 << (32 - _TABLE_SHIFT), dtype=torch.int64) << _TABLE_SHIFT
        low = starts.to(torch.int32).view(torch.float32)  # bucket start; for negative floats its largest value
        high = (starts + (1 << _TABLE_SHIFT) - 1).to(torch.int32).view(torch.float32)
        below = torch.bucketize(torch.minimum(low, high).nan_to_num(0.0), midpoints).clamp_(max=midpoints.numel() - 1)
        _CODEBOOKS[key] = codes.to(device), midpoints.to(device), below.to(torch.int32).to(device)
    return _CODEBOOKS[key]


def _nearest_codes(normalized: Tensor, midpoints: Tensor, table: Tensor) -> Tensor:
    """Index of the nearest codebook entry for each float32 value (ties to the lower
    one): ``torch.bucketize(normalized, midpoints)``, about 10x faster on a CPU."""
    bucket = (normalized.reshape(-1).view(torch.int32) >> _TABLE_SHIFT) & ((1 << (32 - _TABLE_SHIFT)) - 1)
    below = table.index_select(0, bucket)
    return (below + (normalized.reshape(-1) > midpoints.index_select(0, below))).view(normalized.shape)


# Index of the code 0.0 in each codebook.
_ZERO_CODE = {signed: int((dynamic_codebook(signed) == 0).nonzero()) for signed in (True, False)}


_PAIR_TABLES: dict[tuple[bool, torch.device], Tensor] = {}


def _pair_table(signed: bool, device: torch.device) -> Tensor:
    """The values of every pair of codes, indexed by the two bytes read as one 16-bit
    integer (0 to 65535): int64 entries holding the two float32 values in memory order,
    so one gather dequantizes two codes."""
    key = (signed, torch.device(device))
    if key not in _PAIR_TABLES:
        codebook = _codebook(signed, device)[0]
        pairs = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.uint8).view(-1, 2)
        _PAIR_TABLES[key] = codebook[pairs.to(device).long()].contiguous().view(torch.int64).view(-1)
    return _PAIR_TABLES[key]


def _normalize_blocks(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """Divide each row of ``blocks`` (float32, one block per row) by its absmax in
    place (rows of zeros by 1); return the rows and the absmax of each."""
    # max |x| = max(max x, -min x), as abs().amax() gives it (abs_: no -0.0)
    absmax = torch.maximum(blocks.amax(dim=1), blocks.amin(dim=1).neg_()).abs_()
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    return blocks.div_(scale[:, None]), absmax


def _nearest_codes_into(flat: Tensor, table: Tensor, midpoints: Tensor, index: Tensor, code: Tensor, threshold: Tensor) -> Tensor:
    """:func:`_nearest_codes` of the 1-d float32 ``flat``, written into the int32
    buffer ``code`` (``index`` and ``threshold``: scratch of the same size)."""
    torch.bitwise_right_shift(flat.view(torch.int32), _TABLE_SHIFT, out=index)
    index.bitwise_and_((1 << (32 - _TABLE_SHIFT)) - 1)
    torch.index_select(table, 0, index, out=code)
    torch.index_select(midpoints, 0, code, out=threshold)
    return code.add_(torch.gt(flat, threshold, out=index))  # an int32 result: faster to add than bool


def _stochastic_codes(normalized: Tensor, signed: bool) -> Tensor:
    """Codes of :func:`quantize_blockwise` with ``stochastic=True`` for values already
    divided by their block's absmax."""
    codebook = _codebook(signed, normalized.device)[0]
    normalized = normalized.clamp(codebook[0], codebook[-1])
    upper = torch.bucketize(normalized, codebook, out_int32=True).clamp_(1, codebook.numel() - 1)
    lower_value = codebook[upper - 1]
    chance_up = (normalized - lower_value) / (codebook[upper] - lower_value)
    return torch.where(torch.rand_like(chance_up) < chance_up, upper, upper - 1)


class _Piece:
    """A contiguous run of one parameter's elements and where its state lives: in
    the 8-bit buffers at ``start`` and in the float32 work buffer at ``offset``."""

    __slots__ = ("param", "grad", "state", "step", "full", "start", "length", "offset")

    def __init__(self, param, grad, state, step, full, start, length, offset) -> None:
        self.param, self.grad, self.state, self.step = param, grad, state, step
        self.full, self.start, self.length, self.offset = full, start, length, offset


def quantize_blockwise(
    values: Tensor, signed: bool, block_size: int = BLOCK_SIZE, *, stochastic: bool = False
) -> tuple[Tensor, Tensor]:
    r"""Codes (uint8, ``values``' shape) and absmax scales (float32, one per block of
    ``block_size`` consecutive elements of the flattened tensor; the last block may
    be short).

    Each element gets the code nearest to :math:`x = \text{value} / \text{absmax}`;
    with ``stochastic`` it gets one of the two codes around :math:`x`,
    :math:`c_{k+1}` with probability :math:`(x - c_k) / (c_{k+1} - c_k)`, so the
    rounding is unbiased (drawn from torch's global random number generator).
    """
    codebook, midpoints, table = _codebook(signed, values.device)
    flat = values.reshape(-1).float()
    count = flat.numel()
    blocks = -(-count // block_size)
    padded = torch.nn.functional.pad(flat, (0, blocks * block_size - count)).view(blocks, block_size)
    absmax = padded.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    normalized = padded / scale[:, None]
    if stochastic:
        normalized = normalized.clamp(codebook[0], codebook[-1])
        upper = torch.bucketize(normalized, codebook, out_int32=True).clamp_(1, codebook.numel() - 1)
        lower_value = codebook[upper - 1]
        chance_up = (normalized - lower_value) / (codebook[upper] - lower_value)
        codes = torch.where(torch.rand_like(chance_up) < chance_up, upper, upper - 1)
    else:
        codes = _nearest_codes(normalized, midpoints, table)
    return codes.view(-1)[:count].to(torch.uint8).view(values.shape), absmax


def dequantize_blockwise(codes: Tensor, absmax: Tensor, signed: bool, block_size: int = BLOCK_SIZE) -> Tensor:
    """float32 values ``codebook[code] * absmax`` of each block (inverse of
    :func:`quantize_blockwise` up to rounding), in ``codes``' shape."""
    codebook = _codebook(signed, codes.device)[0]
    count = codes.numel()
    values = codebook.index_select(0, codes.reshape(-1).int())
    padded = torch.nn.functional.pad(values, (0, absmax.numel() * block_size - count))
    return (padded.view(-1, block_size) * absmax[:, None]).view(-1)[:count].view(codes.shape)


class BlockwiseQuantizedState:
    """Mixin that stores an optimizer's moment buffers in 8 bits (see module doc).

    Put it first among the bases: ``class Adam8bit(BlockwiseQuantizedState, Adam)``.
    The float optimizer's update rule runs unchanged on float32 copies of one chunk
    of state at a time. The whole group goes to :meth:`update` in one call (no
    slicing by the base class, whose blocks would not line up with the scales), and
    this class packs it into chunks of whole quantization blocks itself.
    """

    #: A block's scale depends on all its elements, so coordinates are not independent.
    elementwise = False
    real_view_for_complex = False
    supports_sparse = False
    min_8bit_size = 4096
    #: Round new state to a random neighbouring code (unbiased) instead of the nearest.
    stochastic_rounding = False
    #: The float rule the compiled step of :mod:`ravine.kernels.quantized` runs
    #: ("adam", "sgd"), or None for the plain path only.
    compiled_family: str | None = None

    def check_group(self, group: dict[str, Any]) -> None:
        super().check_group(group)
        check_real_params(group, "8-bit state")
        check_working_range(group)

    def block_elements(self, group: dict[str, Any]) -> int:
        return 1 << 62

    def quantizes(self, param: Tensor) -> bool:
        """Whether ``param``'s state is stored in 8 bits."""
        return param.numel() >= self.min_8bit_size

    def init_state(self, group, param, state) -> None:
        if not self.quantizes(param):
            super().init_state(group, param, state)
            return
        # The float optimizer's own state (step counts and the like), with empty
        # stand-ins for the moment buffers, which are then made 8-bit.
        super().init_state(group, param.new_empty(0), state)
        self._quantize_new_buffers(param, state)

    def _quantize_new_buffers(self, param: Tensor, state: dict[str, Any]) -> None:
        for name in SIGNED_STATES:
            if name in state and name + "_absmax" not in state:
                state[name] = torch.zeros(param.shape, dtype=torch.uint8, device=param.device)
                blocks = -(-param.numel() // BLOCK_SIZE)
                state[name + "_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=param.device)

    def update(self, group, params, grads, states, steps) -> None:
        # The compiled step takes what it can (bit-equal to the plain path, square
        # roots aside as everywhere); the rest stays on the plain path in this step.
        if self.compiled_family is not None and self.use_compiled_step(bit_equal=True):
            rest = _compiled.run(self, group, params, grads, states, steps, self.compiled_family)
            if len(rest) < len(params):
                params, grads = [params[i] for i in rest], [grads[i] for i in rest]
                states, steps = [states[i] for i in rest], [steps[i] for i in rest]
        if params:
            self._plain_update(group, params, grads, states, steps)

    def _plain_update(self, group, params, grads, states, steps) -> None:
        # Parameters are quantized in their order (stochastic rounding draws random
        # numbers in that order); those with float32 state go to the rule together.
        names = self.state_names(group)
        plain: list[tuple[Tensor, Tensor, dict[str, Tensor], float, Any]] = []
        chunk: list[_Piece] = []
        chunk_names: tuple[str, ...] = ()
        size = 0
        for p, g, state, step in zip(params, grads, states, steps, strict=True):
            full = self.state.get(p, {})
            quantized = tuple(name for name in names if name + "_absmax" in full)
            if not quantized:
                plain.append((p, g, state, step, None))
                continue
            contiguous = p.is_contiguous() and g.is_contiguous()
            if chunk and (quantized != chunk_names or not contiguous or p.device != chunk[0].param.device):
                self._run_chunk(group, chunk_names, chunk, size)
                chunk, size = [], 0
            if not contiguous:
                work = {**state, **self._read(full, quantized, 0, p.numel(), p.shape)}
                self._run(group, [(p, g, work, step, (full, quantized, 0))])
                continue
            chunk_names = quantized
            flat_p, flat_g = p.view(-1), g.view(-1)
            for start in range(0, p.numel(), _CHUNK):
                length = min(_CHUNK, p.numel() - start)
                padded = -(-length // BLOCK_SIZE) * BLOCK_SIZE
                if chunk and size + padded > _CHUNK:
                    self._run_chunk(group, chunk_names, chunk, size)
                    chunk, size = [], 0
                part = slice(start, start + length)
                chunk.append(_Piece(flat_p[part], flat_g[part], state, step, full, start, length, size))
                size += padded
        if chunk:
            self._run_chunk(group, chunk_names, chunk, size)
        if plain:
            self._run(group, plain)

    def _workspace(self, device: torch.device, size: int, names: tuple[str, ...]) -> dict[str, Tensor]:
        """float32 buffers of at least ``size`` elements, one per state name, plus int32
        scratch ("index", "code") and a float32 one ("threshold"), kept between steps."""
        spaces = self.__dict__.setdefault("_quantized_workspace", {})
        space = spaces.setdefault(torch.device(device), {})
        for name in (*names, "threshold", "index", "code"):
            dtype = torch.int32 if name in ("index", "code") else torch.float32
            if name not in space or space[name].numel() < size:
                space[name] = torch.empty(max(size, BLOCK_SIZE), dtype=dtype, device=device)
        return {name: tensor[:size] for name, tensor in space.items()}

    def _run_chunk(self, group, names: tuple[str, ...], chunk: list[_Piece], size: int) -> None:
        """Dequantize the state of ``chunk``'s pieces into one float32 buffer per state
        (each piece padded to whole blocks), run the rule on views of it, quantize the
        whole buffer back with a few large operations."""
        device = chunk[0].param.device
        space = self._workspace(device, size, names)
        blocks = size // BLOCK_SIZE
        index, code = space["index"], space["code"]
        for name in names:
            signed = SIGNED_STATES[name]
            work = space[name]
            scales = space["threshold"][:blocks]
            staged = code.view(torch.uint8)[:size]  # the codes, padded with the code of 0.0
            for piece in chunk:
                first = piece.start // BLOCK_SIZE
                count = -(-piece.length // BLOCK_SIZE)
                end = piece.offset + piece.length
                staged[piece.offset:end].copy_(piece.full[name].view(-1)[piece.start:piece.start + piece.length])
                staged[end:piece.offset + count * BLOCK_SIZE].fill_(_ZERO_CODE[signed])
                scales[piece.offset // BLOCK_SIZE:piece.offset // BLOCK_SIZE + count].copy_(
                    piece.full[name + "_absmax"][first:first + count]
                )
            # codebook[code] two codes at a time, then times the block's scale
            pair_index = index[:size // 2].copy_(staged.view(torch.int16)).bitwise_and_(0xFFFF)
            torch.index_select(_pair_table(signed, device), 0, pair_index, out=work.view(torch.int64))
            work.view(blocks, BLOCK_SIZE).mul_(scales[:, None])
        batch = []
        for piece in chunk:
            views = {name: space[name][piece.offset:piece.offset + piece.length] for name in names}
            batch.append((piece.param, piece.grad, {**piece.state, **views}, piece.step, None))
        self._run(group, batch)
        for name in names:
            signed = SIGNED_STATES[name]
            work = space[name]
            for piece in chunk:  # padding back to zeros, as quantize_blockwise pads
                end = piece.offset + piece.length
                padded_end = piece.offset + -(-piece.length // BLOCK_SIZE) * BLOCK_SIZE
                if end < padded_end:
                    work[end:padded_end].zero_()
            normalized, absmax = _normalize_blocks(work.view(blocks, BLOCK_SIZE))
            if self.stochastic_rounding:
                codes = _stochastic_codes(normalized, signed).view(-1)
            else:
                _, midpoints, table = _codebook(signed, device)
                codes = _nearest_codes_into(normalized.view(-1), table, midpoints, index, code, space["threshold"])
            for piece in chunk:
                first = piece.start // BLOCK_SIZE
                count = -(-piece.length // BLOCK_SIZE)
                piece.full[name].view(-1)[piece.start:piece.start + piece.length].copy_(
                    codes[piece.offset:piece.offset + piece.length]
                )
                piece.full[name + "_absmax"][first:first + count].copy_(
                    absmax[piece.offset // BLOCK_SIZE:piece.offset // BLOCK_SIZE + count]
                )

    def _read(self, full, names, start, length, shape) -> dict[str, Tensor]:
        first, last = start // BLOCK_SIZE, -(-(start + length) // BLOCK_SIZE)
        return {
            name: dequantize_blockwise(
                full[name].view(-1)[start:start + length], full[name + "_absmax"][first:last], SIGNED_STATES[name]
            ).view(shape)
            for name in names
        }

    def _run(self, group, batch) -> None:
        rule = super().update
        run_in_working_precision(
            rule, group, [e[0] for e in batch], [e[1] for e in batch], [e[2] for e in batch], [e[3] for e in batch]
        )
        for _, _, work, _, source in batch:
            if source is None:
                continue
            full, names, start = source
            for name in names:
                codes, absmax = quantize_blockwise(work[name], SIGNED_STATES[name], stochastic=self.stochastic_rounding)
                length = codes.numel()
                full[name].view(-1)[start:start + length].copy_(codes.view(-1))
                first = start // BLOCK_SIZE
                full[name + "_absmax"][first:first + absmax.numel()].copy_(absmax)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        restore_state_dtypes(self, state_dict, _stored_dtype)


def _stored_dtype(group: dict[str, Any], name: str, saved: dict[str, Any]) -> torch.dtype | None:
    if name in SIGNED_STATES and name + "_absmax" in saved:
        return torch.uint8
    if name.endswith("_absmax"):
        return torch.float32
    return None


def _check_min_8bit_size(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"min_8bit_size must be an integer >= 0, got {value!r}")
    return value


class Adam8bit(BlockwiseQuantizedState, Adam):
    r""":class:`~ravine.optim.Adam` with both moments (and AMSGrad's maximum) in
    8 bits per element, block-wise quantized (Dettmers et al., 2022): 2.03 bytes of
    state per parameter instead of 8 for large tensors.

    The update rule is Adam's, applied to the dequantized moments; arguments as
    :class:`~ravine.optim.Adam`, plus ``min_8bit_size``: parameters with fewer
    elements keep float32 state (default 4096; 0 quantizes every parameter).
    ``impl`` chooses the implementation (see :mod:`ravine.optim.base`): the
    compiled step (:mod:`ravine.kernels.quantized`) gives the plain path's codes,
    scales and parameters bit for bit, square roots aside.
    """

    own_compiled_step = True
    compiled_family = "adam"

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        decoupled_weight_decay: bool = False,
        min_8bit_size: int = 4096,
        impl: str = "auto",
    ) -> None:
        self.min_8bit_size = _check_min_8bit_size(min_8bit_size)
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            maximize=maximize,
            decoupled_weight_decay=decoupled_weight_decay,
            impl=impl,
        )


class AdamW8bit(Adam8bit):
    r""":class:`~ravine.optim.AdamW` (decoupled weight decay, default 0.01) with 8-bit
    block-wise quantized moments; see :class:`Adam8bit`."""

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        min_8bit_size: int = 4096,
        impl: str = "auto",
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            maximize=maximize,
            decoupled_weight_decay=True,
            min_8bit_size=min_8bit_size,
            impl=impl,
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True


class SGD8bit(BlockwiseQuantizedState, SGD):
    r""":class:`~ravine.optim.SGD` whose momentum buffer is stored in 8 bits per
    element, block-wise quantized (Dettmers et al., 2022): 1.02 bytes of state per
    parameter instead of 4 for large tensors. Dense gradients only.

    Arguments as :class:`~ravine.optim.SGD`, plus ``min_8bit_size`` and ``impl``
    (see :class:`Adam8bit`). Without momentum there is no state to quantize.
    """

    own_compiled_step = True
    compiled_family = "sgd"

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        min_8bit_size: int = 4096,
        impl: str = "auto",
    ) -> None:
        self.min_8bit_size = _check_min_8bit_size(min_8bit_size)
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov, maximize=maximize, impl=impl)

    def advance_steps(self, group, dense) -> list[float]:
        counts = super().advance_steps(group, dense)  # new float buffers: allocated, never written
        for (p, state), count in zip(dense, counts):
            if count == 0.0 and "momentum_buffer" in state and self.quantizes(p):
                self._quantize_new_buffers(p, state)
        return counts


class Lion8bit(BlockwiseQuantizedState, Lion):
    r""":class:`~ravine.optim.Lion` whose momentum ``exp_avg`` is stored in 8 bits per
    element, block-wise quantized (Dettmers et al., 2022): 1.02 bytes of state per
    parameter instead of 4 for large tensors.

    Arguments as :class:`~ravine.optim.Lion`, plus ``min_8bit_size`` (see
    :class:`Adam8bit`).

    The new momentum is rounded stochastically (:func:`quantize_blockwise`), drawing
    from torch's global random number generator: with :math:`\beta_2 = 0.99` each
    step moves :math:`m` by 1% of the way to :math:`g`, about the spacing of the
    codebook near a block's largest values, so rounding to nearest loses most of
    those moves (on a 128x64 least-squares problem, 300 steps at lr 3e-4: loss 0.31
    with nearest rounding, 0.189 stochastic, 0.189 with float32 state).

    Lion8bit has no compiled step: its random numbers come from torch's generator,
    in the plain path's order. ``impl`` may be "auto" or "plain" ("fast" raises).
    """

    stochastic_rounding = True

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        min_8bit_size: int = 4096,
        impl: str = "auto",
    ) -> None:
        self.min_8bit_size = _check_min_8bit_size(min_8bit_size)
        super().__init__(params, lr, betas, weight_decay, maximize=maximize, impl=impl)
