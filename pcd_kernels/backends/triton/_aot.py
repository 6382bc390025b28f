"""Ahead-of-time compilation of a kernel launch for a GPU architecture, without a GPU.

Triton compiles to PTX and cubin with its bundled ptxas on any machine; this lets CPU-only CI
prove that every kernel and autotune configuration compiles for sm_80 and sm_90 and report the
registers, spills and shared memory ptxas assigns. It cannot show that the code is fast or
correct on the device: that needs a GPU run. Needs Triton in compile mode (TRITON_INTERPRET unset).
"""
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget

_POINTER_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
                  torch.float64: "fp64", torch.uint8: "u8", torch.int32: "i32", torch.int64: "i64"}


def _signature(fn, args, constexprs):
    """Signature, constexpr values and attributes as Triton's launcher would specialise them:
    integers equal to 1 become constants, integers divisible by 16 and (16-byte aligned)
    tensors are marked divisible by 16, which is what lets loads vectorise."""
    signature, values, attrs = {}, dict(constexprs), {}
    divisible = [["tt.divisibility", 16]]
    for index, (name, value) in enumerate(zip(fn.arg_names, args)):
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _POINTER_TYPES[value.dtype]
            if value.data_ptr() % 16 == 0:
                attrs[(index,)] = divisible
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1:  # Triton specialises integer arguments equal to 1 at launch, so do we
                signature[name] = "constexpr"
                values[name] = 1
            else:
                signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
                if value % 16 == 0:
                    attrs[(index,)] = divisible
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"cannot type argument {name}={value!r}")
    for name in constexprs:
        signature[name] = "constexpr"
    return signature, values, attrs


def _cuobjdump():
    import triton.backends.nvidia as nvidia

    bundled = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    return bundled if os.path.exists(bundled) else "cuobjdump"


def compile_launch(fn, args, constexprs, arch, num_warps, num_stages, cubin_path=None, sass=False):
    """Compile ``fn(*args, **constexprs)`` for sm_<arch> (90 means sm_90a, as Triton builds it);
    return its resource usage.

    Returns a dict with ``registers`` per thread, ``stack_bytes`` and ``local_bytes`` per thread
    (ptxas puts register spills there: both should be 0 for a healthy configuration),
    ``shared_bytes`` (static + dynamic shared memory) and ``num_warps``. ``cubin_path`` keeps the
    cubin there; ``sass=True`` adds ``instructions``: :func:`count_instructions` of its SASS.
    """
    signature, values, attrs = _signature(fn, args, constexprs)
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=values, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.TemporaryDirectory() as folder:
        path = cubin_path or os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", path], check=True,
                               capture_output=True, text=True).stdout
        listing = subprocess.run([_cuobjdump(), "--dump-sass", path], check=True, capture_output=True,
                                 text=True).stdout if sass else None
    fields = dict(re.findall(r"(\w+):(\d+)", usage.split("Function", 1)[1]))
    result = {"registers": int(fields["REG"]), "stack_bytes": int(fields["STACK"]),
              "local_bytes": int(fields["LOCAL"]),
              "shared_bytes": int(fields["SHARED"]) + compiled.metadata.shared, "num_warps": num_warps}
    if sass:
        result["instructions"] = count_instructions(listing)
    return result


# The instructions that say whether a kernel uses the chip: warpgroup MMA (Hopper), warp MMA,
# the exp unit, asynchronous global->shared copies (cp.async; TMA), and local-memory traffic
# (register spills).
OPCODES = ("HGMMA", "HMMA", "MUFU.EX2", "LDGSTS", "UTMALDG", "LDL", "STL")
_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def exps_under_mma(lines) -> int:
    """MUFU.EX2 issued while a warpgroup MMA is in flight: after an HGMMA, before the
    WARPGROUP.DEPBAR that waits for it. These exps overlap the tensor cores' work; the rest wait
    for it or it for them."""
    in_flight, overlapped = False, 0
    for _, opcode, operands in lines:
        if opcode.startswith("HGMMA"):
            in_flight = True
        elif opcode.startswith("WARPGROUP.DEPBAR") and operands.rstrip().endswith("0x0"):
            in_flight = False  # waits for all of them (".LE gsb0, 0x1" leaves one in flight)
        elif opcode.startswith("MUFU.EX2") and in_flight:
            overlapped += 1
    return overlapped


def count_instructions(listing: str) -> dict:
    """Counts of :data:`OPCODES` in a ``cuobjdump --dump-sass`` listing, in the whole kernel and in
    its main loop: the backward branch's body holding the most MMAs (the innermost such when
    several hold as many), or the most exps when the kernel has no MMA."""
    program = [(int(address, 16), opcode, operands) for address, opcode, operands in _LINE.findall(listing)]

    def counts(lines):
        found = {name: sum(1 for _, opcode, _ in lines if opcode == name or opcode.startswith(name + "."))
                 for name in OPCODES}
        found["EX2_UNDER_MMA"] = exps_under_mma(lines)
        return found

    loops = []
    for address, opcode, operands in program:
        target = re.search(r"0x([0-9a-f]+)", operands) if opcode.startswith("BRA") else None
        if target and int(target.group(1), 16) <= address:
            body = [line for line in program if int(target.group(1), 16) <= line[0] <= address]
            loops.append(counts(body) | {"span": address - int(target.group(1), 16)})
    main = max(loops, key=lambda c: (c["HGMMA"] + c["HMMA"], c["MUFU.EX2"], -c["span"]), default=None)
    if main is not None:
        main.pop("span")
    return {"kernel": counts(program), "main_loop": main}
