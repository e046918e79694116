"""One-row decode steps of a Llama-block model compiled ahead of time (AOTInductor), for the single user.

A decode step of one row through the slot forward is ~1,000 small eager ops, and on 2 CPU cores their dispatch
costs as much as the int4 matmuls themselves (bench/RESULTS.md, session 37: 10.3 ms a token, 5.0 of it in the int4
kernel). Two graphs cover everything in a layer but storing its new key and value in the cache:

- `FirstHalf`: the attention norm, the fused q|k|v projection (int4) and the rotary turn of q and k;
- `SecondHalf`: the attention over the cached keys (aten's sdpa kernel, in fp32 on the bf16 values where the slot
  forward computes it so: `decode_attention`), the o projection, the residual add, the feed-forward norm, gate|up,
  SiLU, down, the residual add. The number of keys is its one dynamic size.

Each layer's weights and cache are inputs, not constants, so one compiled pair serves every layer. The ops are the slot
forward's own, in its order and dtypes; inductor is told to round where eager rounds (`emulate_precision_casts`)
and to leave the norms' mean to aten's kernel (`compile_packages`), so the logits are bit for bit the eager
forward's (tests/generate/test_compiled_decode.py).

Compiling takes ~15-30 s of a core, so it runs in a child process in the background (the server answers with the
eager forward meanwhile) and the packages are kept in the ownllm home, keyed by everything that shapes them: a
second start loads them in a second or two. Wherever compiling cannot happen (no C++ compiler, another torch),
the eager forward goes on and `note` says why.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import inspect
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ownllm.errors import env_switch
from ownllm.home import open_lock_file, ownllm_home
from ownllm.models.gguf_int4 import int4_matmul

log = logging.getLogger(__name__)


def wanted() -> bool:
    """`OWNLLM_COMPILED_DECODE=0` keeps one-row steps eager (on by default)."""
    return env_switch("OWNLLM_COMPILED_DECODE", default=True)


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    # torch.rms_norm without a weight is transformers' x * rsqrt(mean(x^2) + eps) in fp32, bit for bit (checked in
    # test_slot_parity), in one op instead of five
    return torch.rms_norm(x.to(torch.float32), (x.shape[-1],), None, eps)


def llama_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm as transformers computes it (`_Norm`): normalise in fp32, round, scale in x's dtype."""
    return weight * _rms(x, eps).to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin_turned: torch.Tensor) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb, on the first `rotary dims` of each head (phi3 may rotate only part
    of it), bit for bit: rotate_half(x) * sin = cat(-x2, x1) * cat(s1, s2) = roll(x) * cat(-s1, s2)
    (`sin_turned`), a negation moved across a product (exact), in one op where rotate_half takes four."""
    rotary = cos.shape[-1]
    if rotary == x.shape[-1]:
        return x * cos + x.roll(rotary // 2, -1) * sin_turned
    turned, kept = x[..., :rotary], x[..., rotary:]
    turned = turned * cos + turned.roll(rotary // 2, -1) * sin_turned
    return torch.cat([turned, kept], dim=-1)


def decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
                     upcast: bool) -> torch.Tensor:
    """One decoding row's attention over its own cached keys, unmasked, as transformers' sdpa call computes it; with
    `upcast`, in fp32 on the same bf16/fp16 values (faster on some CPUs), left in fp32 for the caller to round."""
    if upcast:
        query, keys, values = query.float(), keys.float(), values.float()
    return F.scaled_dot_product_attention(query, keys, values, scale=scale, enable_gqa=True)


class FirstHalf(torch.nn.Module):
    """A layer up to its attention: the norm, q|k|v and the rotary turn of q and k. Returns (q | k, v),
    [1, heads + kv heads, 1, head_dim] and [1, kv heads, 1, head_dim]."""

    def __init__(self, heads: int, kv_heads: int, head_dim: int, eps: float) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.eps = heads, kv_heads, head_dim, eps

    def forward(self, x: torch.Tensor, norm: torch.Tensor, qkv_packed: torch.Tensor, qkv_scales: torch.Tensor,
                cos: torch.Tensor, sin_turned: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, kv = self.heads, self.kv_heads
        qkv = int4_matmul(llama_norm(x, norm, self.eps), qkv_packed, qkv_scales)
        qkv = qkv.view(1, 1, h + 2 * kv, self.head_dim).transpose(1, 2)
        return rope(qkv[:, : h + kv], cos, sin_turned), qkv[:, h + kv :]


class SecondHalf(torch.nn.Module):
    """A layer from its attention on: the attention over the first `keys.shape[0]` positions of the layer's cache
    (the new key and value stored there already), o projection, residual, feed-forward with its norm, residual.
    Returns x."""

    def __init__(self, heads: int, head_dim: int, intermediate: int, eps: float, scale: float, upcast: bool) -> None:
        super().__init__()
        self.heads, self.head_dim, self.intermediate, self.eps = heads, head_dim, intermediate, eps
        self.scale, self.upcast = scale, upcast

    def forward(self, x: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                keys: torch.Tensor, o_packed: torch.Tensor, o_scales: torch.Tensor, norm: torch.Tensor,
                gate_up_packed: torch.Tensor, gate_up_scales: torch.Tensor, down_packed: torch.Tensor,
                down_scales: torch.Tensor) -> torch.Tensor:
        count = keys.shape[0]  # the keys attended, as a size: the graph's one dynamic dimension
        attended = decode_attention(q, k_cache[None, :, :count], v_cache[None, :, :count], self.scale, self.upcast)
        attended = attended.to(x.dtype).transpose(1, 2).reshape(1, 1, self.heads * self.head_dim)
        x = x + int4_matmul(attended, o_packed, o_scales)
        gate_up = int4_matmul(llama_norm(x, norm, self.eps), gate_up_packed, gate_up_scales)
        gate, up = gate_up.split(self.intermediate, -1)
        return x + int4_matmul(F.silu(gate) * up, down_packed, down_scales)


def spec_of(model: Any) -> tuple[dict[str, Any] | None, str | None]:
    """(what the graphs are compiled for, None) for a `SlotModel` whose one-row steps they can run, else
    (None, why not)."""
    config = model.config
    if model.device.type != "cpu" or not model.four_bit_rows:
        return None, "compiled one-row steps need the GGUF 4-bit weights on the CPU"
    if config.model_type not in ("llama", "mistral") or getattr(config, "hidden_act", None) != "silu":
        return None, f"compiled one-row steps cover llama and mistral blocks (SiLU), not {config.model_type}"
    layers, four = model.layers, model.four_bit.layers
    plain = all(layer.qkv_bias is None and layer.o_bias is None and layer.gate_up_bias is None
                and layer.down_bias is None and layer.q_norm is None and layer.attn_out_norm is None
                and layer.mlp_out_norm is None for layer in layers)
    stored = len(four) == len(layers) and all(
        part is not None and part.plane_count == 1 for f in four for part in (f.qkv, f.o, f.gate_up, f.down))
    if not plain or not stored:
        return None, "compiled one-row steps need every projection in 4 bits, without biases"
    longest = model.max_len + model.prefix_len  # a window at least this long never leaves out a key
    if any(layer.window is not None and layer.window < longest for layer in layers):
        return None, "compiled one-row steps attend over the whole cache (no sliding window shorter than the context)"
    epsilons = {layer.attn_norm.eps for layer in layers} | {layer.mlp_norm.eps for layer in layers}
    first = four[0]
    spec = {
        "heads": model.heads, "kv_heads": model.kv_heads, "head_dim": model.head_dim,
        "hidden": int(model.weights.embed.shape[1]), "intermediate": model.intermediate,
        "rotary": int(model.cos["default"].shape[-1]), "eps": epsilons.pop() if len(epsilons) == 1 else None,
        "scale": float(model.scaling), "upcast": bool(model._upcast_decode),
        "dtype": str(model.dtype).removeprefix("torch."),
        "shapes": {name: [list(part.packed.shape), list(part.scales_and_zeros.shape)]
                   for name, part in (("qkv", first.qkv), ("o", first.o), ("gate_up", first.gate_up),
                                      ("down", first.down))},
        "torch": torch.__version__,
        "code": _code_version(),
    }
    if spec["eps"] is None:
        return None, "compiled one-row steps need one norm epsilon for all layers"
    from ownllm.models.dtype import cpu_flags, cpu_model

    spec["cpu"] = [cpu_model(), sorted(cpu_flags())]
    return spec, None


def checker(model: Any, spec: dict[str, Any]) -> Callable[[Any, Any], None]:
    """What `CompiledSteps` runs before using a loaded pair: both graphs on the model's first layer (its real
    weights, made-up activations) against the eager ops they were traced from; raises unless every bit agrees."""
    layer, four = model.layers[0], model.four_bit.layers[0]
    position = min(7, model.cos["default"].shape[0] - 1)
    cos = model.cos["default"][position][None, None, None]
    sin_turned = model.sin_turned["default"][position][None, None, None]
    eager_first, eager_second = _modules(spec)

    def check(first: Any, second: Any) -> None:
        generator = torch.Generator().manual_seed(0)
        with torch.inference_mode():
            for capacity, count in ((40, 17), (40, 40), (300, 1), (300, 257)):
                x = (torch.randn(1, 1, spec["hidden"], generator=generator) * 4).to(model.dtype)
                q = (torch.randn(1, spec["heads"], 1, spec["head_dim"], generator=generator) * 4).to(model.dtype)
                k_cache, v_cache = (torch.randn(2, spec["kv_heads"], capacity, spec["head_dim"], generator=generator)
                                    * 4).to(model.dtype)
                first_inputs = [x, layer.attn_norm.weight, four.qkv.packed, four.qkv.scales_and_zeros, cos,
                                sin_turned]
                second_inputs = [x, q, k_cache, v_cache, torch.empty(count, dtype=torch.int8), four.o.packed,
                                 four.o.scales_and_zeros, layer.mlp_norm.weight, four.gate_up.packed,
                                 four.gate_up.scales_and_zeros, four.down.packed, four.down.scales_and_zeros]
                want_first, want_second = eager_first(*first_inputs), eager_second(*second_inputs)
                got_first, got_second = first(list(first_inputs)), second(list(second_inputs))
                if not (len(got_first) == 2 and len(got_second) == 1
                        and all(torch.equal(w, g) for w, g in zip(want_first, got_first, strict=True))
                        and torch.equal(want_second, got_second[0].reshape(want_second.shape))):
                    raise RuntimeError("the compiled graphs do not compute what the eager ops do")

    return check


def _code_version() -> str:
    """A hash of what the graphs are traced from: this module (the slot forward's norm and rotary turn too) and the
    int4 matmul, and of ownllm's version (a change compiles them anew; the check after loading catches what a key
    cannot)."""
    from importlib.metadata import version

    try:
        sources = [inspect.getsource(sys.modules[__name__]), inspect.getsource(int4_matmul)]
    except (OSError, TypeError):  # no source to read (a frozen install): the version stands for it
        sources = []
    return hashlib.sha256("".join([version("ownllm"), *sources]).encode()).hexdigest()[:16]


def _key(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _example_inputs(spec: dict[str, Any]) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Inputs of the right shapes and dtypes (the graphs take weights as inputs: their values do not matter)."""
    dtype = getattr(torch, spec["dtype"])
    hidden, heads, head_dim = spec["hidden"], spec["heads"], spec["head_dim"]

    def part(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        packed, scales = spec["shapes"][name]
        return torch.randint(0, 255, packed, dtype=torch.uint8), torch.rand(scales).to(dtype)

    x = torch.randn(1, 1, hidden).to(dtype)
    norm = torch.rand(hidden).to(dtype)
    table = torch.rand(1, 1, 1, spec["rotary"]).to(dtype)
    first = (x, norm, *part("qkv"), table, table.clone())
    cache = torch.randn(spec["kv_heads"], 64, head_dim).to(dtype)  # one layer's keys (or values): [kv, capacity, D]
    second = (x, torch.randn(1, heads, 1, head_dim).to(dtype), cache, cache.clone(), torch.empty(40, dtype=torch.int8),
              *part("o"), norm, *part("gate_up"), *part("down"))
    return first, second


def _modules(spec: dict[str, Any]) -> tuple[FirstHalf, SecondHalf]:
    return (FirstHalf(spec["heads"], spec["kv_heads"], spec["head_dim"], spec["eps"]),
            SecondHalf(spec["heads"], spec["head_dim"], spec["intermediate"], spec["eps"], spec["scale"],
                       spec["upcast"]))


def _dynamic_shapes() -> dict[str, Any]:
    """Per graph: the sizes that vary between calls (the second half's cache capacity and number of keys)."""
    capacity = torch.export.Dim("capacity", min=2, max=1 << 24)
    keys = torch.export.Dim("keys", min=1, max=1 << 24)
    first = None
    second = ({}, {}, {1: capacity}, {1: capacity}, {0: keys}, *[{}] * 7)
    return {"first": first, "second": second}


def compile_packages(spec: dict[str, Any], folder: Path) -> None:
    """Compile both graphs for `spec` into folder/first.pt2 and folder/second.pt2: the child process's job. Written
    whole or not at all; where another process's compile got there first, its folder stays."""
    import torch._inductor.config as inductor_config
    from torch._inductor.lowering import lowerings, make_fallback

    inductor_config.emulate_precision_casts = True  # round where eager rounds: the same bits
    # and the norms' mean of squares summed by aten's own kernel, as eager sums it: a generated reduction adds in
    # another order, and about one norm in a thousand then rounds an element to another bf16
    lowerings.pop(torch.ops.aten.mean.dim, None)
    make_fallback(torch.ops.aten.mean.dim, warn=False)  # warn=True is an error where $CI is set
    first_inputs, second_inputs = _example_inputs(spec)
    first_module, second_module = _modules(spec)
    graphs = {"first": (first_module, first_inputs), "second": (second_module, second_inputs)}
    dynamic = _dynamic_shapes()
    staging = folder.with_name(f".{folder.name}.{os.getpid()}")
    staging.mkdir(parents=True, exist_ok=True)
    try:
        for name, (module, inputs) in graphs.items():
            exported = torch.export.export(module, inputs, dynamic_shapes=dynamic[name])
            torch._inductor.aoti_compile_and_package(exported, package_path=str(staging / f"{name}.pt2"))
        if not (folder / "second.pt2").is_file():
            os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class CompiledSteps:
    """The compiled pair for one model, loaded (or compiled, then loaded) in the background, and checked before use.

    `ready` is None until both graphs can run; `note` says where things stand (the start-up line, /health).
    `check(first, second)` raises unless the graphs compute what the eager ops do (`SlotModel` runs them on a
    layer's real weights): a package that loads but does not fit (stale, swapped, damaged) is compiled anew once,
    then left eager."""

    def __init__(self, spec: dict[str, Any], check: Callable[[Any, Any], None]) -> None:
        self.spec, self.check = spec, check
        self.folder = ownllm_home() / "compiled" / f"decode-{_key(spec)}"
        self.note = ("one-row steps: loading their compiled graphs" if _complete(self.folder) else
                     "one-row steps compiling in the background (AOTInductor, once per model and CPU)")
        self.ready: tuple[Any, Any] | None = None
        self.thread = threading.Thread(target=self._load, name="ownllm-compile-decode", daemon=True)
        self.thread.start()

    def _load(self) -> None:
        try:
            for attempt in (1, 2):
                if not _complete(self.folder):
                    self._compile_once()
                try:
                    self.ready = self._loaded_and_checked()
                    with contextlib.suppress(OSError):  # last used now: `_prune` keeps the pairs in use
                        os.utime(self.folder)
                    break
                except Exception as exc:
                    if attempt == 2:
                        raise
                    log.warning("the compiled graphs in %s are unusable (%s: %s); compiling them anew",
                                self.folder, exc.__class__.__name__, str(exc)[-300:])
                    with _folder_lock(self.folder):
                        _discard(self.folder)
            self.note = "one-row steps compiled (AOTInductor)"
        except Exception as exc:  # compiling is a speed-up: without it the eager forward goes on
            self.note = f"one-row steps eager ({exc.__class__.__name__} while compiling or loading; see the log)"
            log.warning("compiled one-row decode steps unavailable (%s: %s); decoding eagerly",
                        exc.__class__.__name__, str(exc)[-500:])

    def _loaded_and_checked(self) -> tuple[Any, Any]:
        from torch._inductor import aoti_load_package

        # the loader's own run: the package's __call__ parses its input and output specs on every call
        # (~12 us, 60 calls a token)
        first = aoti_load_package(str(self.folder / "first.pt2")).loader.run
        second = aoti_load_package(str(self.folder / "second.pt2")).loader.run
        self.check(first, second)
        return first, second

    def _compile_once(self) -> None:
        """One compile per key at a time: the others (servers started meanwhile) wait on its lock, then load."""
        with _folder_lock(self.folder):
            if _complete(self.folder):
                return
            _discard(self.folder)  # whatever is there is not a compiled pair (a half, a file, a link)
            for stale in self.folder.parent.glob(f".{self.folder.name}.*"):  # a child killed mid-compile
                _discard(stale)
            self.folder.parent.mkdir(parents=True, exist_ok=True)
            # a child process, one core, at a lower priority (it lowers its own): the server answers eagerly
            # meanwhile, and a child whose server went away still finishes for the next start
            result = subprocess.run(
                [sys.executable, "-m", "ownllm.generate.compiled_decode", json.dumps(self.spec), str(self.folder)],
                capture_output=True, text=True, timeout=1800, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if result.returncode < 0:
                raise RuntimeError(f"the compiler process was killed (signal {-result.returncode})")
            if result.returncode != 0:
                lines = [line for line in result.stderr.splitlines() if line.strip() and "Warning" not in line]
                raise RuntimeError("\n".join(lines[-5:])[-500:] or f"exit {result.returncode}")
        _prune(self.folder)


KEPT_PAIRS = 8  # compiled pairs kept in the home (~3 MB each), the most recently used: one per model and CPU


@contextlib.contextmanager
def _folder_lock(folder: Path, wait: bool = True) -> Iterator[bool]:
    """The lock of one compiled pair's folder (held while it is compiled or removed). Yields whether it is held:
    always where `wait`, else only where no other process holds it."""
    locks = ownllm_home() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    descriptor = open_lock_file(locks / f"compile-{folder.name}")
    if descriptor is None:
        raise OSError(f"the compile lock {locks / f'compile-{folder.name}'} is not a plain file")
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(descriptor)


def _prune(kept: Path) -> None:
    """Remove compiled pairs beyond the KEPT_PAIRS most recently used (by their folders' times), after `kept`
    was compiled: old ones pile up as ownllm, torch or the models change. Each goes under its own lock, and only if
    no other process holds that lock (compiling it) and its time has not moved since the listing (another server
    loaded it meanwhile); a staging folder of a compile killed midway goes where its key's lock is free. A pair
    removed while a server runs it costs nothing (it is loaded) or a compile at its next start."""
    def last_used(folder: Path) -> float:
        try:
            return folder.lstat().st_mtime
        except OSError:
            return 0.0

    pairs = {folder: last_used(folder) for folder in kept.parent.glob("decode-*")
             if folder != kept and folder.is_dir() and not folder.is_symlink()}
    old = sorted(pairs, key=pairs.__getitem__, reverse=True)[KEPT_PAIRS - 1 :]
    staging = [(folder, folder.with_name(folder.name[1:].rsplit(".", 1)[0]))  # .decode-<key>.<pid>
               for folder in kept.parent.glob(".decode-*.*")]
    for folder, key_folder in [(folder, folder) for folder in old] + staging:
        try:
            with _folder_lock(key_folder, wait=False) as held:
                if held and (folder not in pairs or last_used(folder) == pairs[folder]):
                    _discard(folder)
                    if folder.exists() or folder.is_symlink():
                        log.warning("could not remove the old compiled pair %s", folder)
        except OSError as exc:  # tidying up is no reason to give up the pair just compiled
            log.warning("could not remove the old compiled pair %s (%s)", folder, exc)


def _complete(folder: Path) -> bool:
    """A compiled pair: a real folder (not a link) with both packages as plain files."""
    return (folder.is_dir() and not folder.is_symlink()
            and all((folder / name).is_file() and not (folder / name).is_symlink()
                    for name in ("first.pt2", "second.pt2")))


def _discard(path: Path) -> None:
    """Remove what is at `path`, never following a link."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":  # the child process of `CompiledSteps._load`
    os.nice(10)
    compile_packages(json.loads(sys.argv[1]), Path(sys.argv[2]))
